"""Golden checks that travel with a bundle: recorded at export from the checkpoint, replayed by ``hm-export check``.

At export, :func:`record_checks` takes a few held-out contexts (``--check-contexts``, or contexts derived
from the tokenizer, see :func:`derive_contexts`) and writes into ``checks/``:

* ``checks.json``: per check its routing ``context``, the routed ``path``, the ``prompt`` token ids, the
  bundle's greedy continuation (``greedy``) with the top-1 minus top-2 logit margin of every step
  (``margins``) and the float checkpoint's ``logit_scale``; the tolerances (max |logit diff| per program
  precision, ``atol + rtol * logit scale`` with the largest scale of all checks, see ``tolerance_rule``);
* ``expected.safetensors``: two digests of the prefill logits of each prompt ``[n, vocab]`` (the ``top_k``
  largest logits of every position with their token ids, every position's logsumexp, the whole logits row of
  the last position): ``check{i}.*`` from the eager model *as exported* (the checkpoint's anchor with the memory
  of the bundle's bank: what a correct runtime computes for this bundle) and ``float.check{i}.*`` from the float
  checkpoint (its own memory of the path: what was trained); and memory probes: for every bank block on a
  check's path, the checkpoint's float values at ``probe.level{l}.index`` (fixed positions of the flattened
  ``gate, up, down`` block) as ``probe.level{l}.node{n}``.

:func:`run_checks` replays them on any machine: bundle integrity (every listed file's size and sha256), every
bank block the checks depend on (all with ``full``: header and CRC-32, failures name the file), the memory of
those blocks against the checkpoint's probes (relative RMSE within the bank scheme's bound: a bank written
wrong but consistently fails here), the router (each context routes to its recorded path), then per target
and per program (full window, decode) pass / fail / skipped per check: prefill logits within tolerance of the
bundle's expected values and, for the decode program, the greedy continuation token for token; the distance
to the float checkpoint is reported too (and must be within tolerance when the memory is float32, where the
two references are the same model).  A greedy token that differs where the recorded margin is below twice the
tolerance is a near-tie, reported as a pass that stopped comparing there.  A target whose runtime does not run
on this host is skipped (with its structural check, where it has one): skipped is not passed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from tokenizers import Tokenizer

from hm_export.architectures import MemoryModel
from hm_export.bank.tools import check_bank
from hm_export.bundle import MANIFEST, file_problems, read_listed, read_manifest
from hm_export.config import LIMITS, ModelConfig
from hm_export.errors import BankError, BundleError, HmExportError, HostUnsupported, MissingExtraError, wrapped
from hm_export.formats import MAX_JSON_BYTES, Fields, read_format_json
from hm_export.formats.manifest import ChecksRef, Manifest
from hm_export.reference import (
    PROGRAM_TOLERANCE,
    as_exported,
    checkpoint_logits,
    effective_schemes,
    logit_scale,
    program_precision,
    relative_rmse,
    scheme_tolerance,
)
from hm_export.router import CentroidTree, Embedder
from hm_export.runtime_stubs.block_cache import SlotFiller
from hm_export.targets import TARGETS
from hm_export.verify import read_contexts

CHECKS_DIR = "checks"
CHECKS_FILE = f"{CHECKS_DIR}/checks.json"
EXPECTED_FILE = f"{CHECKS_DIR}/expected.safetensors"
CHECKS_FORMAT = "hm-export-checks"
CHECKS_VERSION = 1  # the checkpoint reference and probes were added as new fields: version-1 readers still work
TOP_K = 8
MAX_EXPECTED_BYTES = 1 << 32
PROMPT_TOKENS = 32  # longest prompt a check uses
PROBES = 4096  # checkpoint values kept per bank block a check depends on
FLOAT_PREFIX = "float."


def derive_contexts(tokenizer: Tokenizer, count: int, length: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` contexts of ``length`` tokens drawn uniformly (numpy seed ``seed``) from the tokenizer's
    vocabulary without its added/special tokens; each routes on its own decoded text.  Used when an export
    is given no check contexts: deterministic, and enough to prove numerics (not meaningful text)."""
    special = set(tokenizer.get_added_tokens_decoder())
    vocabulary = np.array([i for i in range(tokenizer.get_vocab_size()) if i not in special])
    rng = np.random.default_rng(seed)
    contexts = []
    for _ in range(count):
        tokens = [int(t) for t in rng.choice(vocabulary, size=length)]
        contexts.append({"tokens": tokens, "context": tokenizer.decode(tokens)})
    return contexts


