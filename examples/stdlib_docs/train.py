"""Train the shipped example: a small memory-augmented LM on the Python standard library's docs.

Text that needs no download: every docstring of the running interpreter's standard library (module,
class and function docstrings, parsed with ``ast``) plus ``pydoc_data.topics`` (the language
reference topics that ``help()`` shows).  One document per module / topic.

Steps (about 15-20 minutes on 2 quiet CPU cores):
 1. hold out whole documents by a hash of their name ("unseen documents"); inside the other
    documents, every 10th window is held-out test text and another 10th is validation text;
 2. train a byte-level BPE tokenizer (``tokenizers``) on the training documents;
 3. cut documents into windows of ``seq_len`` tokens, embed each training window with
    all-MiniLM-L6-v2 and build a balanced 2-level k-means tree (k = 8, 8);
 4. train the anchor alone; then freeze it and train the memory bank, each window using the blocks
    of its greedily routed path (as at inference), keeping the bank of the step with the best
    validation perplexity (the bank memorises its windows quickly; early stopping keeps what
    generalises);
 5. save the checkpoint (fp16 storage) and evaluate the *reloaded* checkpoint on both held-out sets:
    the memory is routed from the first half of each window (the context) and perplexity is measured
    on the second half, so the router never sees the tokens it is scored on.

Usage: ``python examples/stdlib_docs/train.py [--out DIR] [--anchor-steps N] [--memory-steps N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hm_export.checkpoint import load_checkpoint, save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.model import MemoryLM
from hm_export.router import CentroidTree, MiniLMEmbedder, build_tree
from hm_export.training import document_windows, mean_nll, train

HERE = Path(__file__).resolve().parent
HELDOUT_PERCENT = 6
CONTEXT_CHARS = 1200
VALIDATION_STRIDE = 5
SHIPPED_HELDOUT = 256  # held-out windows written to heldout.jsonl for verify / checks


def stdlib_documents() -> dict[str, str]:
    """Source of every stdlib module (code, comments, docstrings; tests and site-packages excluded)
    plus the pydoc topics (the language reference that ``help()`` shows); one document each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in {"site-packages", "test", "idlelib", "lib2to3"} or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) > 2000:
            docs[f"module:{'.'.join(rel.with_suffix('').parts)}"] = text
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        docs[f"topic:{name}"] = text
    return docs


