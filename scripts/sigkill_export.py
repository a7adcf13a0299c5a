"""Random SIGKILLs of ``hm-export export --overwrite``: the previous bundle survives, the next run cleans up.

    python scripts/sigkill_export.py CHECKPOINT OUT [--kills 10] [--seed 0] [--target executorch,onnx]
                                     [--json report.json] [-- extra export options]

Exports CHECKPOINT to OUT once (timing it), then starts ``hm-export export CHECKPOINT OUT --overwrite`` and
sends SIGKILL to it (its main process, as ``kill -9`` does) at a uniformly random instant of that duration,
until ``--kills`` kills have landed while the export was running (an export that finished first counts
apart).  After each kill it records what the kill left (OUT missing? partial or retired folders?),
runs the recovery every later export runs first (hm_export.atomic.recover), and checks that OUT is a
complete bundle (manifest sealed, every file matching its size and sha256) -- the previous one, or the new
one when the kill came after the swap.  A last, uninterrupted export must leave no ``.OUT.*`` folder.
Exits 1 on any failure; figures in docs/hostile-inputs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from hm_export.atomic import recover
from hm_export.bundle import read_manifest, verify_files
from hm_export.integrity import SEAL_FILE


def export_command(checkpoint: Path, out: Path, target: str, extra: list[str]) -> list[str]:
    hm_export = Path(sys.executable).parent / "hm-export"
    return [str(hm_export), "-q", "export", str(checkpoint), str(out), "--overwrite", "--target", target, *extra]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def sealed_digest(out: Path) -> str | None:
    """The manifest digest of a complete bundle at ``out`` (None when there is none or it does not verify)."""
    try:
        verify_files(out, read_manifest(out))
        return json.loads((out / SEAL_FILE).read_text())["manifest_sha256"]
    except Exception:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="executorch,onnx")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="More export options (after --).")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    command = export_command(args.checkpoint, args.out, args.target, args.extra)

    start = time.perf_counter()
    subprocess.run(command, check=True)
    duration = time.perf_counter() - start
    previous = sealed_digest(args.out)
    assert previous is not None, "the first export did not produce a valid bundle"
    print(f"full export: {duration:.1f} s", flush=True)

    kills, failures = [], []
    while sum(not k["finished_before_kill"] for k in kills) < args.kills and len(kills) < 3 * args.kills:
        index = len(kills)
        delay = rng.uniform(0, duration)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished = process.poll() is not None
        if not finished:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        state = {
            "kill": index + 1,
            "at_s": round(delay, 1),
            "finished_before_kill": finished,
            "out_missing": not args.out.exists(),
            "left": leftovers(args.out),
        }
        state["recovery"] = recover(args.out)  # what the next export does before anything else
        digest = sealed_digest(args.out)
        state["bundle"] = "previous" if digest == previous else "new" if digest else "BROKEN"
        state["left_after_recovery"] = leftovers(args.out)
        if digest is None or state["left_after_recovery"]:
            failures.append(state)
        previous = digest or previous
        kills.append(state)
        print(json.dumps(state), flush=True)

    subprocess.run(command, check=True)
    final = {"bundle_valid": sealed_digest(args.out) is not None, "left": leftovers(args.out)}
    if not final["bundle_valid"] or final["left"]:
        failures.append(final)
    report = {
        "kills": len(kills),
        "killed_mid_export": sum(not k["finished_before_kill"] for k in kills),
        "killed_between_renames": sum(k["out_missing"] for k in kills),
        "left_partial_before_recovery": sum(any(".partial-" in n for n in k["left"]) for k in kills),
        "previous_bundle_intact": sum(k["bundle"] == "previous" for k in kills),
        "new_bundle_complete": sum(k["bundle"] == "new" for k in kills),
        "broken": sum(k["bundle"] == "BROKEN" for k in kills),
        "leftovers_after_next_run": sum(bool(k["left_after_recovery"]) for k in kills) + bool(final["left"]),
        "full_export_s": round(duration, 1),
        "final": final,
        "details": kills,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
