"""``hm-export`` command line: thin wrappers over the library API.

One place maps failures to exit codes (:class:`_Command`): an :class:`~hm_export.errors.HmExportError` is one
line on stderr (``error: <file>: <problem>``) and exit 2; a failed check or verification exits 1, one whose
numerics were skipped on this host exits 3 (0 with ``--allow-skipped``); click's usage errors exit 2.
Third-party warnings, logs and prints are silenced unless ``--verbose`` (:mod:`hm_export.console`); progress
bars are drawn only on a terminal, never with ``--quiet``.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from hm_export.console import Streams, library_output
from hm_export.errors import HmExportError, UsageError


class RegistryChoice(click.Choice):
    """A choice among the names of a registry (``module.attribute``: a dict or a tuple of names), read from it
    the first time click needs them (parsing the option, help), so the CLI starts without importing torch and
    no list of names is copied here."""

    def __init__(self, module: str, attribute: str, first: tuple[str, ...] = ()) -> None:
        self._source, self._names = (module, attribute, first), None
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            module, attribute, first = self._source
            self._names = (*first, *getattr(importlib.import_module(module), attribute))
        return self._names

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns the (empty) sequence it was given
        pass

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)


ANCHOR_QUANT_PRESETS = RegistryChoice("hm_export.anchor_quant", "PRESETS")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@dataclass
class _App:
    verbose: bool = False
    quiet: bool = False
    streams: Streams | None = None


def _app() -> _App:
    return click.get_current_context().find_object(_App) or _App()


def _streams() -> Streams:
    app = _app()
    return app.streams or Streams(sys.stdout, sys.stderr, False)


def _say(text: str, err: bool = False, nl: bool = True) -> None:
    """The command's own output (stdout, or stderr with ``err``), never silenced."""
    streams = _streams()
    click.echo(text, file=streams.err if err else streams.out, nl=nl)


def _note(text: str) -> None:
    """A human remark on stderr, dropped with ``--quiet``."""
    if not _app().quiet:
        _say(text, err=True)


def _emit(report: dict[str, Any], as_json: bool, human: str) -> None:
    _say(json.dumps(report, indent=2, default=str) if as_json else human)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    more = " (--verbose shows the rest)" if len(lines) > 1 and not _app().verbose else ""
    return (str(exc).strip() if _app().verbose else lines[0]) + more


class _Command(click.Command):
    """Runs the command inside :func:`~hm_export.console.library_output` and maps its failures to exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        app = ctx.find_object(_App) or _App()
        try:
            with library_output(app.verbose, app.quiet) as streams:
                app.streams = streams
                try:
                    return super().invoke(ctx)
                finally:
                    app.streams = None
        except HmExportError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            ctx.exit(2)
        except OSError as exc:  # a path the user named: unwritable output folder, disk full, ...
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if app.verbose:
                traceback.print_exc()
            click.echo(
                f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); please report it "
                "(--verbose shows the traceback)",
                err=True,
            )
            ctx.exit(2)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="hm-export")
@click.option("--verbose", "-v", is_flag=True, help="Show third-party warnings and logs, and full errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or remarks on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Export memory-augmented language models to device bundles."""
    ctx.obj = _App(verbose, quiet and not verbose)


# ---- shared options ----------------------------------------------------------------------------------------


def _split_targets(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        for name in value.split(","):
            if name.strip() and name.strip() not in out:
                out.append(name.strip())
    return tuple(out)


def _targets_callback(single: bool) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], Any]:
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
        names = _split_targets(values)
        if not names:
            return None if not single else "executorch"
        from hm_export.targets import TARGETS  # the registry: choices come from it

        unknown = [name for name in names if name not in TARGETS]
        if unknown:
            raise click.BadParameter(f"unknown {unknown}; available: {', '.join(TARGETS)}")
        if single and len(names) > 1:
            raise click.BadParameter(f"this command runs one target, got {', '.join(names)}")
        return names[0] if single else names

    return callback


def target_option(single: bool = False, default: str | None = None, help: str = "") -> Callable[..., Any]:
    """``--target``: a comma list, repeatable (``--target onnx,executorch`` == ``--target onnx --target
    executorch``), checked against the target registry."""
    return click.option(
        "--target",
        "-t",
        "target",
        multiple=True,
        default=(default,) if default else (),
        show_default=bool(default),
        callback=_targets_callback(single),
        help=help or ("Target to run." if single else "Targets (comma list, or repeat the option)."),
    )


