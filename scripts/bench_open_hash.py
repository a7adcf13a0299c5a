"""Native bundle open with and without the sha256 of every listed file, for one or more hm_runner builds.

    python scripts/bench_open_hash.py BUNDLE RUNNER [RUNNER ...] [--rounds 3] [--json out.json]

Each round opens BUNDLE once per runner with verification (``hm_runner BUNDLE --json``: the seal, the sizes and
every listed file's sha256) and once with ``--no-verify-files`` (trusted storage: no hashes), interleaved, and
reports the median ``open_ms`` of each and their difference, the time spent hashing, with the bytes hashed and
the resulting GB/s. Compare builds of the runtime (e.g. with OpenSSL's SHA-256, -DHM_WITH_OPENSSL=OFF for the
portable one) on the same machine in one run: only ratios measured together mean anything on a busy host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from hm_export.bundle import read_manifest


def open_ms(runner: Path, bundle: Path, verify: bool) -> float:
    command = [str(runner), str(bundle), "--json", *([] if verify else ["--no-verify-files"])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)["open_ms"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("runners", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    hashed = sum(record.bytes for record in read_manifest(args.bundle).files.values())
    times: dict[str, dict[str, list[float]]] = {str(r): {"verify": [], "no_verify": []} for r in args.runners}
    for round_ in range(args.rounds):
        order = args.runners if round_ % 2 == 0 else list(reversed(args.runners))
        for runner in order:
            times[str(runner)]["verify"].append(open_ms(runner, args.bundle, True))
            times[str(runner)]["no_verify"].append(open_ms(runner, args.bundle, False))
    report = {"bundle": str(args.bundle), "hashed_bytes": hashed, "rounds": args.rounds, "runners": {}}
    for runner, t in times.items():
        verify, plain = statistics.median(t["verify"]), statistics.median(t["no_verify"])
        hashing = max(verify - plain, 1e-9)
        report["runners"][runner] = {
            "open_ms_verify": round(verify, 1),
            "open_ms_no_verify": round(plain, 1),
            "hash_ms": round(hashing, 1),
            "hash_gb_per_s": round(hashed / hashing / 1e6, 3),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
