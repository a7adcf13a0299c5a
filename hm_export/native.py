"""Build and drive the native (C++) runtime in ``runtime_stubs/cpp`` from Python.

:func:`build_native_runner` configures and builds the library and the ``hm_runner`` CLI with CMake against
the ExecuTorch runtime that the installed ``executorch`` wheel ships (headers, ``libexecutorch.so``, the
XNNPACK delegate and the CMake package under ``executorch/share/cmake``).  :func:`run_native_runner` runs
``hm_runner --json`` on a bundle and returns its report: the golden checks routed from recorded paths, from
embeddings computed here (:func:`write_check_embeddings`) or from the checks' text by the bundle's own router
program (``route_on_device``, compared with the Python router by :func:`compare_routing`), fills, the
benchmark, or a text continuation (:func:`run_native_generate`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hm_export import kernels, runtime_stubs
from hm_export.bundle import BundleError, read_manifest
from hm_export.errors import NativeError
from hm_export.router import Embedder, MiniLMEmbedder

NATIVE_SOURCE = Path(runtime_stubs.__file__).resolve().parent / "cpp"  # shipped as package data
KERNELS_SOURCE = Path(kernels.__file__).resolve().parent  # the fused kernel's C++ source (package data too)
RUNNER = "hm_runner"


def executorch_prefix() -> Path:
    """The installed executorch package directory: its ``share/cmake`` holds ``executorch-config.cmake``."""
    import executorch

    prefix = Path(next(iter(executorch.__path__)))
    if not (prefix / "share" / "cmake" / "executorch-config.cmake").is_file():
        raise NativeError(f"{prefix}: this executorch install ships no CMake package (need the executorch wheel)")
    return prefix


def _tool(name: str) -> str:
    """A build tool from this environment's bin (pip's cmake/ninja) or else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise NativeError(f"{name} not found: pip install cmake ninja (or install them with the system)")
    return found


def _configured_for(cache: Path) -> tuple[Path, Path]:
    """(source tree, kernels directory) that a build directory's ``CMakeCache.txt`` was configured for."""
    values = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        values[key.partition(":")[0]] = value
    return Path(values.get("CMAKE_HOME_DIRECTORY", "")).resolve(), Path(values.get("HM_KERNELS_DIR", "")).resolve()


def build_native_runner(build_dir: Path, source_dir: Path = NATIVE_SOURCE, jobs: int = 2) -> Path:
    """Configure (once) and build the native runtime into ``build_dir``; returns the ``hm_runner`` path."""
    build_dir = Path(build_dir)
    cmake = _tool("cmake")
    cache = build_dir / "CMakeCache.txt"
    wanted = (Path(source_dir).resolve(), Path(KERNELS_SOURCE).resolve())
    if cache.is_file() and _configured_for(cache) != wanted:
        # Configured for another checkout (a worktree, a moved clone): its objects are of that source, so configure
        # again rather than build a runtime of other code.
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
    if not cache.is_file():
        configure = [cmake, "-S", str(source_dir), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={executorch_prefix()}"]
        configure.append(f"-DHM_KERNELS_DIR={KERNELS_SOURCE}")  # memory_swiglu.cpp, built into the library
        if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").is_file():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"]
        _check_call(configure, "configure")
    _check_call([cmake, "--build", str(build_dir), "-j", str(jobs)], "build")
    return build_dir / RUNNER


