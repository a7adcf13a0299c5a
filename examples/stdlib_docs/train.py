"""Train the shipped example: a small memory-augmented LM on the Python standard library's docs.

Text that needs no download: every docstring of the running interpreter's standard library (module,
class and function docstrings, parsed with ``ast``) plus ``pydoc_data.topics`` (the language
reference topics that ``help()`` shows).  One document per module / topic.

Steps (about 15-20 minutes on 2 CPU cores):
 1. split documents into train / held-out by a hash of their name;
 2. train a byte-level BPE tokenizer (``tokenizers``) on the training documents;
 3. cut documents into windows of ``seq_len`` tokens, embed each window with all-MiniLM-L6-v2 and
    build a balanced 2-level k-means tree (k = 8, 8);
 4. train the anchor alone; then freeze it and train the memory bank, each window using the blocks
    of its greedily routed path (as at inference);
 5. save the checkpoint (fp16 storage) and evaluate the *reloaded* checkpoint on held-out windows:
    the memory is routed from the first half of each window (the context) and perplexity is measured
    on the second half, so the router never sees the tokens it is scored on.

Usage: ``python examples/stdlib_docs/train.py [--out DIR] [--anchor-steps N] [--memory-steps N]``
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hm_export.checkpoint import load_checkpoint, save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.model import MemoryLM
from hm_export.router import CentroidTree, MiniLMEmbedder, build_tree

HERE = Path(__file__).resolve().parent
HELDOUT_PERCENT = 6


def stdlib_documents() -> dict[str, str]:
    """Docstrings of every stdlib module (tests and site-packages excluded) plus pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in {"site-packages", "test", "idlelib", "lib2to3"} or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    parts.append(f"{title}\n{doc}")
        if parts:
            docs[f"module:{module}"] = "\n\n".join(parts)
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        docs[f"topic:{name}"] = text
    return docs


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


def windows(tokenizer: Tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    """Non-overlapping ``seq_len`` windows of each document (a document's tail shorter than that is dropped)."""
    out = []
    for enc in tokenizer.encode_batch(docs):
        ids = enc.ids
        out += [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return np.array(out, dtype=np.int64)


def train(
    model: MemoryLM,
    params: list[torch.nn.Parameter],
    data: torch.Tensor,
    paths: torch.Tensor | None,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    label: str,
) -> list[float]:
    """AdamW with warmup + cosine decay; ``paths`` given means every window uses its memory path."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1 if paths is None else 0.0)
    gen = torch.Generator().manual_seed(seed)
    warmup, losses, start = max(1, steps // 20), [], time.time()
    for step in range(steps):
        scale = (
            (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * scale)
        idx = torch.randint(len(data), (batch,), generator=gen)
        tokens = data[idx]
        logits = model(tokens[:, :-1]) if paths is None else model.forward_path(tokens[:, :-1], paths[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"[{label}] step {step:5d}/{steps} loss {recent:.3f} ({time.time() - start:.0f}s)", flush=True)
    return losses


def farthest_path(tree: CentroidTree, embedding: np.ndarray) -> list[int]:
    """A deliberately wrong path: the level-0 node farthest from the context, then greedy below it."""
    first = int(((tree.centroids[0] - embedding) ** 2).sum(-1).argmax())
    path = [first]
    for level in range(1, tree.memory.num_levels):
        k = tree.memory.branching[level]
        children = path[-1] * k + np.arange(k)
        path.append(int(children[((tree.centroids[level][children] - embedding) ** 2).sum(-1).argmin()]))
    return path


@torch.no_grad()
def evaluate(checkpoint_dir: Path, heldout: list[dict], embedder: MiniLMEmbedder) -> dict:
    ckpt = load_checkpoint(checkpoint_dir)
    model, tree = ckpt.model, ckpt.tree
    contexts = [item["context"] for item in heldout]
    embeddings = embedder.embed(contexts)
    routed = tree.route(embeddings)
    wrong = np.array([farthest_path(tree, e) for e in embeddings])
    tokens = torch.tensor([item["tokens"] for item in heldout])
    split = heldout[0]["context_tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # mean NLL over the scored half
        losses = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return losses[:, split - 1 :].mean(1)

    results = {}
    for name, paths in (("anchor_only", None), ("routed_memory", routed), ("wrong_path_memory", wrong)):
        per_window = []
        for i in range(0, len(inputs), 64):
            batch = inputs[i : i + 64]
            logits = model(batch) if paths is None else model.forward_path(batch, torch.from_numpy(paths[i : i + 64]))
            per_window.append(nll(logits, targets[i : i + 64]))
        mean_nll = torch.cat(per_window).mean().item()
        results[name] = {"perplexity": round(math.exp(mean_nll), 4), "nll": round(mean_nll, 5)}
    gain = 1 - results["routed_memory"]["perplexity"] / results["anchor_only"]["perplexity"]
    return {
        "heldout_windows": len(heldout),
        "scored_tokens_per_window": int(inputs.shape[1] - (split - 1)),
        "routing": "memory routed from the first half of each window; perplexity on the second half",
        **results,
        "routed_vs_anchor_perplexity_reduction": round(gain, 4),
        "distinct_routed_paths": len({tuple(p) for p in routed}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint")
    parser.add_argument("--anchor-steps", type=int, default=1200)
    parser.add_argument("--memory-steps", type=int, default=1000)
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
    heldout_docs = [t for n, t in docs.items() if is_heldout(n)]
    print(f"{len(docs)} documents, {sum(map(len, docs.values())) / 1e6:.2f} M chars; {len(heldout_docs)} held out")
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    seq = cfg.max_seq_len + 1  # windows carry one extra token for the shifted targets
    train_windows, heldout_windows = windows(tokenizer, train_docs, seq), windows(tokenizer, heldout_docs, seq)
    print(f"{len(train_windows)} training windows, {len(heldout_windows)} held-out windows of {seq} tokens")

    embedder = MiniLMEmbedder()
    t0 = time.time()
    train_emb = embedder.embed(tokenizer.decode_batch(train_windows.tolist()))
    print(f"embedded training windows in {time.time() - t0:.0f}s")
    tree, _ = build_tree(train_emb, cfg.memory, seed=args.seed)
    train_paths = torch.from_numpy(tree.route(train_emb))

    model = MemoryLM(cfg)
    data = torch.from_numpy(train_windows)
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
        1e-2,
        args.batch,
        args.seed + 1,
        "memory",
    )

    context_tokens = cfg.max_seq_len // 2
    heldout = [
        {
            "context": tokenizer.decode(w[:context_tokens].tolist()),
            "text": tokenizer.decode(w.tolist()),
            "tokens": w.tolist(),
            "context_tokens": context_tokens,
        }
        for w in heldout_windows
    ]
    metadata = {
        "trained_by": "examples/stdlib_docs/train.py",
        "seed": args.seed,
        "anchor_steps": args.anchor_steps,
        "memory_steps": args.memory_steps,
        "batch": args.batch,
        "train_windows": len(train_windows),
    }
    save_checkpoint(args.out, model, tree, tokenizer, storage_dtype="float16", metadata=metadata)
    (args.out.parent / "heldout.jsonl").write_text("".join(json.dumps(h) + "\n" for h in heldout))
    report = evaluate(args.out, heldout, embedder)
    report["training"] = {
        **metadata,
        "final_anchor_loss": round(float(np.mean(anchor_losses[-50:])), 4),
        "final_memory_loss": round(float(np.mean(memory_losses[-50:])), 4),
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