def check_lengths(seq_len: int, max_seq_len: int, new_tokens: int) -> tuple[int, int]:
    """(prompt tokens, new tokens) of the checks: prompts fit the full-window program (``seq_len``) and
    prompt + continuation fit the decode program's cache (``max_seq_len``); new tokens take at most half."""
    new_tokens = min(new_tokens, max_seq_len // 2)
    return min(PROMPT_TOKENS, seq_len, max_seq_len - new_tokens), new_tokens


def check_contexts(
    contexts_file: Path | None, tokenizer: Tokenizer, count: int, length: int
) -> list[tuple[str, list[int]]]:
    """``count`` (routing context, prompt ids) pairs: from ``contexts_file`` (JSON lines as for ``verify``:
    ``text`` or ``tokens``, optional ``context``) or, without one, from :func:`derive_contexts`.  Prompts are
    cut to ``length`` tokens; a context defaults to the item's full text."""
    items = read_contexts(contexts_file)[:count] if contexts_file else derive_contexts(tokenizer, count, length)
    pairs = []
    for number, item in enumerate(items, 1):
        tokens = list(item.get("tokens") or tokenizer.encode(item["text"]).ids)
        if not tokens:
            raise BundleError(f"{contexts_file}:{number}: context has no tokens")
        context = item.get("context") or item.get("text") or tokenizer.decode(tokens)
        pairs.append((context, tokens[:length]))
    return pairs


def logits_digest(logits: torch.Tensor, top_k: int = TOP_K) -> dict[str, torch.Tensor]:
    """What a check keeps of prefill logits ``[n, vocab]``: top-k ids/values per position, logsumexp per
    position, and the last position's full row."""
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return {
        "topk_ids": top.indices.contiguous(),
        "topk_values": top.values.contiguous(),
        "logsumexp": logits.logsumexp(-1).contiguous(),
        "last_logits": logits[-1].contiguous(),
    }


def probe_positions(level: int, size: int) -> np.ndarray:
    """Sorted positions (int64) of a level's probes in a flattened block of ``size`` values: :data:`PROBES`
    of them (all when the block is smaller), drawn without replacement with numpy seed ``level``."""
    positions = np.random.default_rng(level).choice(size, min(PROBES, size), replace=False)
    return np.sort(positions).astype(np.int64)


def _flat_block(gate: Any, up: Any, down: Any) -> np.ndarray:
    """A block's values in probe order: ``gate``, ``up``, ``down`` flattened (slot layout)."""
    return np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in (gate, up, down)])


