"""``export``: checkpoint -> bundle (programs with a memory slot, bank files, router, tokenizer, manifest)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hm_export import __version__
from hm_export.anchor_quant import check_preset as check_anchor_quant
from hm_export.anchor_quant import exported_model, get_preset
from hm_export.architectures import MemoryModel
from hm_export.atomic import atomic_directory, check_replaceable
from hm_export.bank import BankIndex, BankReader, check_preset, resolve_preset, write_bank
from hm_export.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    file_record,
    is_bundle,
    list_files,
    sha256_file,
    toolchain_versions,
    write_manifest,
)
from hm_export.checkpoint import ROUTER_FILE, TOKENIZER_FILE, Checkpoint, load_checkpoint
from hm_export.checks import CHECKS_DIR, check_contexts, check_lengths, record_checks
from hm_export.console import progress_bar
from hm_export.decode import CacheSpec
from hm_export.errors import UsageError
from hm_export.integrity import seal_body
from hm_export.kernels.strategies import SlotLayout, check_strategy, layout_record, resolve_layout
from hm_export.passes.pipeline import PIPELINES
from hm_export.router import Embedder, MiniLMEmbedder
from hm_export.router_program import emit_router_programs, router_files
from hm_export.runtime_stubs.block_cache import SlotFiller
from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT, SlotContract
from hm_export.targets import TARGETS, DecodeSupport, EmitOptions, Target
from hm_export.trace import SlotProgram, trace_decode_program, trace_slot_program

BANK_DIR = "bank"


@dataclass(frozen=True)
class ExportRecipe:
    """What to build. ``seq_len`` defaults to the model's ``max_seq_len``; ``bank_scheme`` is a bank preset
    (``float32``, ``int8``, ``int4-g32``, ``mixed-int8-int4``, ... or one scheme per level, comma-separated).

    ``decode``: emit the KV-cache decode program (``{target}/decode.*``) for targets that have one; it is then
    the target's only program (prefill, decode and the window logits of the checks, see docs/bundle-format.md)
    and the anchor's weights are stored once per target.  Without it (or for a target without a decode program)
    the full-window program ``{target}/model.*`` is emitted instead.
    ``router_program``: also emit the router's embedder (all-MiniLM-L6-v2) and its tokenizer under ``router/``
    for every target that has a router program (:mod:`hm_export.router_program`), so a device routes from text.
    ``checks``: golden checks recorded into ``checks/`` (0: none), each continuing its prompt by
    ``check_new_tokens`` greedy tokens; their contexts come from ``check_contexts`` (JSON lines like
    ``verify``'s) or, without it, are derived from the tokenizer (:func:`hm_export.checks.derive_contexts`).
    """

    targets: tuple[str, ...] = ("executorch",)
    seq_len: int | None = None
    bank_scheme: str = "float32"
    options: EmitOptions = field(default_factory=EmitOptions)
    decode: bool = True
    router_program: bool = True
    checks: int = 4
    check_new_tokens: int = 16
    check_contexts: Path | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UsageError(f"unknown targets {unknown or self.targets}; available: {sorted(TARGETS)}")
        check_preset(self.bank_scheme)
        check_strategy(self.options.slot_strategy, self.targets)
        check_anchor_quant(self.options.anchor_quant, self.targets)
        if self.checks < 0 or self.check_new_tokens < 1:
            raise UsageError(f"checks ({self.checks}) must be >= 0 and check_new_tokens ({self.check_new_tokens}) >= 1")


@dataclass
class ExportReport:
    bundle: str
    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    slot_schema_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _emit_decode(
    target: Target,
    support: DecodeSupport,
    model: MemoryModel,
    layout: SlotLayout,
    contract: SlotContract,
    out_dir: Path,
    options: EmitOptions,
    traced: dict[tuple[Any, ...], SlotProgram],
) -> dict[str, Any]:
    """Trace (once per pipeline, cache form, attention and cache dtype, cached in ``traced``) and emit ``target``'s
    decode program."""
    # The attention kernel has no logit soft-capping: such a host (Gemma 2) attends with masks on every target.
    attention = support.attention if support.attention != "kernel" or model.kernel_attention else "masked"
    cache_dtype = get_preset(options.anchor_quant).kv_cache if attention == "kernel" else "float32"
    key = (target.pipeline, support.cache, attention, cache_dtype, support.prefill, id(model))
    if key not in traced:
        pipeline = PIPELINES[target.pipeline]
        traced[key] = trace_decode_program(
            model,
            contract,
            pipeline,
            support.cache,
            layout=layout,
            attention=attention,  # type: ignore[arg-type]
            prefill=support.prefill,
            cache_dtype=cache_dtype,
        )
    program = traced[key]
    emitted = support.emit(program, out_dir / target.directory, options)
    emitted["files"] = {role: f"{target.directory}/{f}" for role, f in emitted["files"].items()}
    emitted["io"] = program.io_dict()
    emitted["cache"] = {**CacheSpec.for_model(model.cfg, cache_dtype).to_dict(), "form": support.cache}
    emitted["attention"] = attention
    emitted["pipeline"] = {"name": target.pipeline, "passes": [asdict(r) for r in program.pass_records]}
    return emitted


@dataclass
class _Build:
    """One export in progress: what the stages read and what they add, inside the temporary bundle ``tmp``."""

    checkpoint_dir: Path
    recipe: ExportRecipe
    embedder: Embedder | None
    ckpt: Checkpoint
    seq_len: int
    layout: SlotLayout
    contract: SlotContract
    check_pairs: list[Any] = field(default_factory=list)
    check_new_tokens: int = 0
    quantized: MemoryModel | None = None  # the eager model "as exported" by the ExecuTorch target
    quantization: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    check_models: dict[str, MemoryModel] = field(default_factory=dict)  # targets computing other than `quantized`
    router_programs: dict[str, Any] = field(default_factory=dict)
    index: BankIndex | None = None
    checks: dict[str, Any] | None = None
    listed: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, checkpoint_dir: Path, recipe: ExportRecipe, embedder: Embedder | None) -> _Build:
        """Stage ``load``: the checkpoint, the slot layout and contract, the golden checks' contexts (a bad file
        fails before minutes of lowering) and the anchor as the ExecuTorch target quantizes it."""
        ckpt = load_checkpoint(checkpoint_dir)
        seq_len = ckpt.config.max_seq_len if recipe.seq_len is None else recipe.seq_len
        if not 1 <= seq_len <= ckpt.config.max_seq_len:
            raise UsageError(f"seq_len {seq_len} must be in [1, {ckpt.config.max_seq_len}]")
        levels = resolve_preset(recipe.bank_scheme, ckpt.config.memory.num_levels)
        layout = resolve_layout(recipe.options.slot_strategy, recipe.targets, ckpt.config, levels)
        build = cls(checkpoint_dir, recipe, embedder, ckpt, seq_len, layout, layout.contract(ckpt.config, seq_len))
        if recipe.checks:
            prompt_tokens, build.check_new_tokens = check_lengths(
                seq_len, ckpt.config.max_seq_len, recipe.check_new_tokens
            )
            build.check_pairs = check_contexts(recipe.check_contexts, ckpt.tokenizer, recipe.checks, prompt_tokens)
        # The ExecuTorch target quantizes the anchor before tracing (torchao); the eager model it traces is also
        # what its golden checks record ("as exported"). The other targets quantize their emitted float program.
        build.quantized, build.quantization = exported_model(ckpt.model, get_preset(recipe.options.anchor_quant))
        return build

    def emit_target(self, name: str, tmp: Path, traced: dict[tuple[Any, ...], SlotProgram]) -> None:
        """Stage ``<target>``: the target's program (its decode program when it has one: then its only one), traced
        once per distinct pass pipeline and model (``traced``), with its anchor quantization record."""
        target, recipe = TARGETS[name], self.recipe
        model = self.quantized if name == "executorch" else self.ckpt.model
        assert model is not None
        if recipe.decode and target.decode is not None:  # one program: the decode program serves the window
            decode = _emit_decode(target, target.decode, model, self.layout, self.contract, tmp, recipe.options, traced)
            emitted = {key: decode[key] for key in ("runtime", "backend") if key in decode}
            emitted.update({"files": {}, "window": "decode", "decode": decode})
        else:
            key = (target.pipeline, id(model))
            if key not in traced:
                traced[key] = trace_slot_program(model, self.contract, PIPELINES[target.pipeline], self.layout)
            program = traced[key]
            emitted = target.emit(program, tmp / target.directory, recipe.options)
            emitted["files"] = {role: f"{target.directory}/{f}" for role, f in emitted["files"].items()}
            emitted["pipeline"] = {"name": target.pipeline, "passes": [asdict(r) for r in program.pass_records]}
        program_entry = emitted.get("decode", emitted)
        dequantized = program_entry.pop("_dequantized", None)  # ONNX: its weight-only quantized values
        if name == "executorch":
            program_entry.pop("anchor_quant", None)
            emitted["anchor_quant"] = self.quantization
        else:
            emitted["anchor_quant"] = program_entry.pop("anchor_quant", {"preset": recipe.options.anchor_quant})
        if dequantized is not None:  # the eager model this target's program computes (its own checks)
            from hm_export.targets.onnx_quant import as_exported

            self.check_models[name] = as_exported(self.ckpt.model, dequantized)
        self.targets[name] = emitted

    def emit_router(self, tmp: Path) -> None:
        """Stage ``router``: the router's embedder program per target (``router/``)."""
        minilm = self.embedder if isinstance(self.embedder, MiniLMEmbedder) else None
        self.router_programs = emit_router_programs(tmp, self.recipe.targets, minilm)

    def write_bank(self, tmp: Path, progress: bool) -> None:
        """Stage ``bank``: the quantized per-block files and their index (streaming)."""
        self.index = write_bank(tmp / BANK_DIR, self.checkpoint_dir, scheme=self.recipe.bank_scheme, progress=progress)
        self.listed += [f"{BANK_DIR}/index.json"]

    def record_checks(self, tmp: Path) -> None:
        """Stage ``checks``: golden checks of the model as exported, filled from the bundle's own bank; a target
        that computes differently (ONNX's weight-only quantization) records its own."""
        if not self.recipe.checks:
            return
        filler = SlotFiller(self.contract, BankReader(tmp / BANK_DIR), layout=self.layout)
        ckpt, scheme = self.ckpt, self.recipe.bank_scheme
        try:
            embedder = self.embedder or MiniLMEmbedder()
            pairs, new_tokens = self.check_pairs, self.check_new_tokens
            self.checks = record_checks(
                ckpt.model, ckpt.tree, embedder, filler, pairs, new_tokens, tmp, scheme, anchor=self.quantized
            )
            self.listed += [self.checks["file"], self.checks["expected"]]
            for name, model in self.check_models.items():
                directory = f"{CHECKS_DIR}/{name}"
                own = record_checks(
                    ckpt.model, ckpt.tree, embedder, filler, pairs, new_tokens, tmp, scheme, directory, model
                )
                self.targets[name]["checks"] = own
                self.listed += [own["file"], own["expected"]]
        finally:
            filler.blocks.close()

    def write_manifest(self, tmp: Path, sign_key: Path | None) -> dict[str, dict[str, Any]]:
        """Stage ``manifest``: tokenizer and router files copied, every file listed with its size and sha256, the
        manifest written and sealed (signed with ``sign_key``). Returns the listed files."""
        assert self.index is not None
        ckpt, recipe, contract = self.ckpt, self.recipe, self.contract
        shutil.copyfile(self.checkpoint_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        shutil.copyfile(self.checkpoint_dir / ROUTER_FILE, tmp / ROUTER_FILE)
        listed = [TOKENIZER_FILE, ROUTER_FILE, *router_files(self.router_programs), *self.listed]
        listed += [f for t in self.targets.values() for f in t["files"].values()]
        listed += [f for t in self.targets.values() if "decode" in t for f in t["decode"]["files"].values()]
        files = {f: file_record(tmp, f) for f in list_files(tmp, listed)}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": ckpt.config.to_dict(),
            "tokenizer": {"file": TOKENIZER_FILE},
            "router": {
                "file": ROUTER_FILE,
                "embedder": "all-MiniLM-L6-v2",
                "dim": ckpt.tree.dim,
                "pooling": "mean",
                "normalize": True,
                "descent": "greedy-l2",
                **self.router_programs,
            },
            "slot": {**contract.to_dict(), **layout_record(self.layout)},
            "io": {"inputs": [TOKENS_INPUT, *contract.input_names], "outputs": [LOGITS_OUTPUT]},
            "bank": {
                "dir": BANK_DIR,
                "index": f"{BANK_DIR}/index.json",
                "scheme": recipe.bank_scheme,
                "levels": [s.name for s in self.index.level_schemes],
                "schema_hash": self.index.schema_hash,
            },
            "targets": self.targets,
            **({"checks": self.checks} if self.checks else {}),
            "files": files,
            "source": {
                "checkpoint": str(self.checkpoint_dir),
                "config_sha256": sha256_file(self.checkpoint_dir / "config.json"),
                "storage_dtype": ckpt.storage_dtype,
                "anchor_dtype": ckpt.anchor_dtype,
                **({"host": ckpt.metadata["host"]} if isinstance(ckpt.metadata.get("host"), dict) else {}),
            },
            "versions": {**toolchain_versions(), "hm-export": __version__},
        }
        write_manifest(tmp, manifest, sign_key)
        return files