def verify_key_option() -> Callable[..., Any]:
    return click.option(
        "--verify-key",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="HM_EXPORT_VERIFY_KEY",
        default=None,
        help="Ed25519 public key (PEM or 64 hex digits) the bundle must be signed with [env HM_EXPORT_VERIFY_KEY].",
    )


def _key(path: Path | None) -> bytes | None:
    from hm_export.integrity import public_key_bytes

    return None if path is None else public_key_bytes(path)


def _text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Command-line text (``--context``, ``--prompt``) must be valid UTF-8 (the shell may pass any bytes)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise click.BadParameter(f"not valid UTF-8 text (undecodable byte at character {exc.start})") from None
    return value


POSITIVE = click.IntRange(min=1)
BUNDLE = click.Path(exists=True, file_okay=False, path_type=Path)


# ---- export ------------------------------------------------------------------------------------------------


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@target_option(default="executorch", help="executorch, onnx, coreml, executorch-coreml (comma list, or repeat).")
@click.option("--seq-len", type=POSITIVE, default=None, help="Program sequence length (default: model max).")
@click.option(
    "--bank-scheme",
    default="float32",
    show_default=True,
    help="Bank preset: float32, float16, bfloat16, int8, int4-g32/64/128, mixed-int8-int4, or one per level.",
)
@click.option("--separate-weights", is_flag=True, help="ExecuTorch: anchor weights in a separate .ptd file.")
@click.option(
    "--coreml-precision",
    type=RegistryChoice("hm_export.targets.coreml", "PRECISIONS"),
    default="float16",
    show_default=True,
)
@click.option(
    "--coreml-target",
    type=RegistryChoice("hm_export.targets.coreml", "DEPLOYMENT_TARGETS"),
    default="iOS18",
    show_default=True,
)
@click.option(
    "--coreml-compress-anchor",
    type=RegistryChoice("hm_export.targets.coreml", "ANCHOR_COMPRESSION"),
    default="none",
    show_default=True,
    help="Compress the anchor's constant weights with coremltools.optimize (the slot stays fp16).",
)
@click.option(
    "--slot-strategy",
    type=RegistryChoice("hm_export.kernels.strategies", "STRATEGIES", first=("auto",)),
    default="auto",
    show_default=True,
    help="Form of the memory slot (docs/kernels.md). auto: ExecuTorch alone with an int4/int8 bank uses the "
    "fused kernel, otherwise a float32 slot; quantized forms need a bank of that scheme.",
)
@click.option(
    "--anchor-quant",
    type=ANCHOR_QUANT_PRESETS,
    default="none",
    show_default=True,
    help="How the anchor's weights are stored (docs/anchor-quant.md): ExecuTorch 8da via torchao + XNNPACK and a "
    "quantized embedding; ONNX weight-only MatMulNBits / GatherBlockQuantized; Core ML weight compression. "
    "-asym: llama.cpp's Q4_1 (and Q8_0 for -e8) grids on hm-export's kernels, ExecuTorch only.",
)
@click.option(
    "--no-decode",
    is_flag=True,
    help="Full-window programs instead of the KV-cache decode program (which otherwise is each target's one program).",
)
@click.option(
    "--no-router-program",
    is_flag=True,
    help="Skip router/: the MiniLM router program per target and its tokenizer (devices then route from embeddings).",
)
@click.option(
    "--checks", type=click.IntRange(min=0), default=4, show_default=True, help="Golden checks recorded (0: none)."
)
@click.option("--check-new-tokens", type=POSITIVE, default=16, show_default=True, help="Greedy tokens per check.")
@click.option(
    "--check-contexts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines ('text' or 'tokens', optional 'context') for the checks; default: derived from the tokenizer.",
)
@click.option(
    "--sign-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Ed25519 private key (PEM) that signs the manifest (see `hm-export keygen`).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a bundle (never another folder or file).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def export(
    checkpoint: Path,
    out: Path,
    target: tuple[str, ...],
    seq_len: int | None,
    bank_scheme: str,
    separate_weights: bool,
    coreml_precision: str,
    coreml_target: str,
    coreml_compress_anchor: str,
    slot_strategy: str,
    anchor_quant: str,
    no_decode: bool,
    no_router_program: bool,
    checks: int,
    check_new_tokens: int,
    check_contexts: Path | None,
    sign_key: Path | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Export CHECKPOINT (a checkpoint directory) into the bundle directory OUT."""
    from hm_export.export import ExportRecipe, export_bundle
    from hm_export.targets import EmitOptions

    options = EmitOptions(
        separate_weights, coreml_precision, coreml_target, coreml_compress_anchor, slot_strategy, anchor_quant
    )
    recipe = ExportRecipe(
        target,
        seq_len,
        bank_scheme,
        options,
        decode=not no_decode,
        router_program=not no_router_program,
        checks=checks,
        check_new_tokens=check_new_tokens,
        check_contexts=check_contexts,
    )
    progress = _streams().progress
    report = export_bundle(checkpoint, out, recipe, overwrite=overwrite, progress=progress, sign_key=sign_key)
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report.sizes.items())
    _emit(report.to_dict(), as_json, f"wrote {out} in {report.seconds['total']} s: {sizes}")


# ---- signing -----------------------------------------------------------------------------------------------


@main.command()
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
def keygen(private_key: Path, public_key: Path) -> None:
    """Write a new Ed25519 key pair (PRIVATE_KEY readable by you only) and print the public key in hex."""
    from hm_export.integrity import generate_key

    _say(generate_key(private_key, public_key))


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def sign(bundle: Path, key: Path) -> None:
    """Sign BUNDLE's manifest with the Ed25519 private KEY (PEM); loaders check it with --verify-key."""
    from hm_export.integrity import sign_bundle

    signer = sign_bundle(bundle, key)
    _say(f"signed {bundle / 'manifest.json'} with {signer}")


# ---- run, verify, inspect, check, bench --------------------------------------------------------------------


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--context", required=True, callback=_text, help="Text that selects the memory path.")
@click.option("--prompt", required=True, callback=_text, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option(
    "--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample among the k best (0: all)."
)
@click.option(
    "--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus mass (1: all)."
)
@click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same text).")
@click.option("--stop-token", "stop_tokens", type=click.IntRange(min=0), multiple=True, help="Token id that ends it.")
@target_option(single=True, default="executorch")
@verify_key_option()
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
    verify_key: Path | None,
    as_json: bool,
) -> None:
    """Route CONTEXT, load its memory, and continue PROMPT, streaming the text as it is generated."""
    from hm_export.runtime_stubs.generate import Sampling
    from hm_export.runtime_stubs.loader import BundleLoader, complete

    def stream(piece: str) -> None:
        _say(piece, nl=False)

    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
    loader = BundleLoader(bundle, target=target, verify_key=_key(verify_key))
    if not as_json:
        _say(prompt, nl=False)
    result = complete(loader, context, prompt, sampling=sampling, on_text=None if as_json else stream)
    if as_json:
        _emit(asdict(result), True, "")
        return
    _say("")  # the text ends with a newline
    _note(
        f"[path {list(result.context_path)}, {len(result.new_tokens)} tokens, {result.stop_reason}; "
        f"{result.program} program: prefill {result.prefill_tokens_per_s:.0f} tok/s, "
        f"decode {result.decode_tokens_per_s:.0f} tok/s]"
    )


