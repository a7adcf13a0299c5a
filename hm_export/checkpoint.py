"""Checkpoint directory format (documented in docs/checkpoint-format.md).

::

    config.json               format marker, version, model config, storage dtypes, router, file names
    anchor.safetensors        anchor weights (embedding, blocks, final norm)
    bank_level{l}.safetensors level l blocks: gate, up [n_l, layers, d, r_l]; down [n_l, layers, r_l, d]
    router.safetensors        level{l}: centroids [n_l, embed_dim]
    tokenizer.json            a Hugging Face `tokenizers` tokenizer

Only safetensors and JSON: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from hm_export.architectures import MemoryModel, build_model
from hm_export.atomic import atomic_directory
from hm_export.config import ConfigError, ModelConfig
from hm_export.errors import CheckpointError
from hm_export.formats import read_format_json
from hm_export.router import MINILM_DIM, CentroidTree

FORMAT_NAME = "hm-export-checkpoint"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ANCHOR_FILE = "anchor.safetensors"
ROUTER_FILE = "router.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def bank_file(level: int) -> str:
    return f"bank_level{level}.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (fp32, eval mode), its router tree and tokenizer."""

    path: Path
    config: ModelConfig
    model: MemoryModel
    tree: CentroidTree
    tokenizer: Tokenizer
    storage_dtype: str  # the bank's (and, unless ``anchor_dtype`` differs, the anchor's)
    metadata: dict[str, Any]
    anchor_dtype: str = ""  # the anchor's (a host's) stored dtype; empty: ``storage_dtype``

    def __post_init__(self) -> None:
        self.anchor_dtype = self.anchor_dtype or self.storage_dtype


def expected_bank_shapes(cfg: ModelConfig, level: int) -> dict[str, tuple[int, ...]]:
    nodes, layers, d, r = cfg.memory.nodes_at(level), len(cfg.memory.layers), cfg.d_model, cfg.memory.widths[level]
    return {"gate": (nodes, layers, d, r), "up": (nodes, layers, d, r), "down": (nodes, layers, r, d)}


def anchor_state(model: MemoryModel) -> dict[str, torch.Tensor]:
    """The stored anchor tensors: parameters and persistent buffers outside the bank, each once (a tied
    output head is the embedding, stored under the embedding's name only)."""
    stored = set(model.state_dict(keep_vars=True))
    named = [*model.named_parameters(), *model.named_buffers()]  # both skip tied duplicates
    return {name: t for name, t in named if name in stored and not name.startswith("bank.")}


def expected_anchor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, no allocation
        reference = build_model(cfg)
    return {name: tuple(t.shape) for name, t in anchor_state(reference).items()}


