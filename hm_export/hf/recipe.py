"""Recipe: attach memories to a Hugging Face model and train them on a corpus (host frozen).

The example's method (``examples/stdlib_docs``) on a ``transformers`` host: each document's routing
context (its ``context`` field, or the head of its text) is embedded with all-MiniLM-L6-v2, a balanced
hierarchical k-means tree is built over the documents, every document's windows use its greedily routed
path, and only the bank trains; the bank of the best validation NLL is kept.  The result is an ordinary
hm-export checkpoint, so ``hm-export export`` / ``verify`` / ``check`` / ``bench`` take it as they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from hm_export.checkpoint import save_checkpoint
from hm_export.config import ConfigError, MemoryConfig
from hm_export.errors import InputError
from hm_export.formats import read_json_lines
from hm_export.hf.families import host_model_config  # refuses an unsupported family by name
from hm_export.hf.model import HostMemoryLM
from hm_export.router import Embedder, MiniLMEmbedder, build_tree
from hm_export.training import document_windows, mean_nll, train

VALIDATION_EVERY = 10  # every 10th window of the corpus is validation text (early stopping)


@dataclass(frozen=True)
class MemoryRecipe:
    """What to attach (tree shape, widths, layers: ``None`` = every layer) and how to train it."""

    branching: tuple[int, ...] = (4, 4)
    widths: tuple[int, ...] = (64, 32)
    layers: tuple[int, ...] | None = None
    max_seq_len: int = 128
    steps: int = 300
    lr: float = 5e-3
    batch: int = 8
    seed: int = 0
    context_chars: int = 1200  # routing context of a document without one: the head of its text
    storage_dtype: str = "float32"


@dataclass
class RecipeReport:
    checkpoint: str
    architecture: str
    host_params: int
    bank_params: int
    documents: int
    train_windows: int
    validation_windows: int
    steps: int
    validation_nll: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach_memories(host: nn.Module, recipe: MemoryRecipe) -> HostMemoryLM:
    """A :class:`HostMemoryLM` holding a copy of ``host``'s weights (frozen) and a fresh bank (``D`` = 0:
    until trained, its logits are exactly the host's)."""
    layers = recipe.layers if recipe.layers is not None else tuple(range(host.config.num_hidden_layers))
    memory = MemoryConfig(branching=recipe.branching, widths=recipe.widths, layers=layers)
    torch.manual_seed(recipe.seed)
    return HostMemoryLM.attach(host, host_model_config(host.config, memory, recipe.max_seq_len))


def read_corpus(path: Path) -> list[dict[str, str]]:
    """JSON lines, one document per line: ``text`` and optionally ``context`` (the text routing it)."""
    return read_json_lines(
        path,
        lambda item: isinstance(item, dict) and isinstance(item.get("text"), str),
        "a document needs a string 'text'",
        "documents",
    )


def train_memories(
    host: nn.Module,
    tokenizer: Tokenizer,
    documents: list[dict[str, str]],
    out: Path,
    recipe: MemoryRecipe = MemoryRecipe(),
    embedder: Embedder | None = None,
) -> RecipeReport:
    """Attach memories to ``host``, train them on ``documents`` and save an hm-export checkpoint at ``out``."""
    model = attach_memories(host, recipe)
    memory = model.cfg.memory
    per_doc = document_windows(tokenizer, [d["text"] for d in documents], recipe.max_seq_len + 1)
    if len(documents) < memory.nodes_at(memory.num_levels - 1):
        raise ConfigError(f"{len(documents)} documents cannot fill {memory.nodes_at(memory.num_levels - 1)} leaves")
    contexts = [d.get("context") or d["text"][: recipe.context_chars] for d in documents]
    embeddings = (embedder or MiniLMEmbedder()).embed(contexts)
    tree, _ = build_tree(embeddings, memory, seed=recipe.seed)
    doc_paths = tree.route(embeddings)
    rows, owners = [], []
    for doc_index, windows in enumerate(per_doc):
        rows += windows
        owners += [doc_index] * len(windows)
    if len(rows) < VALIDATION_EVERY:
        raise InputError(f"the corpus has {len(rows)} windows of {recipe.max_seq_len + 1} tokens; at least 10 needed")
    held_out = np.arange(len(rows)) % VALIDATION_EVERY == VALIDATION_EVERY - 1  # every 10th window, corpus-wide
    rows_array, owners_array = np.asarray(rows), np.asarray(owners)
    data = torch.from_numpy(rows_array[~held_out])
    train_paths = torch.from_numpy(doc_paths[owners_array[~held_out]])
    validation = torch.from_numpy(rows_array[held_out])
    validation_paths = doc_paths[owners_array[held_out]]

    def validate() -> float:
        return mean_nll(model, validation, validation_paths)

    report = RecipeReport(
        checkpoint=str(out),
        architecture=model.cfg.architecture,
        host_params=sum(p.numel() for p in model.anchor_parameters()),
        bank_params=sum(p.numel() for p in model.bank.parameters()),
        documents=len(documents),
        train_windows=len(data),
        validation_windows=len(validation),
        steps=recipe.steps,
    )
    report.validation_nll["host"] = round(mean_nll(model, validation, None), 5)
    if recipe.steps:
        params = list(model.bank.parameters())
        train(model, params, data, train_paths, recipe.steps, recipe.lr, recipe.batch, recipe.seed, "memory", validate)
    report.validation_nll["host_with_memory"] = round(validate(), 5)
    report.validation_nll["perplexity_change"] = round(
        math.exp(report.validation_nll["host_with_memory"] - report.validation_nll["host"]) - 1, 5
    )
    metadata = {"trained_by": "hm_export.hf.recipe", "recipe": asdict(recipe), "documents": len(documents)}
    save_checkpoint(out, model, tree, tokenizer, storage_dtype=recipe.storage_dtype, metadata=metadata)
    return report


def train_memories_from_pretrained(
    host_dir: Path, corpus: Path, out: Path, recipe: MemoryRecipe = MemoryRecipe(), embedder: Embedder | None = None
) -> RecipeReport:
    """:func:`train_memories` on a local ``transformers`` model directory (``config.json``, safetensors weights,
    ``tokenizer.json``), as ``hm-export hf attach`` runs it."""
    from transformers import AutoModelForCausalLM

    host_dir = Path(host_dir)
    tokenizer_file = host_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: missing (hm-export needs the host's fast tokenizer file)")
    host = AutoModelForCausalLM.from_pretrained(str(host_dir), local_files_only=True, use_safetensors=True)
    documents = read_corpus(corpus)
    return train_memories(host.eval(), Tokenizer.from_file(str(tokenizer_file)), documents, out, recipe, embedder)