SKIPPED_EXIT = 3  # verify / check: nothing failed, but numerics were skipped on this host (see --allow-skipped)
ALLOW_SKIPPED = click.option(
    "--allow-skipped", is_flag=True, help=f"Exit 0 instead of {SKIPPED_EXIT} when numerics were skipped on this host."
)


def _exit(status: str, allow_skipped: bool) -> None:
    """Exit 0 on pass, 1 on fail, 3 when something was skipped (0 with ``--allow-skipped``)."""
    sys.exit({"pass": 0, "fail": 1}.get(status, 0 if allow_skipped else SKIPPED_EXIT))


def _distance(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return "skipped"
    text = f"max |diff| {section['max_abs']:.3g} ({section['max_rel']:.2g} of the logit scale)"
    text += f", top-1 {section['top1']:.4f}"
    if "perplexity_increase_pct" in section:
        text += f", perplexity {section['perplexity_increase_pct']:+.3f} %"
    return text + ("" if section["passed"] else "  FAIL")


@main.command()
@click.argument("bundle", type=BUNDLE)
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--contexts",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON lines with 'text' (or 'tokens'), optional 'context' and 'context_tokens'.",
)
@click.option("-n", "limit", type=POSITIVE, default=64, show_default=True, help="Contexts to check.")
@target_option(single=True, default="executorch")
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Export error: relative to the logit scale [float32 1e-4].",
)
@click.option("--atol", type=click.FloatRange(min=0), default=None, help="Export error: absolute part [float32 1e-5].")
@click.option(
    "--max-memory-error",
    type=click.FloatRange(min=0),
    default=None,
    help="Memory relative RMSE per level [per bank scheme].",
)
@click.option(
    "--max-ppl-increase",
    type=click.FloatRange(min=0),
    default=None,
    help="Perplexity increase over the checkpoint, % [per scheme].",
)
@click.option(
    "--min-top1", type=click.FloatRange(min=0), default=None, help="Top-1 agreement with the checkpoint [per scheme]."
)
@ALLOW_SKIPPED
@click.option("--json", "as_json", is_flag=True)
def verify(
    bundle: Path,
    checkpoint: Path,
    contexts: Path,
    limit: int,
    target: str,
    rtol: float | None,
    atol: float | None,
    max_memory_error: float | None,
    max_ppl_increase: float | None,
    min_top1: float | None,
    allow_skipped: bool,
    as_json: bool,
) -> None:
    """Compare BUNDLE with the float CHECKPOINT it was exported from, on held-out contexts: routes, memory,
    export, quantization and end-to-end error (docs/verify.md).  Exit 1 on failure, 3 when the target's
    numerics cannot run here (unless --allow-skipped)."""
    from hm_export.verify import verify_bundle

    overrides = {
        "rtol": rtol,
        "atol": atol,
        "memory_rmse": max_memory_error,
        "max_ppl_increase_pct": max_ppl_increase,
        "min_top1": min_top1,
    }
    report = verify_bundle(bundle, checkpoint, contexts, limit, target, overrides, progress=_streams().progress)
    perplexity = ", ".join(f"{side} {value:.4f}" for side, value in report.perplexity.items())
    lines = [
        f"{report.status.upper()}: {report.target}, {report.contexts} contexts, {report.distinct_paths} paths, "
        f"bank {','.join(report.bank_schemes)}, {report.precision} program",
        f"  routes        {report.routes['agree']} of {report.contexts} agree with the checkpoint's tree",
        "  memory        relative RMSE per level "
        + ", ".join(f"{e:.3g}" for e in report.memory["max_relative_rmse"])
        + ("" if report.memory["passed"] else "  FAIL"),
        f"  export        {_distance(report.export)}",
        f"  quantization  {_distance(report.quantization)}",
        f"  end to end    {_distance(report.end_to_end)}",
        f"  perplexity    {perplexity}",
        *[f"  FAIL {failure}" for failure in report.failures[:20]],
        *([f"  skipped: {report.skipped}"] if report.skipped else []),
    ]
    _emit(report.to_dict(), as_json, "\n".join(lines))
    _exit(report.status, allow_skipped)


