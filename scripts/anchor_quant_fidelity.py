"""Fidelity of each ``--anchor-quant`` preset against the float checkpoint, on held-out text.

For each held-out document (JSON lines with ``text`` and optional ``context``; routed on its context, or the head
of its text) one window of ``--length`` tokens is scored, taken after the routing context so the two never
overlap.  Per preset, the eager model as exported (:func:`hm_export.anchor_quant.exported_model`, i.e. torchao's
emulation of what XNNPACK computes) is compared with the float checkpoint:

* perplexity of the host alone and with the routed memory, and the memory's gain (routed vs host, in %);
* teacher-forced next-token agreement with the float host (argmax equal, per position) and the mean
  KL(float host || quantized host) in nats.

``--bundle`` adds a bundle's real ExecuTorch program (its window logits: one prefill per window, memory of the
routed path) and ``--pte`` a plain program with a KV cache returning the last position's logits (e.g.
ExecuTorch's ``export_llm`` output, fed one token per call, teacher-forced), both against the same float host.

    python scripts/anchor_quant_fidelity.py CHECKPOINT HELDOUT.jsonl --presets none,8da4w-g32 \\
        [--windows 32] [--length 128] [--bundle B] [--pte P] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hm_export.anchor_quant import exported_model, get_preset
from hm_export.checkpoint import load_checkpoint
from hm_export.formats import read_json_lines
from hm_export.router import MiniLMEmbedder


@dataclass
class Window:
    tokens: torch.Tensor  # [length]
    path: tuple[int, ...]


def held_out_windows(ckpt, documents: list[dict], count: int, length: int, context_chars: int) -> list[Window]:
    items = []
    for doc in documents:
        context = doc.get("context") or doc["text"][:context_chars]
        body = doc["text"][len(context) :] if doc["text"].startswith(context) else doc["text"]
        ids = ckpt.tokenizer.encode(body).ids
        if len(ids) >= length:
            items.append((context, torch.tensor(ids[:length])))
        if len(items) == count:
            break
    paths = ckpt.tree.route(MiniLMEmbedder().embed([context for context, _ in items]))
    return [Window(tokens, tuple(int(n) for n in path)) for (_, tokens), path in zip(items, paths)]


@torch.no_grad()
def logits_of(model, window: Window, memory: bool) -> torch.Tensor:
    tokens = window.tokens.unsqueeze(0)
    return model.forward_path(tokens, torch.tensor(window.path))[0] if memory else model(tokens)[0]


def perplexity(logits: list[torch.Tensor], windows: list[Window]) -> float:
    nll = [F.cross_entropy(lg[:-1], w.tokens[1:], reduction="sum") for lg, w in zip(logits, windows)]
    return math.exp(float(sum(nll)) / sum(len(w.tokens) - 1 for w in windows))


def against_host(logits: list[torch.Tensor], host: list[torch.Tensor]) -> dict[str, float]:
    """Teacher-forced agreement (argmax equal) and mean KL(host || logits), every position of every window."""
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, host))
    positions = sum(a.shape[0] for a in logits)
    kl = sum(
        float(F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))
        for a, b in zip(logits, host)
    )
    return {"top1_agreement": round(agree / positions, 4), "mean_kl_nats": round(kl / positions, 4)}


def bundle_logits(bundle: Path, windows: list[Window]) -> list[torch.Tensor]:
    from hm_export.runtime_stubs.loader import BundleLoader

    loader = BundleLoader(bundle, target="executorch", verify=False)
    out = []
    for window in windows:
        loader.set_path(window.path)
        out.append(loader.logits(window.tokens.tolist()).clone())
    return out


def pte_logits(pte: Path, windows: list[Window]) -> list[torch.Tensor]:
    """Teacher-forced logits of a plain KV-cache program that returns the last position's logits."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte)).load_method("forward")
    out = []
    for window in windows:
        rows = []
        for position, token in enumerate(window.tokens.tolist()):
            logits = method.execute([torch.tensor([[token]]), torch.tensor([position])])[0]
            rows.append(logits.reshape(-1, logits.shape[-1])[-1].clone())
        out.append(torch.stack(rows))
    return out


