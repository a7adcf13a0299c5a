"""Reference bundle loader: route a context, stream its blocks into the slot, run the program.

This is the Python reference for device-side loaders (see docs/runtime.md).  It keeps one slot
buffer per slot input for the life of the loader; :meth:`BundleLoader.set_path` fetches only the
blocks of levels whose node changed (one aligned read each, or from the level-aware cache) and
dequantizes them straight into those levels' ranges, so switching between sibling leaves touches one
small block and leaves the rest of the slot untouched.  :meth:`BundleLoader.prefetch` reads the next
context's blocks in the background while the current one is still running.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

from hm_export.bank import BankReader
from hm_export.bundle import MANIFEST, read_listed, read_manifest, safe_relative, verify_files
from hm_export.config import ModelConfig
from hm_export.decode import CacheSpec
from hm_export.errors import BankError, BundleError, HmExportError, HostUnsupported, UsageError, wrapped
from hm_export.formats.manifest import Manifest, Target
from hm_export.kernels.strategies import SlotLayout, layout_from_record
from hm_export.router import CentroidTree, Embedder, MiniLMEmbedder
from hm_export.runtime_stubs.block_cache import CachePolicy, SlotFiller, SlotUpdate
from hm_export.safeio import check_tree
from hm_export.slot import SlotContract
from hm_export.targets import TARGETS, Decoder, Runner

if TYPE_CHECKING:
    from hm_export.runtime_stubs.generate import Sampling


MAX_TOKENIZER_BYTES = 256 << 20
MAX_ROUTER_BYTES = 1 << 32


def _target_entry(root: Path, manifest: Manifest, target: str) -> Target:
    targets = manifest.targets
    if target not in targets:
        raise BundleError(f"{root / MANIFEST}: no target {target!r} (bundle has {sorted(targets)})", field="targets")
    if target not in TARGETS:
        raise UsageError(f"target {target!r} is unknown to this hm-export (known: {sorted(TARGETS)})")
    return targets[target]


class PrefillRunner:
    """The window runner of a target whose one program is its decode program (``window: "decode"`` in the
    manifest): the window's logits are a prefill from position 0, which returns every position's logits.
    Takes the tokens unpadded (``pads = False``)."""

    pads = False

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def __call__(self, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(tokens, 0, slot).unsqueeze(0)


def target_files(root: Path, manifest: Manifest, target: str, decode: bool = False) -> dict[str, Path]:
    """A target's files (role -> path inside the bundle): its full-window program, or its decode program.

    Each is a regular file inside the bundle reached through no symlink, or a directory (``.mlpackage``)
    holding only regular files and directories."""
    entry = manifest.targets[target]
    program = entry.decode if decode else entry
    if program is None:
        raise BundleError(f"{root / MANIFEST}: target {target!r} has no decode program", field=f"targets.{target}")
    what = f"{target} {'decode' if decode else 'window'} program"
    return program_files(root, manifest, program.files, what, TARGETS[target].side_files if target in TARGETS else None)


def program_files(
    root: Path,
    manifest: Manifest,
    roles: dict[str, str],
    what: str,
    side_files: Callable[[Path], set[str]] | None = None,
) -> dict[str, Path]:
    """The files of one program (role -> bundle-relative path, as a manifest entry's ``files``): each a regular
    file inside the bundle reached through no symlink, or a directory (``.mlpackage``) holding only regular
    files and directories; ``side_files`` lists what else the program makes its runtime open (ONNX external
    data), each of which must be a listed file of the bundle too."""
    files = {}
    for role, relative in roles.items():
        kind = "file" if relative in manifest.files else "dir"
        files[role] = safe_relative(root, relative, f"{what} ({role})", kind)
        if kind == "dir":
            check_tree(files[role], f"{what} ({role})")
    if side_files is not None:
        program = program_file(files)
        with wrapped(program, f"cannot read the {what}"):
            names = side_files(program)
        folder = program.parent.relative_to(root).as_posix()
        for name in sorted(names):
            relative = name if folder == "." else f"{folder}/{name}"
            if relative not in manifest.files:
                raise BundleError(f"{program}: reads {name!r}, which is not a file listed in the manifest")
            safe_relative(root, relative, f"data of {program.name}")
    return files


def program_file(files: dict[str, Path]) -> Path:
    """The file (or package) a runtime opens among a program's files."""
    return files.get("program") or files.get("package") or next(iter(files.values()))


class _CheckedProgram:
    """A runner or decoder whose every call is bounded: token ids in ``[0, vocab)`` and positions in range
    before the call, any runtime failure reported as a BundleError naming the program file, and logits of
    the model's vocabulary after it (a program that returns another shape is refused, never indexed)."""

    def __init__(self, inner: Any, program: Path, vocab: int, positions: int) -> None:
        self.inner, self.program, self.vocab, self.positions = inner, program, vocab, positions
        if hasattr(inner, "io_bounds"):  # what the program was built for must cover what the manifest says
            with wrapped(program, "cannot read the program's metadata"):
                tokens, program_vocab = inner.io_bounds()
            if program_vocab != vocab or tokens < positions:
                raise BundleError(
                    f"{program}: the program takes {tokens} positions with a vocabulary of {program_vocab}, the "
                    f"manifest says {positions} and {vocab}"
                )

    def _check(self, tokens: torch.Tensor, input_pos: int = 0) -> None:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise UsageError(f"token ids must be in [0, {self.vocab}), got {int(tokens.min())}..{int(tokens.max())}")
        if not 0 <= input_pos <= self.positions - tokens.shape[-1]:
            raise UsageError(f"positions {input_pos}..{input_pos + tokens.shape[-1]} exceed the {self.positions}")

    def _logits(self, logits: Any, rows: int) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != self.vocab or logits.shape[-2] < rows:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise BundleError(f"{self.program}: the program returned logits {shape}, expected [..., {self.vocab}]")
        return logits

    def __call__(self, tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        self._check(tokens, *args[:-1])
        with wrapped(self.program, "the program failed to run"):
            logits = self.inner(tokens, *args)
        return self._logits(logits, tokens.shape[-1])

    def last(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        """A decoder's last-position logits (:meth:`hm_export.targets.Decoder.last`), bounded as every call."""
        self._check(tokens, input_pos)
        with wrapped(self.program, "the program's prefill failed to run"):
            logits = self.inner.last(tokens, input_pos, slot)
        return self._logits(logits[None], 1)[0]

    def reset(self) -> None:
        self.inner.reset()


@dataclass(frozen=True)
class OpenBundle:
    """Open and validate: a bundle whose manifest, model config, slot contract, bank, tokenizer and router tree
    were read and checked against each other (:meth:`open`).  Every failure is an
    :class:`~hm_export.errors.HmExportError` naming the file."""

    root: Path
    manifest: Manifest
    config: ModelConfig
    contract: SlotContract
    layout: SlotLayout
    bank: BankReader
    tokenizer: Tokenizer
    tree: CentroidTree

    @classmethod
    def open(
        cls, bundle_dir: Path | str, verify: bool = True, read_mode: str = "pread", verify_key: bytes | None = None
    ) -> OpenBundle:
        """``verify``: sha256 of every listed file (``False``: trusted storage, where sizes and file types are
        still checked); ``read_mode``: the bank's (:class:`BankReader`); ``verify_key``: a trusted raw Ed25519
        public key the bundle must be signed with (:mod:`hm_export.integrity`), which also authenticates the
        bank's index and so each block's sha256."""
        root = Path(bundle_dir)
        manifest = read_manifest(root, verify_key)
        verify_files(root, manifest, hashes=verify)
        manifest_path = root / MANIFEST
        config = bundle_config(root, manifest)
        try:
            contract = SlotContract.from_dict(manifest.slot)
            layout = layout_from_record(manifest.slot)
            expected = layout.contract(config, contract.seq_len)
        except (HmExportError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BundleError(f"{manifest_path}: bad slot contract: {exc}", field="slot") from exc
        seq_len_ok = 1 <= contract.seq_len <= config.max_seq_len
        if expected.schema_hash != contract.schema_hash or not seq_len_ok:
            raise BundleError(
                f"{manifest_path}: slot contract does not match the model config and slot strategy "
                f"{layout.strategy.name!r}",
                field="slot",
            )
        bank_dir = safe_relative(root, manifest.bank.dir, "bank", kind="dir", field="bank.dir")
        index_bytes = manifest.listed_size(manifest.bank.index)
        # Only a manifest whose signature a trusted key verified (read_manifest raised otherwise) authenticates
        # the index, and through it each block's sha256; unkeyed, verified reads check the CRC-32 alone.
        index_sha256 = manifest.files[manifest.bank.index].sha256 if verify_key is not None else None
        bank = BankReader(bank_dir, read_mode, index_bytes=index_bytes, index_sha256=index_sha256)
        if bank.schema_hash != manifest.bank.schema_hash:
            raise BundleError(
                f"{bank_dir}: bank schema hash {bank.schema_hash} does not match the manifest's "
                f"{manifest.bank.schema_hash} (bank written for another model or scheme)",
                field="bank.schema_hash",
            )
        tokenizer = read_tokenizer(root, manifest, manifest.tokenizer.file, "tokenizer.file", config.vocab_size)
        return cls(root, manifest, config, contract, layout, bank, tokenizer, read_tree(root, manifest, config))

    @property
    def bank_dir(self) -> Path:
        return self.root / self.manifest.bank.dir


class ContextRouter:
    """Route: a context's memory path, from its embedding (all-MiniLM-L6-v2 unless an embedder is given, loaded
    on first use) by greedy descent of the bundle's centroid tree."""

    def __init__(self, tree: CentroidTree, embedder: Embedder | None = None) -> None:
        self.tree = tree
        self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = MiniLMEmbedder()
        return self._embedder

    def route(self, context: str) -> tuple[int, ...]:
        """The memory path of a context (one node id per level)."""
        _check_text(context, "context")
        embedding = np.asarray(self.embedder.embed([context]), dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[1] != self.tree.dim:
            shape, dim = list(embedding.shape), self.tree.dim
            raise UsageError(f"the embedder gives {shape} vectors, the router expects dim {dim}")
        return tuple(int(n) for n in self.tree.route(embedding)[0])


class TargetPrograms:
    """Run: a target's window program (:meth:`use_target`, then :meth:`logits`) or decode program
    (:meth:`open_decoder`), each call bounded (token ids, positions, logits shape; :class:`_CheckedProgram`)."""

    def __init__(self, bundle: OpenBundle) -> None:
        self.bundle = bundle
        self.runner: Runner | None = None
        self.target: str | None = None

    def _checked(self, inner: Any, files: dict[str, Path], positions: int) -> Any:
        return _CheckedProgram(inner, program_file(files), self.bundle.config.vocab_size, positions)

    def use_target(self, target: str) -> None:
        """Run programs with ``target``'s runtime (raises HostUnsupported where it cannot run)."""
        root, manifest = self.bundle.root, self.bundle.manifest
        entry = _target_entry(root, manifest, target)
        if entry.window == "decode":  # the target's one program: windows are prefills from position 0
            self.runner = PrefillRunner(self.open_decoder(target))
            self.target = target
            return
        open_runner = TARGETS[target].open_runner
        if open_runner is None:
            raise HostUnsupported(f"target {target!r} runs only on its device, not on this host")
        TARGETS[target].check_installed()
        files = target_files(root, manifest, target)
        with wrapped(program_file(files), f"cannot load the {target} program"):
            runner = open_runner(files, self.bundle.contract.input_names, entry.record)
        self.runner = self._checked(runner, files, self.bundle.contract.seq_len)
        self.target = target

    def has_decoder(self, target: str) -> bool:
        """Whether the bundle holds a KV-cache decode program for ``target``."""
        return _target_entry(self.bundle.root, self.bundle.manifest, target).decode is not None

    def open_decoder(self, target: str) -> Decoder:
        """A runner of ``target``'s decode program, fed the slot buffers by the caller.

        Raises BundleError when the bundle has no decode program for it, HostUnsupported where it cannot run.
        """
        root, manifest, config = self.bundle.root, self.bundle.manifest, self.bundle.config
        entry = _target_entry(root, manifest, target)
        support = TARGETS[target].decode
        if entry.decode is None or support is None:
            raise BundleError(f"{root / 'manifest.json'}: target {target!r} has no decode program")
        if support.open_decoder is None:
            raise HostUnsupported(f"target {target!r} decodes only on its device, not on this host")
        TARGETS[target].check_installed()
        files = target_files(root, manifest, target, decode=True)
        cache = entry.decode.get("cache")
        want = CacheSpec.for_model(config).to_dict()
        if not isinstance(cache, dict) or [cache.get(k) for k in ("layers", "shape")] != [
            want["layers"],
            want["shape"],
        ]:
            raise BundleError(
                f"{root / MANIFEST}: targets.{target}.decode.cache does not match the model config ({want})",
                field=f"targets.{target}.decode.cache",
            )
        with wrapped(program_file(files), f"cannot load the {target} decode program"):
            decoder = support.open_decoder(files, self.bundle.contract.input_names, entry.decode.record)
        return self._checked(decoder, files, config.max_seq_len)

    def logits(self, tokens: Sequence[int], slot: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of the window program for up to ``seq_len`` tokens (padded after when the
        program has a fixed length) with the memory in ``slot``."""
        if self.runner is None:
            raise UsageError("no target selected: call use_target()")
        seq_len = self.bundle.contract.seq_len
        tokens = list(tokens)[-seq_len:]
        if not tokens:
            raise UsageError("need at least one token")
        if not getattr(self.runner, "pads", True):
            return self.runner(torch.tensor([tokens]), slot)[0]
        padded = torch.zeros(1, seq_len, dtype=torch.long)
        padded[0, : len(tokens)] = torch.tensor(tokens)
        return self.runner(padded, slot)[0, : len(tokens)]


class BundleLoader:
    """A bundle ready to serve: open and validate (:class:`OpenBundle`), route contexts (:class:`ContextRouter`),
    fill the slot level by level (:class:`~hm_export.runtime_stubs.block_cache.SlotFiller`), run the program
    (:class:`TargetPrograms`), composed."""

    def __init__(
        self,
        bundle_dir: Path | str,
        target: str | None = "executorch",
        verify: bool = True,
        verify_blocks: bool = True,
        embedder: Embedder | None = None,
        cache: CachePolicy | None = None,
        read_mode: str = "pread",
        verify_key: bytes | None = None,
    ) -> None:
        """``verify``: sha256 of every listed file at open (``False``: trusted storage, where sizes and file
        types are still checked); ``verify_blocks``: CRC-32 check of every block read, and its sha256 with
        ``verify_key`` (overrides ``cache.verify``); ``cache``: resident levels and LRU cap (default
        :class:`CachePolicy`); ``read_mode``: ``pread``, ``readinto`` or ``mmap``; ``verify_key``: a trusted raw
        Ed25519 public key the bundle must be signed with (:mod:`hm_export.integrity`).  Every failure is an
        :class:`~hm_export.errors.HmExportError`."""
        self.bundle = OpenBundle.open(bundle_dir, verify, read_mode, verify_key)
        policy = replace(cache or CachePolicy(), verify=verify_blocks)
        try:
            self.filler = SlotFiller(self.contract, self.bank, policy, self.layout)
        except (BankError, ValueError) as exc:
            raise BundleError(f"{self.bank_dir}: {exc}") from exc
        self.router = ContextRouter(self.tree, embedder)
        self.programs = TargetPrograms(self.bundle)
        if target is not None:
            self.use_target(target)

    # ---- open / validate: the checked parts of the bundle ----

    @property
    def root(self) -> Path:
        return self.bundle.root

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def config(self) -> ModelConfig:
        return self.bundle.config

    @property
    def contract(self) -> SlotContract:
        return self.bundle.contract

    @property
    def layout(self) -> SlotLayout:
        return self.bundle.layout

    @property
    def bank(self) -> BankReader:
        return self.bundle.bank

    @property
    def bank_dir(self) -> Path:
        return self.bundle.bank_dir

    @property
    def tokenizer(self) -> Tokenizer:
        return self.bundle.tokenizer

    @property
    def tree(self) -> CentroidTree:
        return self.bundle.tree

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the bundle's tokenizer (UsageError for text that is not valid Unicode)."""
        _check_text(text, "text")
        return list(self.tokenizer.encode(text).ids)

    # ---- route ----

    @property
    def embedder(self) -> Embedder:
        return self.router.embedder

    def route(self, context: str) -> tuple[int, ...]:
        """The memory path of a context (one node id per level)."""
        return self.router.route(context)

    # ---- fill ----

    @property
    def slot(self) -> list[torch.Tensor]:
        """The slot buffers (one per slot input), filled in place by :meth:`set_path`."""
        return self.filler.slot

    @property
    def path(self) -> list[int | None]:
        """The node held per level (None: not loaded yet)."""
        return self.filler.path

    def set_path(self, path: Sequence[int]) -> SlotUpdate:
        """Make the slot hold ``path``'s memory, fetching only the levels whose node changed."""
        return self.filler.set_path(path)

    def prefetch(self, path: Sequence[int]) -> Future[int]:
        """Read ``path``'s missing blocks in the background; a later :meth:`set_path` only dequantizes."""
        return self.filler.prefetch(path)

    def route_and_set(self, context: str) -> SlotUpdate:
        return self.set_path(self.route(context))

    # ---- run ----

    @property
    def runner(self) -> Runner | None:
        return self.programs.runner

    @property
    def target(self) -> str | None:
        return self.programs.target

    def use_target(self, target: str) -> None:
        """Run programs with ``target``'s runtime (raises HostUnsupported where it cannot run)."""
        self.programs.use_target(target)

    def has_decoder(self, target: str) -> bool:
        """Whether the bundle holds a KV-cache decode program for ``target``."""
        return self.programs.has_decoder(target)

    def open_decoder(self, target: str) -> Decoder:
        """A runner of ``target``'s decode program, fed this loader's slot buffers by the caller.

        Raises BundleError when the bundle has no decode program for it, HostUnsupported where it cannot run.
        """
        return self.programs.open_decoder(target)

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` for up to ``seq_len`` tokens (the program's fixed length; padded after)."""
        if any(p is None for p in self.path):
            raise UsageError("no memory path set: call set_path() or route_and_set() first")
        return self.programs.logits(tokens, self.slot)


def _check_text(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8 text (undecodable byte at character {exc.start})") from None


@dataclass(frozen=True)
class Completion:
    context_path: tuple[int, ...]
    slot_update: SlotUpdate
    prompt_tokens: int
    new_tokens: list[int]
    text: str
    seconds: float
    stop_reason: str
    program: str  # "decode" (KV cache) or "window" (full window re-run per token)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def read_tokenizer(
    root: Path, manifest: Manifest, relative: str, field: str, max_tokens: int | None = None
) -> Tokenizer:
    """The tokenizer file ``relative`` of the bundle (named by the manifest's ``field``: ``tokenizer.file``,
    ``router.tokenizer.file``): listed, read inside the bundle at its listed size, parsed by ``tokenizers``
    (any failure a BundleError naming the file); with ``max_tokens``, no more tokens than that."""
    data = read_listed(root, manifest, relative, field.rsplit(".", 1)[0].replace(".", " "), MAX_TOKENIZER_BYTES)
    with wrapped(root / relative, "not a tokenizers tokenizer", field=field):
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if max_tokens is not None and size > max_tokens:
        raise BundleError(
            f"{root / relative}: {size} tokens, more than the model's vocab_size {max_tokens}", field=field
        )
    return tokenizer


def bundle_config(root: Path, manifest: Manifest) -> ModelConfig:
    """The model config of a bundle's (already read) manifest; a bad one is a BundleError naming the field."""
    try:
        return ModelConfig.from_dict(manifest.model)
    except HmExportError as exc:
        raise BundleError(f"{root / MANIFEST}: model: {exc}", field=f"model.{exc.field or ''}".rstrip(".")) from exc


def read_tree(root: Path, manifest: Manifest | None = None, config: ModelConfig | None = None) -> CentroidTree:
    """The bundle's router tree (``router.safetensors``: one finite float32 ``level{l}`` centroid matrix per
    level, of the shape the model config says), read inside the bundle with its listed size."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    config = config or bundle_config(root, manifest)
    relative = manifest.router.file
    path = root / relative
    data = read_listed(root, manifest, relative, "router", MAX_ROUTER_BYTES)
    with wrapped(path, "not a safetensors file of router centroids", field="router.file"):
        tensors = load_safetensors(data)
    dim, centroids = manifest.router.dim, []
    for level in range(config.memory.num_levels):
        want = (config.memory.nodes_at(level), dim)
        c = tensors.get(f"level{level}")
        if c is None or c.dtype != np.float32 or c.shape != want or not np.isfinite(c).all():
            got = "missing" if c is None else f"{c.dtype} {list(c.shape)}"
            raise BundleError(f"{path}: level{level} centroids are {got}, expected finite float32 {list(want)}")
        centroids.append(c)
    return CentroidTree(config.memory, centroids)


def complete(
    loader: BundleLoader,
    context: str,
    prompt: str,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """Route ``context``, load its memory, and continue ``prompt`` (greedy unless ``sampling`` says otherwise;
    ``sampling.max_new_tokens`` wins over ``max_new_tokens``) with the loader's target's decode program."""
    from hm_export.runtime_stubs.generate import Generator, Sampling, WindowDecoder

    start = time.perf_counter()
    generator = Generator(loader, loader.target or "executorch")
    update = loader.route_and_set(context)
    result = generator.generate(prompt, sampling or Sampling(max_new_tokens=max_new_tokens), on_text)
    return Completion(
        update.path,
        update,
        result.prompt_tokens,
        result.new_tokens,
        result.text,
        time.perf_counter() - start,
        result.stop_reason,
        "window" if isinstance(generator.decoder, WindowDecoder) else "decode",
        round(result.prefill_tokens_per_s, 1),
        round(result.decode_tokens_per_s, 1),
    )