@main.command()
@click.argument("bundle", type=BUNDLE)
@verify_key_option()
@click.option("--json", "as_json", is_flag=True, help="The whole summary as JSON.")
def inspect(bundle: Path, verify_key: Path | None, as_json: bool) -> None:
    """Show what a bundle holds: model, memory, slot, bank, targets, checks, signature."""
    from hm_export.summary import summarize_bundle, summary_text

    summary = summarize_bundle(bundle, _key(verify_key))
    _emit(summary, as_json, summary_text(summary))


@main.command()
@click.argument("bundle", type=BUNDLE)
@target_option(help="Replay only these targets (comma list, or repeat); default: all.")
@click.option("--full", is_flag=True, help="Check every bank block's header and CRC-32, not only the checks' blocks.")
@verify_key_option()
@ALLOW_SKIPPED
@click.option("--json", "as_json", is_flag=True)
def check(
    bundle: Path,
    target: tuple[str, ...] | None,
    full: bool,
    verify_key: Path | None,
    allow_skipped: bool,
    as_json: bool,
) -> None:
    """Replay BUNDLE's golden checks per target and program; exit 1 if any fails (damage is a FAIL row), 3 if a
    target's numerics cannot run here (unless --allow-skipped)."""
    from hm_export.checks import run_checks

    report = run_checks(bundle, target or None, verify_key=_key(verify_key), full=full)
    lines = []
    for name, counts in report.summary().items():
        ran = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        lines.append(f"  {name:28s} {ran}")
    problems = [r for r in report.results if r.status == "fail"]
    lines += [f"  FAIL {r.target}/{r.program} {r.check}: {r.detail}" for r in problems]
    skipped = {f"{r.target}/{r.program}": r.detail for r in report.results if r.status == "skipped"}
    lines += [f"  skipped {name}: {why}" for name, why in skipped.items()]
    verdict = report.status.upper()
    _emit(report.to_dict(), as_json, "\n".join([f"{verdict}: {report.checks} golden checks of {bundle}", *lines]))
    _exit(report.status, allow_skipped)


