"""Recipe: attach memories to a Hugging Face model and train them on a corpus (host frozen).

Each document's routing context (its ``context`` field, or the head of its text) is embedded with
all-MiniLM-L6-v2, a balanced hierarchical k-means tree is built over the training documents, every
document's windows use its greedily routed path, and only the bank trains.  Of every ``validation_stride``
windows of a document, one is validation text and one test text (:func:`~hm_export.training.split_windows`);
a fraction ``validation_documents`` of the documents is held out whole, never trained on and routed like any
new context.  The bank kept is the one of the best validation NLL (early stopping) on the held-out windows,
the held-out documents, or their mean (``early_stopping``); the test windows are reported, never selected on.
The result is an ordinary hm-export checkpoint, so ``hm-export export`` / ``verify`` / ``check`` / ``bench``
take it as they are.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from hm_export.checkpoint import STORAGE_DTYPES, save_checkpoint
from hm_export.config import ConfigError, MemoryConfig
from hm_export.corpus import read_corpus
from hm_export.errors import InputError
from hm_export.hf.families import host_model_config  # refuses a model that cannot host memories, naming why
from hm_export.hf.intake import HostSource
from hm_export.hf.model import HostMemoryLM
from hm_export.router import Embedder, MiniLMEmbedder, build_tree
from hm_export.training import (
    TEST_OFFSET,
    VALIDATION_OFFSET,
    document_windows,
    mean_nll,
    split_windows,
    spread,
    stderr_log,
    train,
)

EarlyStopping = Literal["validation", "documents", "both"]
EARLY_STOPPING: tuple[str, ...] = get_args(EarlyStopping)


@dataclass(frozen=True)
class MemoryRecipe:
    """What to attach (tree shape, widths, layers: ``None`` = every layer) and how to train it.

    ``max_seconds`` bounds the training time (the schedule decays by then); ``host_dtype`` is the dtype the
    host is stored in (``None``: the source's); ``storage_dtype`` the bank's.
    """

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
    host_dtype: str | None = None
    max_seconds: float | None = None
    eval_every: int = 50
    validation_stride: int = 10  # of every 10 windows of a document, one validates and one tests
    validation_documents: float = 0.0  # fraction of the documents held out whole (never trained) for validation
    validation_limit: int = 64  # windows per held-out set (an evenly spread subset)
    early_stopping: EarlyStopping = "both"

    def __post_init__(self) -> None:
        for name in ("storage_dtype", "host_dtype"):
            value = getattr(self, name)
            if value is not None and value not in STORAGE_DTYPES:
                raise ConfigError(f"{name} {value!r} is not one of {sorted(STORAGE_DTYPES)}")
        if not 0.0 <= self.validation_documents < 0.5:
            raise ConfigError(f"validation_documents {self.validation_documents} must be in [0, 0.5)")
        if self.early_stopping not in EARLY_STOPPING:
            raise ConfigError(f"early_stopping {self.early_stopping!r} is not 'validation', 'documents' or 'both'")
        if self.steps < 0 or self.batch < 1 or self.validation_stride <= TEST_OFFSET or self.validation_limit < 1:
            raise ConfigError(
                f"steps must be >= 0, batch >= 1, validation_stride > {TEST_OFFSET} and validation_limit >= 1"
            )


@dataclass
class RecipeReport:
    checkpoint: str
    architecture: str
    host: dict[str, Any]
    host_params: int
    bank_params: int
    memory_share_of_ffn: float  # extra hidden units of one path / the host MLP width, per memory layer
    memory_layers: int
    documents: int
    train_documents: int
    held_out_documents: int
    train_windows: int
    steps: int
    kept_step: int | None
    stopped: str
    train_seconds: float
    # per held-out set ("validation", "documents": early stopping; "test": neither trained nor selected on)
    held_out_nll: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach_memories(host: nn.Module, recipe: MemoryRecipe, adopt: bool = False) -> HostMemoryLM:
    """A :class:`HostMemoryLM` on ``host`` (frozen; a copy of its weights unless ``adopt``) and a fresh bank
    (``D`` = 0: until trained, its logits are exactly the host's)."""
    layers = recipe.layers if recipe.layers is not None else tuple(range(host.config.num_hidden_layers))
    memory = MemoryConfig(branching=recipe.branching, widths=recipe.widths, layers=layers)
    torch.manual_seed(recipe.seed)
    return HostMemoryLM.attach(host, host_model_config(host.config, memory, recipe.max_seq_len), adopt=adopt)


def _held_out_document(index: int, text: str, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(f"{index}:{text[:256]}".encode()) % 10_000 < fraction * 10_000


def train_memories(
    host: nn.Module,
    tokenizer: Tokenizer,
    documents: list[dict[str, str]],
    out: Path,
    recipe: MemoryRecipe = MemoryRecipe(),
    embedder: Embedder | None = None,
    host_record: dict[str, Any] | None = None,
    adopt: bool = False,
    log: Callable[[str], None] = stderr_log,
    progress: bool | None = None,
) -> RecipeReport:
    """Attach memories to ``host``, train them on ``documents`` and save an hm-export checkpoint at ``out``.

    ``host_record``: where the host came from (:meth:`HostSource.record`), kept in the checkpoint metadata;
    ``adopt``: use ``host`` itself rather than a copy (it is frozen and switched to eager attention);
    ``log``: where progress lines go; ``progress``: the step bar (default: when stderr is a terminal).
    """
    model = attach_memories(host, recipe, adopt)
    memory, cfg = model.cfg.memory, model.cfg
    per_doc = document_windows(tokenizer, [d["text"] for d in documents], recipe.max_seq_len + 1)
    contexts = [d.get("context") or d["text"][: recipe.context_chars] for d in documents]
    held = {i for i, d in enumerate(documents) if _held_out_document(i, d["text"], recipe.validation_documents)}
    split = split_windows(per_doc, recipe.validation_stride, held)
    train_docs = sorted(set(split["train"][1].tolist()))
    if len(train_docs) < memory.nodes_at(memory.num_levels - 1) or len(split["train"][0]) < 2:
        raise ConfigError(
            f"{len(train_docs)} training documents ({len(split['train'][0])} windows of {recipe.max_seq_len + 1} "
            f"tokens) cannot fill {memory.nodes_at(memory.num_levels - 1)} leaves"
        )
    if not len(split["validation"][0]):
        raise InputError(
            f"no validation window: a document needs at least {VALIDATION_OFFSET + 1} windows of "
            f"{recipe.max_seq_len + 1} tokens (window {VALIDATION_OFFSET} of every {recipe.validation_stride})"
        )
    embeddings = (embedder or MiniLMEmbedder()).embed(contexts)
    tree, _ = build_tree(embeddings[train_docs], memory, seed=recipe.seed)
    doc_paths = tree.route(embeddings)  # a document's windows share its greedily routed path
    held_out: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for name in ("validation", "documents", "test"):
        rows, owners = split[name]
        keep = spread(len(rows), recipe.validation_limit)
        if len(keep):
            held_out[name] = (torch.from_numpy(rows[keep]), doc_paths[owners[keep]])
    criterion = [n for n in ("validation", "documents") if n in held_out and recipe.early_stopping in (n, "both")]

    def nll(names: list[str], with_memory: bool) -> dict[str, float]:
        return {n: mean_nll(model, held_out[n][0], held_out[n][1] if with_memory else None) for n in names}

    def validate() -> float:
        return float(np.mean(list(nll(criterion, True).values())))

    host_nll = nll(list(held_out), False)
    train_rows, train_owners = split["train"]
    result = train(
        model,
        list(model.bank.parameters()),
        torch.from_numpy(train_rows),
        torch.from_numpy(doc_paths[train_owners]),
        recipe.steps,
        recipe.lr,
        recipe.batch,
        recipe.seed,
        "memory",
        validate if recipe.steps else None,
        eval_every=recipe.eval_every,
        max_seconds=recipe.max_seconds,
        log=log,
        progress=progress,
    )
    memory_nll = nll(list(held_out), True)
    report = RecipeReport(
        checkpoint=str(out),
        architecture=cfg.architecture,
        host=host_record or {},
        host_params=sum(p.numel() for p in model.anchor_parameters()),
        bank_params=sum(p.numel() for p in model.bank.parameters()),
        memory_share_of_ffn=round(memory.total_width / cfg.ffn_hidden, 4),
        memory_layers=len(memory.layers),
        documents=len(documents),
        train_documents=len(train_docs),
        held_out_documents=len(held),
        train_windows=len(train_rows),
        steps=len(result.losses),
        kept_step=result.kept_step,
        stopped=result.stopped,
        train_seconds=result.seconds,
    )
    for name in held_out:
        report.held_out_nll[name] = {
            "windows": len(held_out[name][0]),
            "host": round(host_nll[name], 5),
            "host_with_memory": round(memory_nll[name], 5),
            "perplexity_change": round(math.exp(memory_nll[name] - host_nll[name]) - 1, 5),
        }
    host_dtype = recipe.host_dtype or str((host_record or {}).get("source_dtype", "float32"))
    metadata = {
        "trained_by": "hm_export.hf.recipe",
        "recipe": asdict(recipe),
        "documents": len(documents),
        "host": {**(host_record or {}), "stored_as": host_dtype},
        "training": {
            "steps": len(result.losses),
            "kept_step": result.kept_step,
            "stopped": result.stopped,
            "validation": [[step, round(value, 5)] for step, value in result.validation],
        },
    }
    save_checkpoint(
        out, model, tree, tokenizer, storage_dtype=recipe.storage_dtype, metadata=metadata, anchor_dtype=host_dtype
    )
    return report


def train_memories_from_source(
    host: Path | str,
    corpus: Path,
    out: Path,
    recipe: MemoryRecipe = MemoryRecipe(),
    gguf_file: str | None = None,
    embedder: Embedder | None = None,
    log: Callable[[str], None] = stderr_log,
    progress: bool | None = None,
) -> RecipeReport:
    """:func:`train_memories` on a host on disk, as ``hm-export hf attach`` runs it.

    ``host``: a ``transformers`` model folder (``config.json``, safetensors weights, ``tokenizer.json``), a
    ``.gguf`` file, or a folder plus ``gguf_file``.  The corpus and the host's config are checked (and an
    unsupported model refused) before any weight is read.
    """
    source = HostSource.locate(host, gguf_file)
    documents = read_corpus(corpus)
    config = source.read_config()
    layers = recipe.layers if recipe.layers is not None else tuple(range(config.num_hidden_layers))
    memory = MemoryConfig(branching=recipe.branching, widths=recipe.widths, layers=layers)
    host_model_config(config, memory, recipe.max_seq_len)  # refuses from the config alone
    record = {**source.record(), "source_dtype": source.source_dtype(config)}
    tokenizer = source.load_tokenizer()
    log(f"loading the host from {source.path}")
    model = source.load_model()
    return train_memories(
        model, tokenizer, documents, out, recipe, embedder, record, adopt=True, log=log, progress=progress
    )