def save_checkpoint(
    directory: Path,
    model: MemoryModel,
    tree: CentroidTree,
    tokenizer: Tokenizer,
    storage_dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
    anchor_dtype: str | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp directory, then rename over ``directory``).

    ``storage_dtype`` is the bank's dtype and, unless ``anchor_dtype`` is given, the anchor's.
    """
    anchor_dtype = anchor_dtype or storage_dtype
    for dtype_name in (storage_dtype, anchor_dtype):
        if dtype_name not in STORAGE_DTYPES:
            raise CheckpointError(f"storage dtype {dtype_name!r} is not one of {sorted(STORAGE_DTYPES)}")
    dtype = STORAGE_DTYPES[storage_dtype]
    with atomic_directory(Path(directory), overwrite=True, replaceable=is_checkpoint, what="checkpoint") as tmp:
        cfg = model.cfg
        anchor = {n: t.detach().to(STORAGE_DTYPES[anchor_dtype]).contiguous() for n, t in anchor_state(model).items()}
        save_file(anchor, str(tmp / ANCHOR_FILE))
        for level in range(cfg.memory.num_levels):
            tensors = {
                "gate": model.bank.gate[level].detach().to(dtype).contiguous(),
                "up": model.bank.up[level].detach().to(dtype).contiguous(),
                "down": model.bank.down[level].detach().to(dtype).contiguous(),
            }
            save_file(tensors, str(tmp / bank_file(level)))
        save_file(
            {
                f"level{lv}": torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
                for lv, c in enumerate(tree.centroids)
            },
            str(tmp / ROUTER_FILE),
        )
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": cfg.to_dict(),
            "storage_dtype": storage_dtype,
            **({"anchor_dtype": anchor_dtype} if anchor_dtype != storage_dtype else {}),
            "router": {"embedder": "all-MiniLM-L6-v2", "dim": tree.dim, "pooling": "mean", "normalize": True},
            "files": {
                "anchor": ANCHOR_FILE,
                "bank": [bank_file(lv) for lv in range(cfg.memory.num_levels)],
                "router": ROUTER_FILE,
                "tokenizer": TOKENIZER_FILE,
            },
            "metadata": metadata or {},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds an hm-export checkpoint (what saving a checkpoint may replace)."""
    try:
        read_format_json(Path(directory) / "config.json", FORMAT_NAME, FORMAT_VERSION, CheckpointError, "checkpoint")
    except CheckpointError as exc:
        return exc.field == "format_version"
    return True


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    config = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, CheckpointError, "an hm-export checkpoint directory")
    for key in ("storage_dtype", "anchor_dtype"):
        value = config.get(key, config.get("storage_dtype"))
        if value not in STORAGE_DTYPES:
            raise CheckpointError(f"{path}: {key} {value!r} not in {sorted(STORAGE_DTYPES)}", field=key)
    return config


def _read_tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read exactly the ``expected`` tensors from a safetensors file, checking names and shapes."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
            tensors = {}
            for name, shape in expected.items():
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
                tensors[name] = tensor.float()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    return tensors


def load_checkpoint(directory: Path | str) -> Checkpoint:
    """Load and validate a checkpoint directory; the model comes back in fp32, eval mode."""
    directory = Path(directory)
    raw = read_config(directory)
    try:
        cfg = ModelConfig.from_dict(raw["model"])
        anchor_shapes = expected_anchor_shapes(cfg)
    except (ConfigError, ValueError, TypeError, KeyError) as exc:  # also int("x"), dict(non-object), ...
        raise CheckpointError(f"{directory / 'config.json'}: invalid model config: {exc}") from exc
    state = _read_tensors(directory / ANCHOR_FILE, anchor_shapes)
    for level in range(cfg.memory.num_levels):
        tensors = _read_tensors(directory / bank_file(level), expected_bank_shapes(cfg, level))
        state.update({f"bank.{name}.{level}": t for name, t in tensors.items()})
    dim = raw.get("router", {}).get("dim", MINILM_DIM)
    router = _read_tensors(
        directory / ROUTER_FILE, {f"level{lv}": (cfg.memory.nodes_at(lv), dim) for lv in range(cfg.memory.num_levels)}
    )
    tokenizer_path = directory / TOKENIZER_FILE
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or a missing file
        raise CheckpointError(f"{tokenizer_path}: cannot load tokenizer ({exc})") from exc
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer_path}: vocabulary {tokenizer.get_vocab_size()} exceeds model vocab_size {cfg.vocab_size}"
        )
    model = build_model(cfg)
    # strict=False: tied aliases (a host's lm_head) are not stored; every stored tensor was checked above
    model.load_state_dict(state, strict=False)  # rope/mask buffers are derived (non-persistent), not stored
    model.eval()
    tree = CentroidTree(cfg.memory, [router[f"level{lv}"].numpy() for lv in range(cfg.memory.num_levels)])
    return Checkpoint(
        directory,
        cfg,
        model,
        tree,
        tokenizer,
        raw["storage_dtype"],
        raw.get("metadata", {}),
        raw.get("anchor_dtype", ""),
    )