@main.command()
@click.argument("bundle", type=BUNDLE)
@target_option(single=True, default="executorch")
@click.option("--runs", "-r", type=POSITIVE, default=3, show_default=True, help="Repetitions (mean and sd over runs).")
@click.option(
    "--contexts",
    "contexts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON lines to switch between; default: the bundle's golden-check contexts.",
)
@click.option("-n", "count", type=POSITIVE, default=8, show_default=True, help="Contexts per run.")
@click.option("--prompt-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--new-tokens", type=POSITIVE, default=32, show_default=True)
@click.option("--threads", type=POSITIVE, default=None, help="torch and ExecuTorch threads (default: torch's).")
@click.option("--cache", type=RegistryChoice("hm_export.bench", "CACHE_POLICIES"), default="stream", show_default=True)
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
    from hm_export.bench import bench_bundle, check_plot_target, plot_report

    if plot is not None:
        check_plot_target(plot)  # before the benchmark, not after it
    report = bench_bundle(bundle, target, runs, contexts_file, count, prompt_tokens, new_tokens, threads, cache)
    if plot is not None:
        plot_report(report, plot)
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


# ---- bank --------------------------------------------------------------------------------------------------


@main.group()
def bank() -> None:
    """Quantize, inspect and check memory bank directories."""


@bank.command("quantize")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--scheme", default="int8", show_default=True, help="Preset, or one scheme per level (comma-separated).")
@click.option("--pack", is_flag=True, help="One pack file per level instead of one file per block.")
@click.option("--workers", type=POSITIVE, default=None, help="Quantizer processes (default: one per core).")
@click.option("--json", "as_json", is_flag=True)
def bank_quantize(checkpoint: Path, out: Path, scheme: str, pack: bool, workers: int | None, as_json: bool) -> None:
    """Quantize CHECKPOINT's bank into OUT (resumes an interrupted run; a finished one is left as is)."""
    from hm_export.bank import quantize_bank

    layout = "per-level" if pack else "per-block"
    progress = _streams().progress
    report = quantize_bank(out, checkpoint, scheme, layout=layout, workers=workers, progress=progress)
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

    summary = inspect_bank(bank_dir)
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

    report = check_bank(bank_dir)
    lines = [
        f"{'OK' if report.ok else 'FAIL'}: {report.blocks} blocks, {report.bytes_checked / 1e6:.1f} MB in "
        f"{report.seconds} s, {len(report.failures)} failures"
    ]
    lines += [f"  {failure['error']}" for failure in report.failures]
    _emit(report.to_dict(), as_json, "\n".join(lines))
    sys.exit(0 if report.ok else 1)


# ---- Hugging Face hosts ------------------------------------------------------------------------------------