def _check_call(command: list[str], step: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeError(f"native {step} failed ({' '.join(command)}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}")


def _tokenize_tool(runner: Path, tokenizer: Path, lines: list[str], *flags: str) -> list[Any]:
    done = subprocess.run(
        [str(Path(runner).parent / "hm_tokenize"), str(tokenizer), *flags],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise NativeError(done.stderr.strip() or f"hm_tokenize exited with {done.returncode}")
    return [json.loads(line) for line in done.stdout.split("\n")[:-1]]  # not splitlines(): U+2028 is text


def native_tokenize(runner: Path, tokenizer: Path, texts: Sequence[str]) -> list[list[int]]:
    """Ids of ``texts`` by the native tokenizer (``hm_tokenize``, built beside ``runner``) of ``tokenizer``
    (a tokenizer.json); raises NativeError with its message when it refuses the file."""
    return _tokenize_tool(runner, tokenizer, [json.dumps(text) for text in texts])


def native_detokenize(runner: Path, tokenizer: Path, ids: Sequence[Sequence[int]]) -> list[str]:
    """Text of each id list by the native tokenizer of ``tokenizer``."""
    return _tokenize_tool(runner, tokenizer, [json.dumps(list(i)) for i in ids], "--decode")


def check_contexts_of(bundle: Path) -> list[str]:
    """The contexts of ``bundle``'s golden checks, read and validated as ``check`` reads them."""
    from hm_export.checks import load_checks
    from hm_export.runtime_stubs.loader import bundle_config

    manifest = read_manifest(Path(bundle))
    if manifest.checks is None:
        raise BundleError(f"{Path(bundle) / 'manifest.json'}: the bundle has no golden checks", field="checks")
    body, _ = load_checks(Path(bundle), manifest, bundle_config(Path(bundle), manifest))
    return [check["context"] for check in body["checks"]]


def write_check_embeddings(bundle: Path, out: Path, embedder: Embedder | None = None) -> Path:
    """Embed the contexts of ``bundle``'s golden checks (the router's embedder) into ``out`` (safetensors
    ``embeddings`` ``float32 [checks, dim]``), for ``hm_runner --embeddings``."""
    from safetensors.numpy import save_file

    vectors = (embedder or MiniLMEmbedder()).embed(check_contexts_of(bundle)).astype("float32")
    save_file({"embeddings": vectors}, str(out))
    return Path(out)


def run_native_runner(
    runner: Path,
    bundle: Path,
    checks: bool = False,
    fills: Sequence[Sequence[int]] = (),
    dump_slot: Path | None = None,
    embeddings: Path | None = None,
    bench: dict[str, Any] | None = None,
    verify_files: bool = True,
    threads: int | None = None,
    route_on_device: bool = False,
    extra: Sequence[str] = (),
    verify_key: Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``hm_runner --json`` on ``bundle`` and return its report.

    ``checks``: replay the golden checks; ``fills``: paths to set in order (each report says which levels
    changed); ``dump_slot``: write the slot's raw bytes (contract order) there afterwards; ``embeddings``: route
    the checks' contexts with them; ``route_on_device``: route them from their text with the bundle's router
    program (the routed path fills the slot); ``bench``: run the benchmark with these ``hm-export bench`` settings
    (``runs``, ``contexts``, ``prompt_tokens``, ``new_tokens``, ``cache``); ``extra``: more runner arguments.
    Raises NativeError with the runner's message when it refuses the bundle (exit code 2); a failed check is in
    the report, not raised.  ``verify_key``: a public key file the bundle must be signed with; ``timeout``:
    seconds before the runner is stopped (NativeError).  A runner killed by a signal is a NativeError naming the
    signal.
    """
    command = [str(runner), str(bundle), "--json"]
    command += ["--checks"] if checks else []
    for path in fills:
        command += ["--fill", ",".join(str(node) for node in path)]
    command += ["--dump-slot", str(dump_slot)] if dump_slot else []
    command += ["--embeddings", str(embeddings)] if embeddings else []
    command += ["--route-on-device"] if route_on_device else []
    command += list(extra)
    command += [] if verify_files else ["--no-verify-files"]
    command += ["--threads", str(threads)] if threads else []
    command += ["--verify-key", str(verify_key)] if verify_key else []
    flags = {"runs": "--runs", "contexts": "-n", "prompt_tokens": "--prompt-tokens", "new_tokens": "--new-tokens"}
    if bench is not None:
        command.append("--bench")
        for key, value in bench.items():
            command += [flags[key], str(value)] if key in flags else ["--cache", str(value)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NativeError(f"{runner}: no answer within {timeout} s on {bundle} (stopped)") from None
    if done.returncode < 0:
        raise NativeError(f"{runner}: killed by signal {-done.returncode} on {bundle} (a crash: please report it)")
    if done.returncode == 2 or not done.stdout.strip():
        errors = [line for line in done.stderr.splitlines() if not line.startswith("I ")]  # drop ExecuTorch info logs
        raise NativeError("\n".join(errors) or f"{runner} exited with {done.returncode}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise NativeError(f"{runner}: printed a report that is not JSON ({exc})") from None


def compare_routing(bundle: Path, checks: dict[str, Any], embedder: Embedder | None = None) -> dict[str, Any]:
    """The on-device routing of a ``--route-on-device`` replay against the Python router on the same contexts:
    routes equal to the recorded ones, the cosine of each device embedding with the Python MiniLM's, and per
    check the margin of its route (the smallest gap between the chosen and the next-nearest child, squared L2)."""
    import numpy as np

    from hm_export.runtime_stubs.loader import read_tree

    contexts = check_contexts_of(bundle)
    python = (embedder or MiniLMEmbedder()).embed(contexts)
    try:
        device = np.array([result["embedding"] for result in checks["results"]], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise NativeError(f"{bundle}: the runner's --route-on-device report has no usable embeddings ({exc})") from None
    if device.shape != python.shape:
        raise NativeError(
            f"{bundle}: the runner routed with embeddings {list(device.shape)}, expected {list(python.shape)}"
        )
    cosines = (device * python).sum(1) / np.linalg.norm(device, axis=1) / np.linalg.norm(python, axis=1)
    tree = read_tree(Path(bundle))
    margins = [tree.route_margin(vector) for vector in python]
    return {
        "routes_matched": checks["routes_matched"],
        "contexts": len(contexts),
        "tokens_matched": checks["tokens_matched"],
        "tokens_total": checks["tokens_total"],
        "min_cosine": float(cosines.min()),
        "min_route_margin": float(min(margins)),
    }


def run_native(
    bundle: Path,
    build_dir: Path,
    checks: bool = True,
    embed: bool = False,
    bench: dict[str, Any] | None = None,
    threads: int | None = None,
    route_on_device: bool = False,
    verify_key: Path | None = None,
) -> dict[str, Any]:
    """Build the runner into ``build_dir`` (incremental) and run it on ``bundle``; with ``embed``, the checks'
    contexts are embedded here and routed natively; with ``route_on_device`` they are routed from their text by
    the bundle's router program and the report gains ``routing`` (:func:`compare_routing`); see
    :func:`run_native_runner` for the rest."""
    import tempfile

    runner = build_native_runner(build_dir)
    with tempfile.TemporaryDirectory() as scratch:
        embeddings = write_check_embeddings(bundle, Path(scratch) / "embeddings.safetensors") if embed else None
        report = run_native_runner(
            runner,
            bundle,
            checks,
            embeddings=embeddings,
            bench=bench,
            threads=threads,
            route_on_device=route_on_device,
            verify_key=verify_key,
        )
    if route_on_device and checks:
        report["routing"] = compare_routing(bundle, report["checks"])
        for result in report["checks"]["results"]:
            result.pop("embedding")
    return report


def run_native_generate(
    runner: Path, bundle: Path, context: str, prompt: str, max_new_tokens: int = 32, next_context: str | None = None
) -> dict[str, Any]:
    """``hm_runner --context --prompt``: route ``context`` on device, continue ``prompt`` greedily; returns the
    runner's ``generation`` report (path, fill, prompt and new token ids, text, stop reason, timings), and with
    ``next_context`` a second one (``next``) for that context, prefetched in the background during the first."""
    extra = ["--context", context, "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    extra += ["--next-context", next_context] if next_context else []
    return run_native_runner(runner, bundle, extra=extra)