def markdown(report: dict) -> str:
    """The report's rows as a markdown table (perplexities, changes vs the float32 anchor, memory gain, agreement;
    a program's agreement and KL are against the float checkpoint with memory, a plain one's against the host)."""
    base = report["float"]
    lines = [
        "| anchor | ppl host | change | ppl routed | change | memory gain | top-1 agreement | mean KL (nats) |",
        "|---|---|---|---|---|---|---|---|",
        f"| float32 checkpoint | {base['perplexity_host']:.3f} | - | {base['perplexity_routed']:.3f} | - | "
        f"{base['memory_gain_pct']:.2f} % | - | - |",
    ]

    def cell(row: dict, keys: tuple[str, ...], fmt: str, unit: str = "") -> str:
        key = next((k for k in keys if k in row), None)
        return "-" if key is None else format(row[key], fmt) + unit

    for name, row in report["rows"].items():
        cells = [
            cell(row, ("perplexity_host",), ".3f"),
            cell(row, ("perplexity_change_vs_float_host_pct",), "+.2f", " %"),
            cell(row, ("perplexity_routed",), ".3f"),
            cell(row, ("perplexity_change_vs_float_routed_pct",), "+.2f", " %"),
            cell(row, ("memory_gain_pct",), ".2f", " %"),
            cell(row, ("top1_agreement", "top1_agreement_vs_float_routed"), ".3f"),
            cell(row, ("mean_kl_nats", "mean_kl_nats_vs_float_routed"), ".4f"),
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("heldout", type=Path)
    parser.add_argument("--presets", default="none,8da4w-g32")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--context-chars", type=int, default=1200)
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--pte", type=Path, action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ckpt = load_checkpoint(args.checkpoint)
    documents = read_json_lines(
        args.heldout, lambda d: isinstance(d, dict) and "text" in d, "needs 'text'", "documents"
    )
    windows = held_out_windows(ckpt, documents, args.windows, args.length, args.context_chars)
    host = [logits_of(ckpt.model, w, memory=False) for w in windows]
    routed = [logits_of(ckpt.model, w, memory=True) for w in windows]
    base_host, base_routed = perplexity(host, windows), perplexity(routed, windows)
    rows: dict[str, dict] = {}
    report = {
        "checkpoint": str(args.checkpoint),
        "windows": len(windows),
        "length": args.length,
        "distinct_paths": len({w.path for w in windows}),
        "float": {
            "perplexity_host": round(base_host, 4),
            "perplexity_routed": round(base_routed, 4),
            "memory_gain_pct": round(100 * (1 - base_routed / base_host), 2),
        },
        "rows": rows,
    }

    def save() -> None:  # after every row: a long run keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(report))

    for name in args.presets.split(","):
        model, _ = exported_model(ckpt.model, get_preset(name))
        q_host = [logits_of(model, w, memory=False) for w in windows]
        q_routed = [logits_of(model, w, memory=True) for w in windows]
        ppl_host, ppl_routed = perplexity(q_host, windows), perplexity(q_routed, windows)
        rows[f"eager:{name}"] = {
            "perplexity_host": round(ppl_host, 4),
            "perplexity_routed": round(ppl_routed, 4),
            "perplexity_change_vs_float_host_pct": round(100 * (ppl_host / base_host - 1), 2),
            "perplexity_change_vs_float_routed_pct": round(100 * (ppl_routed / base_routed - 1), 2),
            "memory_gain_pct": round(100 * (1 - ppl_routed / ppl_host), 2),
            **against_host(q_host, host),
        }
        print(name, rows[f"eager:{name}"], file=sys.stderr)
        save()
        del model, q_host, q_routed
    for bundle in args.bundle:
        logits = bundle_logits(bundle, windows)
        rows[f"program:{bundle.name}"] = {
            "perplexity_routed": round(perplexity(logits, windows), 4),
            "perplexity_change_vs_float_routed_pct": round(100 * (perplexity(logits, windows) / base_routed - 1), 2),
            **{f"{k}_vs_float_routed": v for k, v in against_host(logits, routed).items()},
        }
        save()
    for pte in args.pte:
        logits = pte_logits(pte, windows)
        rows[f"pte:{pte.name}"] = {
            "perplexity_host": round(perplexity(logits, windows), 4),
            "perplexity_change_vs_float_host_pct": round(100 * (perplexity(logits, windows) / base_host - 1), 2),
            **against_host(logits, host),
        }
        save()
    save()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