STORED_DTYPE = RegistryChoice("hm_export.checkpoint", "STORAGE_DTYPES")  # a checkpoint's stored dtypes


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {value!r}") from None


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
@click.option("--seq-len", type=POSITIVE, default=None, help="Also check a window of this many positions.")
@click.option("--json", "as_json", is_flag=True)
def hf_inspect(host: Path, gguf_file: str | None, seq_len: int | None, as_json: bool) -> None:
    """Can HOST (a transformers folder or a .gguf file) take memories? Reads its config only, no weights.

    Exits 0 with the structure found (MLP form, activation, mask, quirks), 2 naming the reason it is refused."""
    from hm_export.hf.families import inspect_host
    from hm_export.hf.intake import HostSource

    source = HostSource.locate(host, gguf_file)
    config = source.read_config()
    structure = inspect_host(config, seq_len)
    report = {"host": str(source.path), **structure.to_dict(), "source_dtype": source.source_dtype(config)}
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
@click.option("--seq-len", type=POSITIVE, default=128, show_default=True, help="Training window = exported window.")
@click.option("--steps", type=click.IntRange(min=0), default=300, show_default=True, help="Training steps (0: D = 0).")
@click.option(
    "--time-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop training after this many minutes (the schedule decays by then).",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option("--batch", type=POSITIVE, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=POSITIVE, default=50, show_default=True, help="Steps between validations.")
@click.option(
    "--validation-docs",
    type=click.FloatRange(min=0, max=0.5, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of the documents held out whole (never trained) to validate on unseen documents.",
)
@click.option(
    "--early-stopping",
    type=RegistryChoice("hm_export.hf.recipe", "EARLY_STOPPING"),
    default="both",
    show_default=True,
    help="Keep the bank of the best NLL on validation windows, held-out documents, or their mean.",
)
@click.option(
    "--host-dtype",
    type=STORED_DTYPE,
    help="dtype the host is stored in (default: the source's; a GGUF's dequantized weights: float32).",
)
@click.option(
    "--bank-dtype",
    type=STORED_DTYPE,
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

    recipe = MemoryRecipe(
        branching=_ints(branching, "--branching"),
        widths=_ints(widths, "--widths"),
        layers=None if layers == "all" else _ints(layers, "--layers"),
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
    report = train_memories_from_source(host, corpus, out, recipe, gguf_file, log=_note, progress=_streams().progress)
    lines = [
        f"wrote {out} ({report.architecture}, {report.bank_params / 1e6:.2f} M bank params, memory "
        f"{100 * report.memory_share_of_ffn:.1f} % of the FFN width; {report.steps} steps, "
        f"kept step {report.kept_step})"
    ]
    labels = {"validation": "validation windows", "documents": "held-out documents", "test": "test windows"}
    for name, nll in report.held_out_nll.items():
        lines.append(
            f"  {labels[name]}: NLL host {nll['host']:.4f} -> with memory {nll['host_with_memory']:.4f} "
            f"(perplexity {100 * nll['perplexity_change']:+.1f} %)"
        )
    _emit(report.to_dict(), as_json, "\n".join(lines))


# ---- native runtime ----------------------------------------------------------------------------------------


@main.group()
def native() -> None:
    """Build and run the native (C++) runtime of runtime_stubs/cpp against the executorch wheel."""


@native.command("build")
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/native"))
def native_build(build_dir: Path) -> None:
    """Configure and build the library and hm_runner; print the runner's path."""
    from hm_export.native import build_native_runner

    _say(str(build_native_runner(build_dir)))


@native.command("run")
@click.argument("bundle", type=BUNDLE)
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/native"))
@click.option("--embed", is_flag=True, help="Embed the checks' contexts here (MiniLM) and route them natively.")
@click.option(
    "--route-on-device",
    is_flag=True,
    help="Route the checks from their text with the bundle's router program (native tokenizer + MiniLM .pte).",
)
@click.option("--bench", "run_bench", is_flag=True, help="Also run the benchmark (hm-export bench fields).")
@click.option("--runs", "-r", type=POSITIVE, default=3, show_default=True)
@click.option("-n", "count", type=POSITIVE, default=8, show_default=True, help="Contexts per run.")
@click.option("--prompt-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--new-tokens", type=POSITIVE, default=32, show_default=True)
@click.option("--cache", type=RegistryChoice("hm_export.bench", "CACHE_POLICIES"), default="stream", show_default=True)
@click.option("--threads", type=POSITIVE, default=None, help="XNNPACK threads (default: ExecuTorch's).")
@verify_key_option()
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
    verify_key: Path | None,
    as_json: bool,
) -> None:
    """Replay BUNDLE's golden checks with the native runtime (and benchmark it); exit 1 if a check fails."""
    from hm_export.native import run_native

    settings: dict[str, Any] = {"runs": runs, "contexts": count, "prompt_tokens": prompt_tokens}
    settings.update(new_tokens=new_tokens, cache=cache)
    if embed and route_on_device:
        raise UsageError("--embed and --route-on-device both route the checks: give one")
    bench = settings if run_bench else None
    report = run_native(bundle, build_dir, True, embed, bench, threads, route_on_device, verify_key)
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