def check_blocks(paths: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The bank blocks ``(level, node)`` the checks on ``paths`` depend on, sorted."""
    return sorted({(level, int(node)) for path in paths for level, node in enumerate(path)})


@torch.no_grad()
def record_checks(
    model: MemoryModel,
    tree: CentroidTree,
    embedder: Embedder,
    filler: SlotFiller,
    pairs: Sequence[tuple[str, list[int]]],
    new_tokens: int,
    root: Path,
    bank_scheme: str,
    directory: str = CHECKS_DIR,
    anchor: MemoryModel | None = None,
) -> dict[str, Any]:
    """Write ``checks.json`` and ``expected.safetensors`` into ``directory`` of the bundle ``root`` for ``pairs``;
    returns the manifest's ``checks`` entry.

    ``model`` is the checkpoint's float model and ``filler`` fills the slot from the bundle's bank: the bundle's
    expected values come from :func:`~hm_export.reference.as_exported` (``anchor``, the eager model as exported:
    a quantized anchor's dequantized weights, default ``model``; the memory exactly as the bundle stores it), the
    checkpoint's from the float model's own memory of each path.  A target whose program computes differently
    records its own checks in its own ``directory`` (``targets.<t>.checks``).
    """
    eager = as_exported(model, filler, anchor)
    paths = tree.route(embedder.embed([context for context, _ in pairs]))
    checks, tensors, scales = [], {}, []
    for index, ((context, prompt), path) in enumerate(zip(pairs, paths)):
        filler.set_path(path)
        tokens = torch.tensor([prompt])
        floating = checkpoint_logits(model, tokens, path)[0]
        for key, value in logits_digest(eager(tokens)[0]).items():
            tensors[f"check{index}.{key}"] = value
        for key, value in logits_digest(floating).items():
            tensors[f"{FLOAT_PREFIX}check{index}.{key}"] = value
        scales.append(logit_scale(floating))
        sequence, margins = list(prompt), []
        for _ in range(new_tokens):
            top = eager(torch.tensor([sequence]))[0, -1].topk(2)
            margins.append(round(float(top.values[0] - top.values[1]), 6))
            sequence.append(int(top.indices[0]))
        checks.append(
            {
                "name": f"check{index}",
                "context": context,
                "path": [int(n) for n in path],
                "prompt": prompt,
                "greedy": sequence[len(prompt) :],
                "margins": margins,
                "logit_scale": round(scales[-1], 6),
            }
        )
    for level, node in check_blocks(paths):
        block = _flat_block(*(getattr(model.bank, m)[level][node].detach().numpy() for m in ("gate", "up", "down")))
        positions = probe_positions(level, block.size)
        tensors[f"probe.level{level}.index"] = torch.from_numpy(positions)
        tensors[f"probe.level{level}.node{node}"] = torch.from_numpy(block[positions].copy())
    scale = max(scales)
    body = {
        "format": CHECKS_FORMAT,
        "version": CHECKS_VERSION,
        "source": "check{i}: the eager model as exported (the anchor as the target stores it, the memory of this "
        "bundle's bank); float.check{i} and probe.*: the float checkpoint (its own memory)",
        "bank_scheme": bank_scheme,
        "tolerance": {precision: rule.limit(scale) for precision, rule in PROGRAM_TOLERANCE.items()},
        "tolerance_rule": {"logit_scale": scale, **{p: asdict(rule) for p, rule in PROGRAM_TOLERANCE.items()}},
        "top_k": TOP_K,
        "probes": PROBES,
        "checks": checks,
    }
    checks_file, expected_file = f"{directory}/checks.json", f"{directory}/expected.safetensors"
    (root / checks_file).parent.mkdir(parents=True, exist_ok=True)
    (root / checks_file).write_text(json.dumps(body, indent=2) + "\n")
    save_file(tensors, str(root / expected_file))
    return {"file": checks_file, "expected": expected_file, "count": len(checks), "new_tokens": new_tokens}


@dataclass
class CheckResult:
    """One line of a replay: ``target`` is a bundle target, ``bundle`` (file integrity), ``bank`` (blocks and
    their memory) or ``router``; ``program`` is ``window``, ``decode``, ``structure``, ``files``, ``blocks``,
    ``memory`` or ``route``.  ``max_abs_diff``: to the bundle's expected logits; ``checkpoint_max_abs_diff`` and
    ``checkpoint_top1``: to the float checkpoint's."""

    target: str
    program: str
    check: str
    status: str  # "pass", "fail" or "skipped"
    detail: str
    max_abs_diff: float | None = None
    tokens_matched: int | None = None
    checkpoint_max_abs_diff: float | None = None
    checkpoint_top1: float | None = None


@dataclass
class ChecksReport:
    bundle: str
    checks: int
    results: list[CheckResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``fail`` on any failure; ``skipped`` when something was skipped or no numerical replay ran; else
        ``pass``."""
        statuses = {r.status for r in self.results}
        ran = any(r.status == "pass" and r.program in ("window", "decode") for r in self.results)
        if "fail" in statuses:
            return "fail"
        return "skipped" if "skipped" in statuses or not ran else "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def summary(self) -> dict[str, dict[str, int]]:
        """Per target and program: how many checks passed, failed, were skipped."""
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            counts = out.setdefault(f"{r.target}/{r.program}", {"pass": 0, "fail": 0, "skipped": 0})
            counts[r.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "checks": self.checks,
            "status": self.status,
            "passed": self.passed,
            "skipped": {f"{r.target}/{r.program}": r.detail for r in self.results if r.status == "skipped"},
            "summary": self.summary(),
            "results": [asdict(r) for r in self.results],
        }


def _expect_tensor(
    expected: dict[str, torch.Tensor], path: Path, name: str, shape: tuple[int, ...] | None, dtype: torch.dtype
) -> torch.Tensor:
    """``expected[name]``, of ``dtype`` and ``shape`` (None: any 1-D); a BundleError naming ``path`` otherwise."""
    tensor = expected.get(name)
    if (
        tensor is None
        or tensor.dtype != dtype
        or (tensor.dim() != 1 if shape is None else tuple(tensor.shape) != shape)
    ):
        got = "missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
        raise BundleError(f"{path}: tensor {name} is {got}, expected {dtype} {list(shape) if shape else '[n]'}")
    return tensor


def load_checks(
    root: Path, manifest: Manifest, config: ModelConfig, entry: ChecksRef | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The parsed ``checks.json`` and expected tensors of a bundle whose (checked) manifest has a ``checks``
    entry (or of ``entry``, a target's own checks: ``targets.<t>.checks``); every field a replay uses is type-
    and range-checked against the model ``config`` (token ids in the vocabulary, paths of the tree's depth,
    tensor shapes), so a damaged file is a BundleError naming it and the field, never an index error later."""
    entry = entry or manifest.checks
    if entry is None:
        raise BundleError(f"{root / MANIFEST}: the bundle has no golden checks (exported with --checks 0)")
    path = root / entry.file
    data = read_listed(root, manifest, entry.file, "golden checks", MAX_JSON_BYTES)
    body = read_format_json(path, CHECKS_FORMAT, CHECKS_VERSION, BundleError, "golden checks", "version", data=data)
    fields, vocab = Fields(path, BundleError), config.vocab_size
    tolerance = fields.get(body, "tolerance", "tolerance", dict)
    for precision in PROGRAM_TOLERANCE:
        fields.get(tolerance, precision, f"tolerance.{precision}", float, 0.0, 1e6)
    top_k = min(fields.get(body, "top_k", "top_k", int, 1, 1 << 20), vocab)
    checks = fields.get(body, "checks", "checks", list)
    if len(checks) != entry.count:
        raise fields.refuse("checks", f"{len(checks)} checks, the manifest says {entry.count}")
    for index, check in enumerate(checks):
        where = f"checks[{index}]"
        fields.get(checks, index, where, dict)
        fields.get(check, "name", f"{where}.name", str)
        fields.get(check, "context", f"{where}.context", str)
        fields.ints(check, "path", f"{where}.path", 0, LIMITS["nodes"], length=config.memory.num_levels)
        prompt = fields.ints(check, "prompt", f"{where}.prompt", 0, vocab - 1)
        if not 1 <= len(prompt) <= config.max_seq_len:
            raise fields.refuse(f"{where}.prompt", f"{len(prompt)} tokens, need 1 to {config.max_seq_len}")
        greedy = fields.ints(check, "greedy", f"{where}.greedy", 0, vocab - 1)
        margins = fields.get(check, "margins", f"{where}.margins", list)
        if len(margins) != len(greedy) or len(prompt) + len(greedy) > config.max_seq_len:
            raise fields.refuse(f"{where}.margins", f"{len(margins)} margins for {len(greedy)} greedy tokens")
        for step in range(len(margins)):
            fields.get(margins, step, f"{where}.margins[{step}]", float)
    expected_path = root / entry.expected
    data = read_listed(root, manifest, entry.expected, "expected logits", MAX_EXPECTED_BYTES)
    with wrapped(expected_path, "not a safetensors file of expected logits", field="checks.expected"):
        expected = load_safetensors(data)
    if checks and f"{FLOAT_PREFIX}check0.topk_ids" not in expected:
        raise BundleError(
            f"{expected_path}: no tensor {FLOAT_PREFIX}check0.topk_ids "
            "(recorded without the checkpoint reference: re-export the bundle)"
        )
    for index, check in enumerate(checks):
        rows, k = len(check["prompt"]), top_k
        want = {
            "topk_ids": ((rows, k), torch.int64),
            "topk_values": ((rows, k), torch.float32),
            "logsumexp": ((rows,), torch.float32),
            "last_logits": ((vocab,), torch.float32),
        }
        for prefix in ("", FLOAT_PREFIX):
            for key, (shape, dtype) in want.items():
                _expect_tensor(expected, expected_path, f"{prefix}check{index}.{key}", shape, dtype)
            ids = expected[f"{prefix}check{index}.topk_ids"]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise BundleError(
                    f"{expected_path}: tensor {prefix}check{index}.topk_ids holds ids outside [0, {vocab})"
                )
    for level, node in check_blocks([c["path"] for c in checks]):
        index = _expect_tensor(expected, expected_path, f"probe.level{level}.index", None, torch.int64)
        _expect_tensor(expected, expected_path, f"probe.level{level}.node{node}", (len(index),), torch.float32)
    return body, expected


def compare_logits(got: torch.Tensor, expected: dict[str, torch.Tensor], tolerance: float) -> tuple[bool, str, float]:
    """Prefill logits ``[n, vocab]`` against a digest: (within tolerance, what differs most, max |diff|)."""
    if got.shape[0] != expected["logsumexp"].shape[0]:
        return False, f"{got.shape[0]} logits rows, expected {expected['logsumexp'].shape[0]}", float("inf")
    got = got.float()
    diffs = {
        "top-k logits": (got.gather(1, expected["topk_ids"]) - expected["topk_values"]).abs().max(),
        "logsumexp": (got.logsumexp(-1) - expected["logsumexp"]).abs().max(),
        "last-position logits": (got[-1] - expected["last_logits"]).abs().max(),
    }
    worst = max(diffs, key=lambda k: float(diffs[k]) if diffs[k] == diffs[k] else float("inf"))
    value = float(diffs[worst])
    ok = value <= tolerance  # NaN fails
    verdict = "within" if ok else "beyond"
    return ok, f"max |diff| {value:.3g} ({worst}) {verdict} tolerance {tolerance:g}", value


def compare_greedy(got: list[int], check: dict[str, Any], tolerance: float) -> tuple[bool, str, int]:
    """A greedy continuation against the recorded one: (pass, detail, tokens matched)."""
    expected, margins = check["greedy"], check["margins"]
    for step, (token, want) in enumerate(zip(got, expected)):
        if token != want:
            margin = margins[step]
            if margin <= 2 * tolerance:
                return True, f"{step} tokens equal, then a near-tie (margin {margin:.2g}): not compared further", step
            return False, f"greedy token {step} is {token}, expected {want} (margin {margin:.3g})", step
    if len(got) < len(expected):
        return False, f"stopped after {len(got)} of {len(expected)} greedy tokens", len(got)
    return True, f"{len(expected)} greedy tokens equal", len(expected)


def compare_checkpoint(
    got: torch.Tensor, expected: dict[str, torch.Tensor], tolerance: float, exact: bool
) -> tuple[bool, str, float, float]:
    """Prefill logits against the float checkpoint's digest: (pass, detail, max |diff|, top-1 agreement).  Only an
    ``exact`` (float32) memory must be within ``tolerance``; otherwise the distance is reported."""
    within, _, value = compare_logits(got, expected, tolerance)
    same_rows = got.shape[0] == expected["topk_ids"].shape[0]
    top1 = float((got.argmax(-1) == expected["topk_ids"][:, 0]).float().mean()) if same_rows else 0.0
    ok = within or not exact
    verdict = "" if not exact else " within tolerance" if within else f" beyond tolerance {tolerance:g}"
    return ok, f"checkpoint: max |diff| {value:.3g}{verdict}, top-1 {top1:.3f}", value, top1


@dataclass(frozen=True)
class _Expected:
    """What one program's replay compares with: the tensors, its tolerance, and whether the memory is exact."""

    tensors: dict[str, torch.Tensor]
    tolerance: float
    exact: bool

    def digest(self, index: int, prefix: str = "") -> dict[str, torch.Tensor]:
        head = f"{prefix}check{index}."
        return {name[len(head) :]: value for name, value in self.tensors.items() if name.startswith(head)}

    def compare(self, got: torch.Tensor, index: int) -> tuple[bool, str, float, float, float]:
        """(pass, detail, max |diff| to the bundle's values, to the checkpoint's, top-1 vs the checkpoint)."""
        ok, detail, diff = compare_logits(got, self.digest(index), self.tolerance)
        float_ok, float_detail, float_diff, top1 = compare_checkpoint(
            got, self.digest(index, FLOAT_PREFIX), self.tolerance, self.exact
        )
        return ok and float_ok, f"bundle: {detail}; {float_detail}", diff, float_diff, top1


def _skipped(target: str, program: str, body: dict, reason: Exception) -> list[CheckResult]:
    """Every check of ``body`` skipped on ``program``: its runtime does not run on this host."""
    return [CheckResult(target, program, c["name"], "skipped", str(reason)) for c in body["checks"]]


def _replay_window(loader: Any, target: str, body: dict, expected: _Expected) -> list[CheckResult]:
    try:
        loader.use_target(target)
    except (HostUnsupported, MissingExtraError) as exc:
        return _skipped(target, "window", body, exc)
    results = []
    for index, check in enumerate(body["checks"]):
        loader.set_path(check["path"])
        ok, detail, diff, float_diff, top1 = expected.compare(loader.logits(check["prompt"]), index)
        status = "pass" if ok else "fail"
        results.append(CheckResult(target, "window", check["name"], status, detail, diff, None, float_diff, top1))
    return results


def _replay_decode(loader: Any, target: str, body: dict, expected: _Expected) -> list[CheckResult]:
    from hm_export.runtime_stubs.generate import Generator, Sampling

    try:
        generator = Generator(loader, target)
    except (HostUnsupported, MissingExtraError) as exc:
        return _skipped(target, "decode", body, exc)
    results = []
    for index, check in enumerate(body["checks"]):
        loader.set_path(check["path"])
        ok, detail, diff, float_diff, top1 = expected.compare(generator.prefill(check["prompt"]), index)
        tokens = generator.generate(check["prompt"], Sampling(max_new_tokens=len(check["greedy"]))).new_tokens
        greedy_ok, greedy_detail, matched = compare_greedy(tokens, check, expected.tolerance)
        status = "pass" if ok and greedy_ok else "fail"
        detail = f"{detail}; {greedy_detail}"
        results.append(CheckResult(target, "decode", check["name"], status, detail, diff, matched, float_diff, top1))
    return results


def _structure(loader: Any, target: str) -> list[CheckResult]:
    from hm_export.runtime_stubs.loader import target_files

    check_structure = TARGETS[target].check_structure
    entry = loader.manifest.targets[target]
    if check_structure is None:
        return []
    TARGETS[target].check_installed()
    results = []
    for program, program_entry, decode in (("window", entry, False), ("decode", entry.decode, True)):
        if program_entry is None or (program == "window" and entry.window == "decode"):
            continue
        files = target_files(loader.root, loader.manifest, target, decode=decode)
        with wrapped(next(iter(files.values())), f"cannot check the {program} program's structure"):
            report = check_structure(files, loader.contract, program_entry.record)
        detail = f"{program} program: " + (
            "; ".join(report["problems"]) or "inputs, outputs, states and ops as expected"
        )
        results.append(CheckResult(target, "structure", "-", "pass" if report["passed"] else "fail", detail))
    return results


def _bank(loader: Any, body: dict, expected: dict[str, torch.Tensor], full: bool) -> list[CheckResult]:
    """Headers and CRC-32 (and sha256, opened with a trusted key) of the blocks the checks depend on (all with
    ``full``), then the memory of those blocks against the checkpoint's probes."""
    blocks = check_blocks([c["path"] for c in body["checks"]])
    scope = "every block" if full else "the blocks the checks use"
    try:
        report = check_bank(loader.bank_dir, blocks=None if full else blocks, index_sha256=loader.bank.index_sha256)
    except BankError as exc:
        return [CheckResult("bank", "blocks", "-", "fail", str(exc))]
    results = [
        CheckResult("bank", "blocks", f"level{f['level']}/node{f['node']}", "fail", f["error"]) for f in report.failures
    ]
    if not report.failures:
        sums = "CRC-32 and sha256" if loader.bank.authenticated else "CRC-32"
        detail = f"{report.blocks} blocks ({scope}): headers and {sums} match the index"
        results.append(CheckResult("bank", "blocks", "-", "pass", detail))
    damaged = {(f["level"], f["node"]) for f in report.failures}
    schemes = [s.name for s in loader.bank.schemes]
    for level, node in blocks:
        name = f"level{level}/node{node}"
        if (level, node) in damaged:
            results.append(CheckResult("bank", "memory", name, "fail", "unreadable (see bank/blocks)"))
            continue
        try:
            block = _flat_block(*loader.bank.read_block(level, node))
        except HmExportError as exc:
            results.append(CheckResult("bank", "memory", name, "fail", str(exc)))
            continue
        want = expected[f"probe.level{level}.node{node}"].numpy()
        positions = expected[f"probe.level{level}.index"].numpy()
        if positions.size and not 0 <= int(positions.min()) <= int(positions.max()) < block.size:
            detail = f"probe.level{level}.index holds positions outside the block's {block.size} values"
            results.append(
                CheckResult(
                    "bank", "memory", name, "fail", f"{loader.root / loader.manifest.checks.expected}: {detail}"
                )
            )
            continue
        got = block[positions]
        error = relative_rmse(
            float(np.square(got - want, dtype=np.float64).sum()), float(np.square(want, dtype=np.float64).sum())
        )
        bound = scheme_tolerance(schemes[level]).memory_rmse
        ok = error <= bound
        file = loader.bank_dir / loader.bank.index.entry(level, node).file
        detail = (
            f"{file}: relative RMSE {error:.3g} against the checkpoint's block at {got.size} probes "
            f"({'within' if ok else 'beyond'} the {schemes[level]} bound {bound:g})"
        )
        results.append(CheckResult("bank", "memory", name, "pass" if ok else "fail", detail))
    return results


def run_checks(
    bundle_dir: Path,
    targets: Sequence[str] | None = None,
    embedder: Embedder | None = None,
    verify_key: bytes | None = None,
    full: bool = False,
) -> ChecksReport:
    """Replay a bundle's golden checks on every target (or ``targets``) that runs on this host; ``full``: check
    every bank block's header and CRC-32, not only those of the checks' paths.

    A damaged bundle is reported, not raised: a manifest that fails its seal or its checks, a file that
    differs from the manifest, unreadable checks, a bundle the loader refuses, a damaged bank block or a
    program that fails to run each become a ``fail`` row naming the file.  Raises HmExportError only when
    ``bundle_dir`` is not a bundle at all, has no golden checks, or lacks a requested target."""
    from hm_export.runtime_stubs.loader import BundleLoader

    root = Path(bundle_dir)
    try:
        manifest = read_manifest(root, verify_key)
    except HmExportError as exc:
        if not (root / MANIFEST).exists() and not (root / MANIFEST).is_symlink():
            raise
        report = ChecksReport(str(root), 0)
        report.results.append(CheckResult("bundle", "manifest", "-", "fail", str(exc)))
        return report
    entry = manifest.checks
    if entry is None:
        raise BundleError(f"{root / MANIFEST}: the bundle has no golden checks (exported with --checks 0)")
    unknown = [t for t in targets or () if t not in manifest.targets]
    if unknown:
        raise BundleError(f"{root / MANIFEST}: no target {unknown} (bundle has {sorted(manifest.targets)})")
    report = ChecksReport(str(root), entry.count)
    problems = list(file_problems(root, manifest))
    report.results += [CheckResult("bundle", "files", "-", "fail", problem) for problem in problems]
    if not problems:
        detail = f"{len(manifest.files)} files match their sizes and sha256"
        report.results.append(CheckResult("bundle", "files", "-", "pass", detail))
    try:
        loader = BundleLoader(root, target=None, verify=False, embedder=embedder, verify_key=verify_key)
        body, expected = load_checks(root, manifest, loader.config)
    except HmExportError as exc:
        if not problems:  # a refusal already explained by a file that differs from the manifest is not repeated
            report.results.append(CheckResult("bundle", "files", "-", "fail", str(exc)))
        return report
    report.results += _bank(loader, body, expected, full)
    for check in body["checks"]:
        try:
            route = list(loader.route(check["context"]))
        except HmExportError as exc:
            report.results.append(CheckResult("router", "route", check["name"], "fail", str(exc)))
            continue
        ok = route == check["path"]
        detail = f"routes to {route}" + ("" if ok else f", recorded {check['path']}")
        report.results.append(CheckResult("router", "route", check["name"], "pass" if ok else "fail", detail))
    schemes = effective_schemes([s.name for s in loader.bank.schemes], loader.layout.strategy.storage)
    exact = all(scheme_tolerance(s).exact for s in schemes)
    bodies = {entry.file: (body, expected)}
    for target in targets or manifest.targets:
        target_entry = manifest.targets[target]
        if target not in TARGETS:
            detail = f"target {target!r} is unknown to this hm-export"
            report.results.append(CheckResult(target, "-", "-", "fail", detail))
            continue
        try:
            report.results += _structure(loader, target)
        except MissingExtraError as exc:
            report.results.append(CheckResult(target, "structure", "-", "skipped", str(exc)))
        except HmExportError as exc:
            report.results.append(CheckResult(target, "structure", "-", "fail", str(exc)))
        own = target_entry.checks or entry  # a target computing differently (quantized) has its own
        if own.file not in bodies:
            try:
                bodies[own.file] = load_checks(root, manifest, loader.config, own)
            except HmExportError as exc:
                report.results.append(CheckResult(target, "files", "-", "fail", str(exc)))
                continue
        target_body, target_expected = bodies[own.file]
        # A target whose one program is the decode program replays its prefill logits in the decode replay.
        replays = [("window", _replay_window, target_entry)] if target_entry.window != "decode" else []
        if target_entry.decode is not None:
            replays.append(("decode", _replay_decode, target_entry.decode))
        for program, replay, program_entry in replays:
            precision = program_precision(program_entry.record, target_entry.get("anchor_quant"))
            tolerance = target_body["tolerance"][precision]
            try:
                report.results += replay(loader, target, target_body, _Expected(target_expected, tolerance, exact))
            except HmExportError as exc:  # the loader names the program that failed to load or run: report, go on
                report.results.append(CheckResult(target, program, "-", "fail", str(exc)))
    return report
