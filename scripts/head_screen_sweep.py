"""How many of a screened head's logits must be exact: the output head alone, on a float host's hidden states.

For each held-out window (the documents ``bench_peers`` scores), the float host's final hidden states go through
its tied head stored four ways: float32, int8 in groups of 32 (Q8_0's grid), asymmetric int4 in groups of 32
(Q4_1's grid), and screened (``hm_export::screened_head``: every logit from the int4 copy, the ``top`` largest per
position from the int8 table with float activations), for each ``--tops``.  Reports the teacher-forced perplexity,
top-1 agreement and mean KL against the float head.  The rest of the model stays float, so the figures isolate the
head; the whole quantized anchor is measured by scripts/anchor_quant_fidelity.py.

    python scripts/head_screen_sweep.py /work/artifacts/peers/smollm2-135m-hf --windows 16 --tops 8,16,32,64,128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import text_windows

from hm_export.anchor_quant import GridLinear, WeightQuant
from hm_export.kernels import screened_head


def scores(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    log_probs = torch.log_softmax(logits, dim=-1)
    reference_log_probs = torch.log_softmax(reference, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).mean().item()
    kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean().item()
    return {
        "perplexity": round(math.exp(nll), 4),
        "top1_agreement": round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4),
        "mean_kl": round(kl, 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", type=Path, help="A transformers directory with a tied head (and tokenizer.json).")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tops", default="8,16,32,64,128", help="Exact logits per position, comma-separated.")
    parser.add_argument("--json", type=Path, help="Write the report here.")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    host = AutoModelForCausalLM.from_pretrained(args.host, dtype=torch.float32).eval()
    windows = text_windows(args.host / "tokenizer.json", args.windows, args.length, skip=1)
    with torch.no_grad():
        tokens = [torch.tensor([ids]) for _, ids in windows]
        hidden = torch.cat([host.model(t).last_hidden_state[0, :-1] for t in tokens])
        targets = torch.cat([t[0, 1:] for t in tokens])
        weight = host.get_output_embeddings().weight.detach().float()
        exact, screen = GridLinear(weight, WeightQuant(8, 32)), GridLinear(weight, WeightQuant(4, 32, asymmetric=True))
        reference = hidden @ weight.t()
        heads = {
            "float32": reference,
            "int8 g32 (Q8_0 grid), float activations": hidden @ exact.dequantized().t(),
            "asym. int4 g32 (Q4_1 grid), float activations": hidden @ screen.dequantized().t(),
        }
        tables = ((screen.codes, screen.scales, screen.mins), (exact.codes, exact.scales, exact.mins))
        for top in (int(t) for t in args.tops.split(",")):
            per_window = [screened_head(h, *tables, top) for h in hidden.split(args.length - 1)]  # bounded memory
            heads[f"screened, top {top} exact"] = torch.cat(per_window)
        rows = {name: scores(logits, reference, targets) for name, logits in heads.items()}
    report = {"host": str(args.host), "windows": args.windows, "length": args.length, "positions": len(targets)}
    report["heads"] = rows
    for name, row in rows.items():
        print(f"{name:48s} ppl {row['perplexity']:.3f}  top-1 {row['top1_agreement']:.3f}  KL {row['mean_kl']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
