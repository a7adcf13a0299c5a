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

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from hm_export.bank import BankReader
from hm_export.bundle import BundleError, read_manifest, safe_relative, verify_files
from hm_export.config import ModelConfig
from hm_export.kernels.strategies import layout_from_record
from hm_export.router import CentroidTree, Embedder, MiniLMEmbedder
from hm_export.runtime_stubs.block_cache import CachePolicy, SlotFiller, SlotUpdate
from hm_export.slot import SlotContract
from hm_export.targets import TARGETS, Decoder, HostUnsupported, Runner

if TYPE_CHECKING:
    from hm_export.runtime_stubs.generate import Sampling


def _target_entry(root: Path, manifest: dict, target: str) -> dict:
    targets = manifest.get("targets", {})
    if target not in targets:
        raise BundleError(f"{root / 'manifest.json'}: no target {target!r} (bundle has {sorted(targets)})")
    if target not in TARGETS:
        raise BundleError(f"target {target!r} is unknown to this hm-export")
    return targets[target]


def _open_runner(root: Path, manifest: dict, target: str, slot_names: list[str]) -> Runner:
    entry = _target_entry(root, manifest, target)
    open_runner = TARGETS[target].open_runner
    if open_runner is None:
        raise HostUnsupported(f"target {target!r} runs only on its device, not on this host")
    return open_runner(target_files(root, manifest, target), slot_names, entry)


def target_files(root: Path, manifest: dict, target: str, decode: bool = False) -> dict[str, Path]:
    """A target's files (role -> path inside the bundle): its full-window program, or its decode program."""
    entry = manifest["targets"][target]["decode"] if decode else manifest["targets"][target]
    return {role: safe_relative(root, f, f"{target} {role}") for role, f in entry["files"].items()}