def document_context(text: str) -> str:
    """What routes a document: its head (MiniLM reads at most 256 word pieces of it anyway)."""
    return text[:CONTEXT_CHARS]


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % 100 < HELDOUT_PERCENT


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def split_windows(per_doc: list[list[list[int]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Window-level split inside the training documents: every 10th window (offset 5) is held-out test
    text, every 10th (offset 2) is validation for early stopping, the rest is training text.
    Each part is (windows, index of their document)."""
    parts: dict[str, tuple[list[list[int]], list[int]]] = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for doc_index, doc in enumerate(per_doc):
        for index, window in enumerate(doc):
            rows, owners = parts[{2: "validation", 5: "test"}.get(index % 10, "train")]
            rows.append(window)
            owners.append(doc_index)
    return {name: (np.array(rows, dtype=np.int64), np.array(owners)) for name, (rows, owners) in parts.items()}


def farthest_path(tree: CentroidTree, embedding: np.ndarray) -> list[int]:
    """A deliberately wrong path: the level-0 node farthest from the context, then greedy below it."""
    first = int(((tree.centroids[0] - embedding) ** 2).sum(-1).argmax())
    path = [first]
    for level in range(1, tree.memory.num_levels):
        k = tree.memory.branching[level]
        children = path[-1] * k + np.arange(k)
        path.append(int(children[((tree.centroids[level][children] - embedding) ** 2).sum(-1).argmin()]))
    return path


def heldout_items(tokenizer: Tokenizer, rows: np.ndarray, contexts: list[str], context_tokens: int) -> list[dict]:
    """Held-out windows as the JSON lines ``hm-export verify`` reads: routing text (the head of the
    window's document), the window's text and tokens; perplexity is scored after ``context_tokens``."""
    return [
        {
            "context": context,
            "text": tokenizer.decode(w.tolist()),
            "tokens": w.tolist(),
            "context_tokens": context_tokens,
        }
        for w, context in zip(rows, contexts)
    ]


def second_half_nll(model: MemoryLM, items: list[dict], paths: np.ndarray | None) -> float:
    """Mean NLL of each window's tokens after its routing context (the router never sees them)."""
    tokens = torch.tensor([item["tokens"] for item in items])
    return mean_nll(model, tokens, paths, skip=items[0]["context_tokens"] - 1)


def evaluate_set(model: MemoryLM, tree: CentroidTree, items: list[dict], embedder: MiniLMEmbedder) -> dict:
    embeddings = embedder.embed([item["context"] for item in items])
    routed = tree.route(embeddings)
    wrong = np.array([farthest_path(tree, e) for e in embeddings])
    results: dict = {"windows": len(items)}
    for name, paths in (("anchor_only", None), ("routed_memory", routed), ("wrong_path_memory", wrong)):
        nll = second_half_nll(model, items, paths)
        results[name] = {"perplexity": round(math.exp(nll), 4), "nll": round(nll, 5)}
    gain = 1 - results["routed_memory"]["perplexity"] / results["anchor_only"]["perplexity"]
    results["routed_vs_anchor_perplexity_reduction"] = round(gain, 4)
    results["distinct_routed_paths"] = len({tuple(p) for p in routed})
    return results


def evaluate(checkpoint_dir: Path, sets: dict[str, list[dict]], embedder: MiniLMEmbedder) -> dict:
    """Evaluate the *reloaded* checkpoint (fp16 storage) on each held-out set."""
    ckpt = load_checkpoint(checkpoint_dir)
    return {
        "routing": "memory routed from the head of the window's document (never overlapping the window); "
        "perplexity on the second half of each window",
        "scored_tokens_per_window": ckpt.config.max_seq_len - next(iter(sets.values()))[0]["context_tokens"] + 1,
        **{name: evaluate_set(ckpt.model, ckpt.tree, items, embedder) for name, items in sets.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint")
    parser.add_argument("--anchor-steps", type=int, default=1200)
    parser.add_argument("--memory-steps", type=int, default=800)
    parser.add_argument("--memory-lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()

    cfg = ModelConfig(
        vocab_size=4096,
        d_model=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        ffn_hidden=512,
        max_seq_len=128,
        memory=MemoryConfig(branching=(8, 8), widths=(64, 32), layers=(0, 1, 2, 3)),
    )
    docs = stdlib_documents()
    train_docs = [t for n, t in docs.items() if not is_heldout(n)]
    unseen_docs = [t for n, t in docs.items() if is_heldout(n)]
    print(f"{len(docs)} documents, {sum(map(len, docs.values())) / 1e6:.2f} M chars; {len(unseen_docs)} held out")
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    seq = cfg.max_seq_len + 1  # windows carry one extra token for the shifted targets
    split = split_windows(document_windows(tokenizer, train_docs, seq))
    unseen_per_doc = document_windows(tokenizer, unseen_docs, seq)
    unseen = np.array([w for doc in unseen_per_doc for w in doc], dtype=np.int64)
    unseen_contexts = [document_context(unseen_docs[d]) for d, doc in enumerate(unseen_per_doc) for _ in doc]
    print({name: len(rows) for name, (rows, _) in split.items()}, f"unseen-document windows: {len(unseen)}")

    embedder = MiniLMEmbedder()
    contexts = [document_context(t) for t in train_docs]
    t0 = time.time()
    doc_embeddings = embedder.embed(contexts)
    print(f"embedded {len(contexts)} document heads in {time.time() - t0:.0f}s")
    tree, _ = build_tree(doc_embeddings, cfg.memory, seed=args.seed)
    doc_paths = tree.route(doc_embeddings)  # a document's windows share its greedily routed path
    train_rows, train_owner = split["train"]
    train_paths = torch.from_numpy(doc_paths[train_owner])

    context_tokens = cfg.max_seq_len // 2
    val_rows, val_owner = (part[::VALIDATION_STRIDE] for part in split["validation"])  # a cheap, fixed subset
    validation = heldout_items(tokenizer, val_rows, [contexts[d] for d in val_owner], context_tokens)
    validation_paths = doc_paths[val_owner]

    model = MemoryLM(cfg)
    data = torch.from_numpy(train_rows)
    anchor_losses = train(
        model, model.anchor_parameters(), data, None, args.anchor_steps, 3e-3, args.batch, args.seed, "anchor"
    )
    for p in model.anchor_parameters():
        p.requires_grad_(False)
    memory_losses = train(
        model,
        list(model.bank.parameters()),
        data,
        train_paths,
        args.memory_steps,
        args.memory_lr,
        args.batch,
        args.seed + 1,
        "memory",
        validate=lambda: second_half_nll(model, validation, validation_paths),
    )

    metadata = {
        "trained_by": "examples/stdlib_docs/train.py",
        "seed": args.seed,
        "anchor_steps": args.anchor_steps,
        "memory_steps": args.memory_steps,
        "memory_lr": args.memory_lr,
        "batch": args.batch,
        "train_windows": len(train_rows),
        "routing": "document head (first 1200 characters)",
    }
    save_checkpoint(args.out, model, tree, tokenizer, storage_dtype="float16", metadata=metadata)
    test_rows, test_owner = split["test"]
    test = heldout_items(tokenizer, test_rows, [contexts[d] for d in test_owner], context_tokens)
    shipped = test[:: max(1, len(test) // SHIPPED_HELDOUT)][:SHIPPED_HELDOUT]  # a fixed, spread-out subset
    (args.out.parent / "heldout.jsonl").write_text("".join(json.dumps(h) + "\n" for h in shipped))
    sets = {
        "heldout_windows": test,
        "unseen_documents": heldout_items(tokenizer, unseen, unseen_contexts, context_tokens),
    }
    report = evaluate(args.out, sets, embedder)
    report["training"] = {
        **metadata,
        "final_anchor_loss": round(float(np.mean(anchor_losses.losses[-50:])), 4),
        "final_memory_loss": round(float(np.mean(memory_losses.losses[-50:])), 4),
        "wall_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "anchor_params": sum(p.numel() for p in model.anchor_parameters()),
        "bank_params": sum(p.numel() for p in model.bank.parameters()),
        "fetched_params_per_path": sum(cfg.block_params(lv) for lv in range(cfg.memory.num_levels)),
        "python": sysconfig.get_python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    (args.out.parent / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
