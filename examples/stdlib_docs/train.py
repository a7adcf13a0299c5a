"""Train the shipped example: a small memory-augmented LM on the Python standard library.

Text that needs no download: the source of every standard-library module plus the ``pydoc_data.topics``
language reference, one document per module / topic (:func:`hm_export.corpus.stdlib_documents`).

Steps (about 20 minutes on 2 quiet CPU cores):
 1. hold out whole documents by a hash of their name ("unseen documents", never trained on); a further
    ``--validation-docs`` share is held out whole as unseen-document validation; inside the training
    documents, window 2 of every 10 is validation text and window 5 of every 10 test text
    (:func:`hm_export.training.split_windows`);
 2. train a byte-level BPE tokenizer (``tokenizers``) on the training documents;
 3. cut documents into windows of ``seq_len`` tokens, embed each training document's head with
    all-MiniLM-L6-v2 and build a balanced 2-level k-means tree;
 4. train the anchor alone; then freeze it and train the memory bank, each window using the blocks
    of its document's greedily routed path (as at inference), keeping the bank of the step with the best
    validation perplexity (``--early-stopping``: validation windows, validation documents, or both);
 5. save the checkpoint (fp16 storage) and evaluate the *reloaded* checkpoint on both held-out sets
    (:func:`hm_export.evaluation.evaluate_memory`): the memory is routed from the head of the window's
    document and perplexity is measured on the second half of each window.

Usage: ``python examples/stdlib_docs/train.py [--out DIR] [--anchor-steps N] [--memory-steps N] ...``;
``--anchor-from CKPT`` reuses a trained anchor and its tokenizer (for comparing memory recipes).
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hm_export.checkpoint import anchor_state, load_checkpoint, save_checkpoint
from hm_export.config import MemoryConfig, ModelConfig
from hm_export.corpus import is_heldout, stdlib_documents
from hm_export.evaluation import evaluate_memory
from hm_export.model import MemoryLM
from hm_export.router import MiniLMEmbedder, build_tree
from hm_export.training import document_windows, mean_nll, split_windows, spread, train

HERE = Path(__file__).resolve().parent
HELDOUT_PERCENT = 6
CONTEXT_CHARS = 1200
VALIDATION_WINDOWS = 400  # validation windows per set (an evenly spread, fixed subset)
SHIPPED_HELDOUT = 256  # held-out windows written to heldout.jsonl for verify / checks


def document_context(text: str) -> str:
    """What routes a document: its head (MiniLM reads at most 256 word pieces of it anyway)."""
    return text[:CONTEXT_CHARS]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint")
    parser.add_argument("--eval-json", type=Path, default=None, help="default: eval.json next to --out")
    parser.add_argument("--anchor-from", type=Path, default=None, help="reuse this checkpoint's anchor and tokenizer")
    parser.add_argument("--anchor-steps", type=int, default=1100)
    parser.add_argument("--memory-steps", type=int, default=800)
    parser.add_argument("--memory-lr", type=float, default=5e-3)
    parser.add_argument("--branching", default="8,8")
    parser.add_argument("--widths", default="64,32")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--validation-docs", type=int, default=0, help="percent of documents held out for validation")
    parser.add_argument("--early-stopping", choices=["validation", "documents", "both"], default="validation")
    parser.add_argument("--eval-limit", type=int, default=0, help="windows per evaluation set (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    started = time.time()
    memory = MemoryConfig(branching=ints(args.branching), widths=ints(args.widths), layers=(0, 1, 2, 3))
    cfg = ModelConfig(
        vocab_size=4096,
        d_model=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        ffn_hidden=512,
        max_seq_len=128,
        memory=memory,
    )
    docs = stdlib_documents()
    unseen_names = [n for n in docs if is_heldout(n, HELDOUT_PERCENT)]
    validation_names = [n for n in docs if n not in unseen_names and is_heldout(n, args.validation_docs, "validation:")]
    train_names = [n for n in docs if n not in unseen_names and n not in validation_names]
    print(
        f"{len(docs)} documents, {sum(map(len, docs.values())) / 1e6:.2f} M chars; {len(unseen_names)} unseen, "
        f"{len(validation_names)} validation documents",
        flush=True,
    )
    reused = load_checkpoint(args.anchor_from) if args.anchor_from else None
    tokenizer = reused.tokenizer if reused else train_tokenizer([docs[n] for n in train_names], cfg.vocab_size)
    seq = cfg.max_seq_len + 1  # windows carry one extra token for the shifted targets
    per_doc = document_windows(tokenizer, [docs[n] for n in train_names + validation_names], seq)
    split = split_windows(per_doc, held_docs=set(range(len(train_names), len(per_doc))))
    unseen_per_doc = document_windows(tokenizer, [docs[n] for n in unseen_names], seq)
    unseen = np.array([w for doc in unseen_per_doc for w in doc], dtype=np.int64)
    unseen_contexts = [document_context(docs[unseen_names[d]]) for d, doc in enumerate(unseen_per_doc) for _ in doc]
    print({name: len(rows) for name, (rows, _) in split.items()}, f"unseen-document windows: {len(unseen)}", flush=True)

    embedder = MiniLMEmbedder()
    contexts = [document_context(docs[n]) for n in train_names + validation_names]
    doc_embeddings = embedder.embed(contexts)
    tree, _ = build_tree(doc_embeddings[: len(train_names)], cfg.memory, seed=args.seed)
    doc_paths = tree.route(doc_embeddings)  # a document's windows share its greedily routed path
    train_rows, train_owner = split["train"]
    train_paths = torch.from_numpy(doc_paths[train_owner])

    context_tokens = cfg.max_seq_len // 2
    skip = context_tokens - 1
    checks = {}
    for name in ("validation", "documents"):
        rows, owners = split[name]
        keep = spread(len(rows), VALIDATION_WINDOWS)
        if len(keep):
            checks[name] = (torch.from_numpy(rows[keep]), doc_paths[owners[keep]])
    criterion = [n for n in checks if args.early_stopping in (n, "both")] or list(checks)

    model = MemoryLM(cfg)
    data = torch.from_numpy(train_rows)
    anchor_losses: list[float] = []
    if reused:
        model.load_state_dict(anchor_state(reused.model), strict=False)
    else:
        anchor = train(
            model, model.anchor_parameters(), data, None, args.anchor_steps, 3e-3, args.batch, args.seed, "anchor"
        )
        anchor_losses = anchor.losses
    for p in model.anchor_parameters():
        p.requires_grad_(False)

    def validate() -> float:
        return float(np.mean([mean_nll(model, checks[n][0], checks[n][1], skip) for n in criterion]))

    result = train(
        model,
        list(model.bank.parameters()),
        data,
        train_paths,
        args.memory_steps,
        args.memory_lr,
        args.batch,
        args.seed + 1,
        "memory",
        validate=validate,
        eval_every=args.eval_every,
    )

    metadata = {
        "trained_by": "examples/stdlib_docs/train.py",
        "seed": args.seed,
        "anchor_steps": 0 if reused else args.anchor_steps,
        "anchor_from": str(args.anchor_from) if reused else None,
        "memory_steps": args.memory_steps,
        "memory_lr": args.memory_lr,
        "batch": args.batch,
        "train_windows": len(train_rows),
        "validation_documents": len(validation_names),
        "early_stopping": args.early_stopping,
        "kept_step": result.kept_step,
        "routing": "document head (first 1200 characters)",
    }
    save_checkpoint(args.out, model, tree, tokenizer, storage_dtype="float16", metadata=metadata)
    test_rows, test_owner = split["test"]
    test_contexts = [contexts[d] for d in test_owner]
    test = heldout_items(tokenizer, test_rows, test_contexts, context_tokens)
    shipped = test[:: max(1, len(test) // SHIPPED_HELDOUT)][:SHIPPED_HELDOUT]  # a fixed, spread-out subset
    (args.out.parent / "heldout.jsonl").write_text("".join(json.dumps(h) + "\n" for h in shipped))

    ckpt = load_checkpoint(args.out)  # evaluate the reloaded (fp16) checkpoint
    report = {
        "routing": "memory routed from the head of the window's document; perplexity on the second half of each window"
    }
    for name, rows, row_contexts in (
        ("heldout_windows", test_rows, test_contexts),
        ("unseen_documents", unseen, unseen_contexts),
    ):
        keep = spread(len(rows), args.eval_limit or len(rows))
        picked = [row_contexts[i] for i in keep]
        report[name] = evaluate_memory(ckpt.model, ckpt.tree, embedder, rows[keep], picked, skip)
    report["training"] = {
        **metadata,
        "validation_curve": [[step, round(value, 5)] for step, value in result.validation],
        "final_anchor_loss": round(float(np.mean(anchor_losses[-50:])), 4) if anchor_losses else None,
        "final_memory_loss": round(float(np.mean(result.losses[-50:])), 4),
        "wall_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "anchor_params": sum(p.numel() for p in model.anchor_parameters()),
        "bank_params": sum(p.numel() for p in model.bank.parameters()),
        "fetched_params_per_path": sum(cfg.block_params(lv) for lv in range(cfg.memory.num_levels)),
        "memory_share_of_ffn": round(cfg.memory.total_width / cfg.ffn_hidden, 4),
        "python": sysconfig.get_python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    (args.eval_json or args.out.parent / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("heldout_windows", "unseen_documents")}, indent=2))


if __name__ == "__main__":
    main()