def export_stages(recipe: ExportRecipe) -> list[str]:
    """The named stages of an export, in order: ``load``, one per target, ``router`` (with router programs),
    ``bank``, ``checks``, ``manifest`` (the progress bar and ``ExportReport.seconds`` use these names)."""
    return ["load", *recipe.targets, *(["router"] if recipe.router_program else []), "bank", "checks", "manifest"]


def export_bundle(
    checkpoint_dir: Path,
    out: Path,
    recipe: ExportRecipe = ExportRecipe(),
    overwrite: bool = False,
    progress: bool = False,
    embedder: Embedder | None = None,
    sign_key: Path | None = None,
) -> ExportReport:
    """Export ``checkpoint_dir`` into the bundle directory ``out`` (written atomically; an existing ``out``
    is replaced only with ``overwrite`` and only if it holds a bundle), stage by stage (:func:`export_stages`).

    ``embedder`` routes the golden checks' contexts (default: all-MiniLM-L6-v2, loaded only when needed);
    ``sign_key``: an Ed25519 private key (PEM) that signs the manifest (``bundle.sig``).
    """
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    for name in recipe.targets:  # a missing extra, or an OUT that may not be replaced, is said now, not after work
        TARGETS[name].check_installed()
    check_replaceable(out, overwrite, is_bundle, "bundle")
    if sign_key is not None:
        seal_body(b"", sign_key)  # a missing or unreadable key fails now
    report = ExportReport(bundle=str(out))
    bar = progress_bar(total=len(export_stages(recipe)), enabled=progress, desc="export", unit="stage")
    t0 = time.perf_counter()

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        report.seconds[name] = round(time.perf_counter() - start, 2)
        bar.update(1)
        bar.set_postfix_str(name)

    with stage("load"):
        build = _Build.load(checkpoint_dir, recipe, embedder)
    with atomic_directory(out, overwrite, replaceable=is_bundle, what="bundle") as tmp:
        traced: dict[tuple[Any, ...], SlotProgram] = {}  # one trace per pipeline and model (and cache, attention)
        for name in recipe.targets:
            with stage(name):
                build.emit_target(name, tmp, traced)
        if recipe.router_program:
            with stage("router"):
                build.emit_router(tmp)
        with stage("bank"):
            build.write_bank(tmp, progress)
        with stage("checks"):
            build.record_checks(tmp)
        with stage("manifest"):
            files = build.write_manifest(tmp, sign_key)
            report.sizes = {f: r["bytes"] for f, r in files.items()}
            report.sizes["bank_total"] = sum(p.stat().st_size for p in (tmp / BANK_DIR).rglob("*") if p.is_file())
    bar.close()
    report.targets = build.targets
    report.slot_schema_hash = build.contract.schema_hash
    report.seconds["total"] = round(time.perf_counter() - t0, 2)
    return report
