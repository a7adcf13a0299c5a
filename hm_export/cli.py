"""``hm-export`` command line: thin wrappers over the library API."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click


def _emit(report: dict[str, Any], as_json: bool, human: str) -> None:
    click.echo(json.dumps(report, indent=2, default=str) if as_json else human)


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="hm-export")
def main() -> None:
    """Export memory-augmented language models to device bundles."""


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--target",
    default="executorch",
    show_default=True,
    help="Comma-separated: executorch, onnx, coreml, executorch-coreml.",
)
@click.option("--seq-len", type=int, default=None, help="Program sequence length (default: model max).")
@click.option(
    "--bank-scheme",
    default="float32",
    show_default=True,
    help="Bank preset: float32, float16, bfloat16, int8, int4-g32/64/128, mixed-int8-int4, or one per level.",
)
@click.option("--separate-weights", is_flag=True, help="ExecuTorch: anchor weights in a separate .ptd file.")
@click.option("--coreml-precision", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--coreml-target", type=click.Choice(["iOS17", "iOS18"]), default="iOS18", show_default=True)
@click.option(
    "--coreml-compress-anchor",
    type=click.Choice(["none", "int8", "int4-block32", "palettize4"]),
    default="none",
    show_default=True,
    help="Compress the anchor's constant weights with coremltools.optimize (the slot stays fp16).",
)
@click.option(
    "--slot-strategy",
    type=click.Choice(["auto", "host-fp32", "host-fp16", "graph-int8", "graph-int4", "fused-int8", "fused-int4"]),
    default="auto",
    show_default=True,
    help="Form of the memory slot (docs/kernels.md). auto: ExecuTorch alone with an int4/int8 bank uses the "
    "fused kernel, otherwise a float32 slot; quantized forms need a bank of that scheme.",
)
@click.option("--no-decode", is_flag=True, help="Skip the KV-cache decode programs (full-window programs only).")
@click.option(
    "--no-router-program",
    is_flag=True,
    help="Skip router/: the MiniLM router program per target and its tokenizer (devices then route from embeddings).",
)
@click.option("--checks", type=int, default=4, show_default=True, help="Golden checks recorded into checks/ (0: none).")
@click.option("--check-new-tokens", type=int, default=16, show_default=True, help="Greedy tokens per check.")
@click.option(
    "--check-contexts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines ('text' or 'tokens', optional 'context') for the checks; default: derived from the tokenizer.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def export(
    checkpoint: Path,
    out: Path,
    target: str,
    seq_len: int | None,
    bank_scheme: str,
    separate_weights: bool,
    coreml_precision: str,
    coreml_target: str,
    coreml_compress_anchor: str,
    slot_strategy: str,
    no_decode: bool,
    no_router_program: bool,
    checks: int,
    check_new_tokens: int,
    check_contexts: Path | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Export CHECKPOINT (a checkpoint directory) into the bundle directory OUT."""
    from hm_export.export import ExportRecipe, export_bundle
    from hm_export.targets import EmitOptions

    try:
        options = EmitOptions(separate_weights, coreml_precision, coreml_target, coreml_compress_anchor, slot_strategy)
        recipe = ExportRecipe(
            tuple(target.split(",")),
            seq_len,
            bank_scheme,
            options,
            decode=not no_decode,
            router_program=not no_router_program,
            checks=checks,
            check_new_tokens=check_new_tokens,
            check_contexts=check_contexts,
        )
        report = export_bundle(checkpoint, out, recipe, overwrite=overwrite, progress=not as_json)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report.sizes.items())
    _emit(report.to_dict(), as_json, f"wrote {out} in {report.seconds['total']} s: {sizes}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--context", required=True, help="Text that selects the memory path.")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: all).")
