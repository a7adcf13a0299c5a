"""The hostile-input run: about a thousand seeded mutations of a bundle against every reader.

    python scripts/hostile_inputs.py BUNDLE [--count 1000] [--seed 0] [--runner build/native/hm_runner]
                                            [--work /tmp/hostile] [--json report.json]

BUNDLE should have golden checks and the executorch target (for the C++ runner); the run copies it per case.
Each mutation (hm_export.fuzz: manifest, seal, index, blocks, checks, tokenizer, router, programs and the
filesystem -- symlinks out of the bundle, FIFOs, directories, path escapes; half of them consistent, with
CRC-32s, sizes, sha256s and the seal recomputed) is replayed against

* the Python API (open, route, fill, window logits and a few decode steps on executorch and onnx),
* ``run_checks`` and ``hm-export check`` (damage must be FAIL rows, never a traceback),
* ``hm_runner --checks`` (the C++ runtime, when built; ``--route-on-device`` when the bundle has an ExecuTorch
  router program),
* the router programs (ExecuTorch, ONNX) with their tokenizer, when the bundle has them,

and every consistent mutation again on a copy signed with a fresh key, opened with that key (API and
runner): the integrity root must refuse them all.  It prints the figures of docs/hostile-inputs.md and
exits 1 if any case crashed, hung, raised a foreign exception, printed a traceback, read outside the bundle
or refused without naming a file of the bundle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hm_export.bundle import read_manifest
from hm_export.fuzz import Harness, OutsideWatch, mutations, probe_native, problems, run_case
from hm_export.integrity import generate_key, public_key_bytes, sign_bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runner", type=Path, default=Path("build/native/hm_runner"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds before a reader counts as hung.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    signed, key = _signed_copy(args.bundle, work)
    runner = args.runner if args.runner.is_file() else None
    harness, watch = Harness(timeout=args.timeout), OutsideWatch()
    manifest = read_manifest(args.bundle)
    targets = tuple(t for t in ("executorch", "onnx") if t in manifest.targets)
    routers = tuple(t for t in ("executorch", "onnx") if t in manifest.router.programs)
    on_device = "executorch" in routers
    probes = {  # `hm-export check` runs run_checks: the CLI probe covers the golden-check replay too
        "api": lambda b: harness.run("api", b, targets),
        "cli": lambda b: harness.run("cli", b),
    }
    signed_probes = {"api": lambda b: harness.run("api", b, targets, public_key_bytes(key))}
    if routers:
        probes["router"] = lambda b: harness.run("router", b, routers)
        signed_probes["router"] = lambda b: harness.run("router", b, routers, public_key_bytes(key))
    if runner is not None:
        probes["native"] = lambda b: probe_native(runner, b, timeout=args.timeout, route_on_device=on_device)
        signed_probes["native"] = lambda b: probe_native(
            runner, b, timeout=args.timeout, verify_key=key, route_on_device=on_device
        )
    start, results, signed_results, failures = time.perf_counter(), [], [], []
    try:
        for index, mutation in enumerate(mutations(args.bundle, args.count, args.seed)):
            result = run_case(index, mutation, args.bundle, work / "cases", probes, watch)
            results.append(result)
            found = [f"case {index} [{mutation.description}]: {p}" for p in problems(result)]
            for problem in found:
                print("PROBLEM", problem, flush=True)
            failures += found
            if mutation.consistent and "mutation" not in result.outcomes:
                again = run_case(index, mutation, signed, work / "signed-cases", signed_probes, watch)
                signed_results.append(again)
                failures += [f"signed case {index} [{mutation.description}]: {p}" for p in problems(again)]
            if index % 50 == 49:
                print(f"{index + 1} cases, {len(failures)} problems, {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        harness.close()
        watch.close()
    report = summarize(results, signed_results, failures, time.perf_counter() - start)
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def _signed_copy(bundle: Path, work: Path) -> tuple[Path, Path]:
    signed = work / "signed" / bundle.name
    shutil.rmtree(signed.parent, ignore_errors=True)
    shutil.copytree(bundle, signed)
    generate_key(work / "signed" / "key.pem", work / "signed" / "key.pub")
    sign_bundle(signed, work / "signed" / "key.pem")
    return signed, work / "signed" / "key.pub"


def summarize(results: list, signed_results: list, failures: list[str], seconds: float) -> dict:
    applied = [r for r in results if "mutation" not in r.outcomes]
    statuses: Counter = Counter()
    for result in applied:
        for name, outcome in result.outcomes.items():
            statuses[f"{name}:{outcome['status']}"] += 1
    consistent = [r for r in applied if r.consistent]

    def accepted(result) -> bool:
        return result.outcomes.get("api", {}).get("status") == "ok"

    # The API probe reads every file of the bundle (every block too); the runner only what its checks use.
    signed_refused = [r for r in signed_results if r.outcomes["api"]["status"] == "refused"]
    signed_everywhere = [r for r in signed_results if all(o["status"] == "refused" for o in r.outcomes.values())]
    return {
        "mutations": len(applied),
        "not_applicable": len(results) - len(applied),
        "by_area": dict(Counter(r.area for r in applied)),
        "crashes": sum(statuses[k] for k in statuses if k.endswith(":crash")),
        "hangs": sum(statuses[k] for k in statuses if k.endswith(":hang")),
        "foreign_exceptions": sum(statuses[k] for k in statuses if k.endswith(":foreign")),
        "cli_tracebacks": sum(1 for r in applied if r.outcomes.get("cli", {}).get("traceback")),
        "reads_outside_bundle": sum(r.outside_reads for r in [*applied, *signed_results]),
        "refusals_naming_no_file": sum(
            1 for r in applied for o in r.outcomes.values() if o["status"] == "refused" and not o.get("names_file")
        ),
        "outcomes": dict(sorted(statuses.items())),
        "consistent_edits": {
            "total": len(consistent),
            "refused_by_validation": sum(1 for r in consistent if not accepted(r)),
            "accepted_and_ran_harmlessly": sum(1 for r in consistent if accepted(r)),
            "accepted_checks_still_pass": sum(
                1 for r in consistent if accepted(r) and r.outcomes.get("cli", {}).get("exit_code") == 0
            ),
            "accepted_checks_fail": sum(
                1 for r in consistent if accepted(r) and r.outcomes.get("cli", {}).get("exit_code") == 1
            ),
            "accepted_examples": [r.description for r in consistent if accepted(r)][:40],
            "signed_bundle_refused": len(signed_refused),
            "signed_bundle_refused_by_every_reader": len(signed_everywhere),
            "signed_bundle_not_refused": [r.description for r in signed_results if r not in signed_refused],
        },
        "problems": failures,
        "seconds": round(seconds, 1),
        "cases": [r.to_dict() for r in results],
        "signed_cases": [r.to_dict() for r in signed_results],
    }


if __name__ == "__main__":
    sys.exit(main())