class BundleLoader:
    """Open and validate a bundle; route contexts; fill the slot level by level; run the program."""

    def __init__(
        self,
        bundle_dir: Path | str,
        target: str | None = "executorch",
        verify: bool = True,
        verify_blocks: bool = True,
        embedder: Embedder | None = None,
        cache: CachePolicy | None = None,
        read_mode: str = "pread",
    ) -> None:
        """``verify_blocks``: CRC-32 check of every block read (overrides ``cache.verify``); ``cache``: resident
        levels and LRU cap (default :class:`CachePolicy`); ``read_mode``: ``pread``, ``readinto`` or ``mmap``."""
        self.root = Path(bundle_dir)
        self.manifest = read_manifest(self.root)
        if verify:
            verify_files(self.root, self.manifest)
        sections = ("model", "slot", "bank", "tokenizer", "router", "targets")
        missing = [key for key in sections if key not in self.manifest]
        if missing:
            raise BundleError(f"{self.root / 'manifest.json'}: malformed manifest, missing {missing}")
        self.config = ModelConfig.from_dict(self.manifest["model"])
        try:
            self.contract = SlotContract.from_dict(self.manifest["slot"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.root / 'manifest.json'}: bad slot contract: {exc}") from exc
        try:
            self.layout = layout_from_record(self.manifest["slot"])
        except ValueError as exc:
            raise BundleError(f"{self.root / 'manifest.json'}: {exc}") from exc
        expected = self.layout.contract(self.config, self.contract.seq_len)
        if expected.schema_hash != self.contract.schema_hash:
            raise BundleError(
                f"{self.root / 'manifest.json'}: slot contract does not match the model config and slot strategy "
                f"{self.layout.strategy.name!r}"
            )
        self.bank = BankReader(safe_relative(self.root, self.manifest["bank"]["dir"], "bank"), read_mode)
        if self.bank.schema_hash != self.manifest["bank"]["schema_hash"]:
            raise BundleError(
                f"{self.bank_dir}: bank schema hash {self.bank.schema_hash} does not match the manifest's "
                f"{self.manifest['bank']['schema_hash']} (bank written for another model or scheme)"
            )
        policy = replace(cache or CachePolicy(), verify=verify_blocks)
        try:
            self.filler = SlotFiller(self.contract, self.bank, policy, self.layout)
        except ValueError as exc:
            raise BundleError(str(exc)) from exc
        self.tokenizer = Tokenizer.from_file(
            str(safe_relative(self.root, self.manifest["tokenizer"]["file"], "tokenizer"))
        )
        self.tree = read_tree(self.root, self.manifest)
        self._embedder = embedder
        self.runner: Runner | None = None
        self.target: str | None = None
        if target is not None:
            self.use_target(target)

    def use_target(self, target: str) -> None:
        """Run programs with ``target``'s runtime (raises HostUnsupported where it cannot run)."""
        self.runner = _open_runner(self.root, self.manifest, target, self.contract.input_names)
        self.target = target

    def has_decoder(self, target: str) -> bool:
        """Whether the bundle holds a KV-cache decode program for ``target``."""
        return "decode" in _target_entry(self.root, self.manifest, target)

    def open_decoder(self, target: str) -> Decoder:
        """A runner of ``target``'s decode program, fed this loader's slot buffers by the caller.

        Raises BundleError when the bundle has no decode program for it, HostUnsupported where it cannot run.
        """
        entry = _target_entry(self.root, self.manifest, target)
        support = TARGETS[target].decode
        if "decode" not in entry or support is None:
            raise BundleError(f"{self.root / 'manifest.json'}: target {target!r} has no decode program")
        if support.open_decoder is None:
            raise HostUnsupported(f"target {target!r} decodes only on its device, not on this host")
        files = target_files(self.root, self.manifest, target, decode=True)
        return support.open_decoder(files, self.contract.input_names, entry["decode"])

    @property
    def bank_dir(self) -> Path:
        return self.root / self.manifest["bank"]["dir"]

    @property
    def slot(self) -> list[torch.Tensor]:
        """The slot buffers (one per slot input), filled in place by :meth:`set_path`."""
        return self.filler.slot

    @property
    def path(self) -> list[int | None]:
        """The node held per level (None: not loaded yet)."""
        return self.filler.path

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = MiniLMEmbedder()
        return self._embedder

    def route(self, context: str) -> tuple[int, ...]:
        """The memory path of a context (one node id per level)."""
        return tuple(int(n) for n in self.tree.route(self.embedder.embed([context]))[0])

    def set_path(self, path: Sequence[int]) -> SlotUpdate:
        """Make the slot hold ``path``'s memory, fetching only the levels whose node changed."""
        return self.filler.set_path(path)

    def prefetch(self, path: Sequence[int]) -> Future[int]:
        """Read ``path``'s missing blocks in the background; a later :meth:`set_path` only dequantizes."""
        return self.filler.prefetch(path)

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` for up to ``seq_len`` tokens (the program's fixed length; padded after)."""
        if any(p is None for p in self.path):
            raise RuntimeError("no memory path set: call set_path() or route_and_set() first")
        if self.runner is None:
            raise RuntimeError("no target selected: call use_target()")
        tokens = list(tokens)[-self.contract.seq_len :]
        if not tokens:
            raise ValueError("need at least one token")
        padded = torch.zeros(1, self.contract.seq_len, dtype=torch.long)
        padded[0, : len(tokens)] = torch.tensor(tokens)
        return self.runner(padded, self.slot)[0, : len(tokens)]

    def route_and_set(self, context: str) -> SlotUpdate:
        return self.set_path(self.route(context))


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


def read_tree(root: Path, manifest: dict[str, Any] | None = None) -> CentroidTree:
    """The bundle's router tree (``router.safetensors``: one ``level{l}`` centroid matrix per level)."""
    manifest = manifest or read_manifest(root)
    memory = ModelConfig.from_dict(manifest["model"]).memory
    with safe_open(str(safe_relative(root, manifest["router"]["file"], "router")), framework="np") as handle:
        return CentroidTree(memory, [handle.get_tensor(f"level{lv}") for lv in range(memory.num_levels)])


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