@click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same text).")
@click.option("--stop-token", "stop_tokens", type=int, multiple=True, help="Token id that ends generation (repeat).")
@click.option("--target", default="executorch", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report at the end instead of streaming.")
def run(
    bundle: Path,
    context: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop_tokens: tuple[int, ...],
    target: str,
    as_json: bool,
) -> None:
    """Route CONTEXT, load its memory, and continue PROMPT, streaming the text as it is generated."""
    from hm_export.runtime_stubs.generate import Sampling
    from hm_export.runtime_stubs.loader import BundleLoader, complete

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)

    try:
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
        loader = BundleLoader(bundle, target=target)
        if not as_json:
            click.echo(prompt, nl=False)
        result = complete(loader, context, prompt, sampling=sampling, on_text=None if as_json else stream)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    if as_json:
        _emit(asdict(result), True, "")
    else:
        click.echo(
            f"\n[path {list(result.context_path)}, {len(result.new_tokens)} tokens, {result.stop_reason}; "
            f"{result.program} program: prefill {result.prefill_tokens_per_s:.0f} tok/s, "
            f"decode {result.decode_tokens_per_s:.0f} tok/s]",
            err=True,
        )


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--contexts",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON lines with 'text' (or 'tokens') and optional 'context'.",
)
@click.option("-n", "limit", type=int, default=64, show_default=True, help="Contexts to check.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Max |logit diff|.")
@click.option("--min-top1", type=float, default=1.0, show_default=True, help="Min top-1 agreement.")
@click.option("--target", default="executorch", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def verify(
    bundle: Path,
    checkpoint: Path,
    contexts: Path,
    limit: int,
    tolerance: float,
    min_top1: float,
    target: str,
    as_json: bool,
) -> None:
    """Compare BUNDLE with the eager CHECKPOINT on held-out contexts; exit 1 beyond tolerance."""
    from hm_export.verify import verify_bundle

    try:
        report = verify_bundle(bundle, checkpoint, contexts, limit, tolerance, min_top1, target, progress=not as_json)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    verdict = "PASS" if report.passed else "FAIL"
    if report.numerics != "checked":
        structure = "structure ok" if report.passed else f"structure FAILED: {report.structure}"
        _emit(report.to_dict(), as_json, f"{verdict}: {structure}; numerical checks {report.numerics}")
        sys.exit(0 if report.passed else 1)
    _emit(
        report.to_dict(),
        as_json,
        f"{verdict}: {report.contexts} contexts, {report.distinct_paths} paths, max |logit diff| "
        f"{report.max_abs_diff:.2e} (tol {tolerance:g}), top-1 {report.top1_agreement:.4f}, "
        f"bundle/eager latency {report.latency_ratio_bundle_over_eager}",
    )
    sys.exit(0 if report.passed else 1)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest: model, slot contract, bank, targets, sizes."""
    from hm_export.summary import summarize_bundle

    try:
        summary = summarize_bundle(bundle)
    except (ValueError, OSError) as exc:
        _fail(exc)
    _emit(summary, as_json, json.dumps(summary, indent=2))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", "targets", multiple=True, help="Replay only this target (repeat); default: all.")
@click.option("--json", "as_json", is_flag=True)
def check(bundle: Path, targets: tuple[str, ...], as_json: bool) -> None:
    """Replay BUNDLE's golden checks per target and program; exit 1 if any fails."""
    from hm_export.checks import run_checks

    try:
        report = run_checks(bundle, targets or None)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    lines = []
    for name, counts in report.summary().items():
        ran = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        lines.append(f"  {name:28s} {ran}")
    problems = [r for r in report.results if r.status == "fail"]
    lines += [f"  FAIL {r.target}/{r.program} {r.check}: {r.detail}" for r in problems]
    skipped = {f"{r.target}/{r.program}": r.detail for r in report.results if r.status == "skipped"}
    lines += [f"  skipped {name}: {why}" for name, why in skipped.items()]
    verdict = "PASS" if report.passed else "FAIL"
    _emit(report.to_dict(), as_json, "\n".join([f"{verdict}: {report.checks} golden checks of {bundle}", *lines]))
    sys.exit(0 if report.passed else 1)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", default="executorch", show_default=True)
@click.option("--runs", "-r", type=int, default=3, show_default=True, help="Repetitions (mean and sd over runs).")
@click.option(
    "--contexts",
    "contexts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines to switch between; default: the bundle's golden-check contexts.",
)
@click.option("-n", "count", type=int, default=8, show_default=True, help="Contexts per run.")
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=None, help="torch and ExecuTorch threads (default: torch's).")
@click.option("--cache", type=click.Choice(["stream", "default"]), default="stream", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG here.")
@click.option("--json", "as_json", is_flag=True)
def bench(
    bundle: Path,
    target: str,
    runs: int,
    contexts_file: Path | None,
    count: int,
    prompt_tokens: int,
    new_tokens: int,
    threads: int | None,
    cache: str,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Route, fetch+fill per level, time to first token after a context switch, prefill/decode tokens/s, RSS."""
    from hm_export.bench import bench_bundle, plot_report

    try:
        report = bench_bundle(bundle, target, runs, contexts_file, count, prompt_tokens, new_tokens, threads, cache)
        if plot is not None:
            plot_report(report, plot)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    _emit(report.to_dict(), as_json, _bench_table(report))


def _bench_table(report: Any) -> str:
    def lat(stats: dict[str, float]) -> str:
        return f"{stats['p50']:9.3f} {stats['p99']:9.3f}  (n={stats['n']})" if stats.get("n") else "        -"

    def rate(stats: dict[str, Any]) -> str:
        return f"{stats['mean']:9.1f} +/- {stats['sd']:.1f}"

    rows = [
        f"{report.bundle} [{report.target}, {report.program} program, {report.threads} threads, {report.runs} runs "
        f"x {report.contexts} contexts ({report.distinct_paths} paths), prompt {report.prompt_tokens}, "
        f"{report.new_tokens} new tokens, cache {report.cache_policy}]",
        f"{'':34s}{'p50 ms':>9s} {'p99 ms':>9s}",
        f"{'route (embed + descent)':34s}{lat(report.route_ms)}",
        *[f"{'fetch + fill ' + level:34s}{lat(stats)}" for level, stats in report.fetch_fill_ms.items()],
        f"{'first token after context switch':34s}{lat(report.ttft_after_switch_ms)}",
        f"{'decode step':34s}{lat(report.decode_step_ms)}",
        f"{'prefill tokens/s':34s}{rate(report.prefill_tokens_per_s)}",
        f"{'decode tokens/s':34s}{rate(report.decode_tokens_per_s)}",
        f"{'peak RSS':34s}{report.peak_rss_mb:9.1f} MB",
    ]
    return "\n".join(rows)


@main.group()
def bank() -> None:
    """Quantize, inspect and check memory bank directories."""


@bank.command("quantize")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--scheme", default="int8", show_default=True, help="Preset, or one scheme per level (comma-separated).")
@click.option("--pack", is_flag=True, help="One pack file per level instead of one file per block.")
@click.option("--workers", type=int, default=None, help="Quantizer processes (default: one per core).")
@click.option("--json", "as_json", is_flag=True)
def bank_quantize(checkpoint: Path, out: Path, scheme: str, pack: bool, workers: int | None, as_json: bool) -> None:
    """Quantize CHECKPOINT's bank into OUT (resumes an interrupted run; a finished one is left as is)."""
    from hm_export.bank import quantize_bank

    layout = "per-level" if pack else "per-block"
    try:
        report = quantize_bank(out, checkpoint, scheme, layout=layout, workers=workers, progress=not as_json)
    except (ValueError, OSError) as exc:
        _fail(exc)
    _emit(
        report.to_dict(),
        as_json,
        f"wrote {out} ({', '.join(report.level_schemes)}, {layout}): {report.blocks_written} blocks quantized, "
        f"{report.blocks_resumed} kept, {report.bank_bytes / 1e6:.1f} MB, {report.seconds} s "
        f"({report.source_gb_per_s:.2f} GB/s of input)",
    )


@bank.command("inspect")
@click.argument("bank_dir", metavar="BANK", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def bank_inspect(bank_dir: Path, as_json: bool) -> None:
    """Show BANK's format, layout, per-level schemes and sizes (reads only its index)."""
    from hm_export.bank.tools import inspect_bank

    try:
        summary = inspect_bank(bank_dir)
    except (ValueError, OSError) as exc:
        _fail(exc)
    rows = [
        f"  level {lv['level']}: {lv['nodes']} x {lv['scheme']} blocks, {lv['read_bytes_per_block']} bytes per read, "
        f"{lv['bits_per_param']} bits/param"
        for lv in summary["levels"]
    ]
    human = "\n".join(
        [
            f"{bank_dir}: {summary['scheme']} ({summary['layout']}), {summary['blocks']} blocks, "
            f"{summary['params'] / 1e6:.1f} M params, {summary['bytes_on_disk'] / 1e6:.1f} MB on disk",
            *rows,
        ]
    )
    _emit(summary, as_json, human)


@bank.command("check")
@click.argument("bank_dir", metavar="BANK", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def bank_check(bank_dir: Path, as_json: bool) -> None:
    """Verify every block's header and checksum; exit 1 if any block fails."""
    from hm_export.bank.tools import check_bank

    try:
        report = check_bank(bank_dir)
    except (ValueError, OSError) as exc:
        _fail(exc)
    lines = [
        f"{'OK' if report.ok else 'FAIL'}: {report.blocks} blocks, {report.bytes_checked / 1e6:.1f} MB in "
        f"{report.seconds} s, {len(report.failures)} failures"
    ]
    lines += [f"  {failure['error']}" for failure in report.failures]
    _emit(report.to_dict(), as_json, "\n".join(lines))
    sys.exit(0 if report.ok else 1)


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


@main.group()
def hf() -> None:
    """Post-hoc memories for Hugging Face transformers models with a gated MLP (folders or GGUF files)."""


@hf.command("families")
@click.option("--json", "as_json", is_flag=True)
def hf_families(as_json: bool) -> None:
    """How hosts are recognised, and the families the test suite exports end to end."""
    from hm_export.hf.families import TESTED_MODEL_TYPES, architecture_name

    rule = (
        "any transformers causal LM whose decoder layers carry a gated MLP, down(act(gate x) * up x) with "
        "gate_proj/up_proj/down_proj or a fused gate_up_proj, act from ACT2FN; `hm-export hf inspect HOST` tells "
        "for one model"
    )
    rows = [{"model_type": t, "architecture": architecture_name(t)} for t in TESTED_MODEL_TYPES]
    human = [f"hosts: {rule}", "tested end to end (attach, export ExecuTorch + ONNX, verify, golden checks):"]
    human += [f"  {r['architecture']:12s} model_type {r['model_type']}" for r in rows]
    _emit({"rule": rule, "tested": rows}, as_json, "\n".join(human))


def _host_options(command: Any) -> Any:
    command = click.option(
        "--gguf-file",
        default=None,
        help="With a folder as HOST: the GGUF file in it to load (else a transformers folder).",
    )(command)
    return click.argument("host", type=click.Path(exists=True, path_type=Path))(command)


@hf.command("inspect")
@_host_options
@click.option("--seq-len", type=int, default=None, help="Also check a window of this many positions.")
@click.option("--json", "as_json", is_flag=True)
def hf_inspect(host: Path, gguf_file: str | None, seq_len: int | None, as_json: bool) -> None:
    """Can HOST (a transformers folder or a .gguf file) take memories? Reads its config only, no weights.

    Exits 0 with the structure found (MLP form, activation, mask, quirks), 2 naming the reason it is refused."""
    from hm_export.hf.families import inspect_host
    from hm_export.hf.intake import HostSource

    try:
        source = HostSource.locate(host, gguf_file)
        config = source.read_config()
        structure = inspect_host(config, seq_len)
        report = {"host": str(source.path), **structure.to_dict(), "source_dtype": source.source_dtype(config)}
    except (ValueError, OSError) as exc:
        _fail(exc)
    quirks = ", ".join(structure.quirks) or "none"
    _emit(
        report,
        as_json,
        f"{source.path}: {structure.architecture} ({structure.causal_lm}), MLP {structure.formula} at "
        f"{structure.layers}[i].{structure.mlp}; mask {structure.mask}; quirks: {quirks}",
    )


@hf.command("attach")
@_host_options
@click.argument("corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--branching", default="4,4", show_default=True, help="Children per level (comma-separated).")
@click.option("--widths", default="64,32", show_default=True, help="Block width per level (comma-separated).")
@click.option("--layers", default="all", show_default=True, help="Memory layers (comma-separated) or 'all'.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Training window = exported window.")
@click.option("--steps", type=int, default=300, show_default=True, help="Memory training steps (0: D = 0).")
@click.option("--time-budget", type=float, default=None, help="Stop training after this many minutes.")
@click.option("--lr", type=float, default=5e-3, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=50, show_default=True, help="Steps between validations.")
@click.option(
    "--validation-docs",
    type=float,
    default=0.0,
    show_default=True,
    help="Fraction of the documents held out whole (never trained) to validate on unseen documents.",
)
@click.option(
    "--early-stopping",
    type=click.Choice(["validation", "documents", "both"]),
    default="both",
    show_default=True,
    help="Keep the bank of the best NLL on validation windows, held-out documents, or their mean.",
)
@click.option(
    "--host-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="dtype the host is stored in (default: the source's; a GGUF's dequantized weights: float32).",
)
@click.option(
    "--bank-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype the bank is stored in (export quantizes it with --bank-scheme).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout (progress stays on stderr).")
def hf_attach(
    host: Path,
    gguf_file: str | None,
    corpus: Path,
    out: Path,
    branching: str,
    widths: str,
    layers: str,
    seq_len: int,
    steps: int,
    time_budget: float | None,
    lr: float,
    batch: int,
    seed: int,
    eval_every: int,
    validation_docs: float,
    early_stopping: str,
    host_dtype: str | None,
    bank_dtype: str,
    as_json: bool,
) -> None:
    """Attach memories to HOST (a transformers folder, a .gguf file, or a folder with --gguf-file), train them
    on CORPUS (JSON lines with 'text' and optional 'context'), host frozen, and write a checkpoint to --out."""
    from hm_export.hf.recipe import MemoryRecipe, train_memories_from_source

    try:
        recipe = MemoryRecipe(
            branching=_ints(branching),
            widths=_ints(widths),
            layers=None if layers == "all" else _ints(layers),
            max_seq_len=seq_len,
            steps=steps,
            lr=lr,
            batch=batch,
            seed=seed,
            storage_dtype=bank_dtype,
            host_dtype=host_dtype,
            max_seconds=None if time_budget is None else time_budget * 60,
            eval_every=eval_every,
            validation_documents=validation_docs,
            early_stopping=early_stopping,  # type: ignore[arg-type]
        )
        report = train_memories_from_source(host, corpus, out, recipe, gguf_file)
    except (ValueError, OSError) as exc:
        _fail(exc)
    lines = [
        f"wrote {out} ({report.architecture}, {report.bank_params / 1e6:.2f} M bank params, memory "
        f"{100 * report.memory_share_of_ffn:.1f} % of the FFN width; {report.steps} steps, "
        f"kept step {report.kept_step})"
    ]
    labels = {"validation": "validation windows", "documents": "held-out documents", "test": "test windows"}
    for name, nll in report.held_out_nll.items():
        label = labels[name]
        lines.append(
            f"  {label}: NLL host {nll['host']:.4f} -> with memory {nll['host_with_memory']:.4f} "
            f"(perplexity {100 * nll['perplexity_change']:+.1f} %)"
        )
    _emit(report.to_dict(), as_json, "\n".join(lines))


@main.group()
def native() -> None:
    """Build and run the native (C++) runtime of runtime_stubs/cpp against the executorch wheel."""


@native.command("build")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/native"))
def native_build(build_dir: Path) -> None:
    """Configure and build the library and hm_runner; print the runner's path."""
    from hm_export.native import build_native_runner

    try:
        click.echo(build_native_runner(build_dir))
    except (RuntimeError, OSError) as exc:
        _fail(exc)


@native.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/native"))
@click.option("--embed", is_flag=True, help="Embed the checks' contexts here (MiniLM) and route them natively.")
@click.option(
    "--route-on-device",
    is_flag=True,
    help="Route the checks from their text with the bundle's router program (native tokenizer + MiniLM .pte).",
)
@click.option("--bench", "run_bench", is_flag=True, help="Also run the benchmark (hm-export bench fields).")
@click.option("--runs", "-r", type=int, default=3, show_default=True)
@click.option("-n", "count", type=int, default=8, show_default=True, help="Contexts per run.")
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--cache", type=click.Choice(["stream", "default"]), default="stream", show_default=True)
@click.option("--threads", type=int, default=None, help="XNNPACK threads (default: ExecuTorch's).")
@click.option("--json", "as_json", is_flag=True)
def native_run(
    bundle: Path,
    build_dir: Path,
    embed: bool,
    route_on_device: bool,
    run_bench: bool,
    runs: int,
    count: int,
    prompt_tokens: int,
    new_tokens: int,
    cache: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Replay BUNDLE's golden checks with the native runtime (and benchmark it); exit 1 if a check fails."""
    from hm_export.native import run_native

    settings: dict[str, Any] = {"runs": runs, "contexts": count, "prompt_tokens": prompt_tokens}
    settings.update(new_tokens=new_tokens, cache=cache)
    try:
        if embed and route_on_device:
            raise ValueError("--embed and --route-on-device both route the checks: give one")
        report = run_native(bundle, build_dir, True, embed, settings if run_bench else None, threads, route_on_device)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(exc)
    checks = report["checks"]
    lines = [f"{'PASS' if checks['passed'] else 'FAIL'}: {checks['pass']} of {len(checks['results'])} golden checks"]
    for r in checks["results"]:
        lines.append(f"  {r['check']}: {r['status']} (max |diff| {r['max_abs_diff']:.3g}, {r['detail']})")
    if "routing" in report:
        routing = report["routing"]
        lines.append(
            f"routed on device: {routing['routes_matched']}/{routing['contexts']} routes equal to Python's, "
            f"{routing['tokens_matched']}/{routing['tokens_total']} greedy tokens; min cosine to the Python MiniLM "
            f"{routing['min_cosine']:.6f}, min route margin {routing['min_route_margin']:.4f}"
        )
    if "bench" in report:
        lines.append(json.dumps(report["bench"], indent=2))
    _emit(report, as_json, "\n".join(lines))
    sys.exit(0 if checks["passed"] else 1)
