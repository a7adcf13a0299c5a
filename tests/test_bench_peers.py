"""The pure parts of scripts/bench_peers.py: quality math, the ratio report, the table and the targets.

The benchmark itself (llama.cpp, export_llm, our bundles on SmolLM2) is a script whose results live in
docs/peers.md; nothing here is timed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_peers.py"
spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
peers = importlib.util.module_from_spec(spec)
sys.modules["bench_peers"] = peers  # dataclasses look their module up
spec.loader.exec_module(peers)


def test_teacher_forced_agreement_kl_and_nll():
    reference = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=np.float32))
    same = peers.teacher_forced(reference, reference, [0, 2])
    assert same["top1_agree"] == 2 and same["kl_mean_nats"] == 0.0
    assert same["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, abs=1e-5)
    # A system that swaps the first row's top two tokens: one agreement, KL of that row only.
    other = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3]], dtype=np.float32))
    got = peers.teacher_forced(reference, other + 5.0, [0, 2])  # logits are shift-invariant
    kl_row = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    assert got["top1_agree"] == 1 and got["top1_agreement"] == 0.5
    assert got["kl_mean_nats"] == pytest.approx(kl_row / 2, abs=1e-4)
    assert got["kl_max_nats"] == pytest.approx(kl_row, abs=1e-3)
    with pytest.raises(ValueError, match="logits"):
        peers.teacher_forced(reference, other[:1], [0])


def _result(prefill: float, decode: float, rss: float, p10_ms: float | None = None) -> dict:
    result = {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "peak_rss_mb": rss}
    return result if p10_ms is None else {**result, "decode_step_ms_p10": p10_ms}


def test_fastest_decile_is_the_tenth_percentile_step():
    steps = [0.010 + 0.001 * k for k in range(20)][::-1]  # 20 steps, 10..29 ms, slowest first
    assert peers.fastest_decile(steps) == pytest.approx(0.012)  # the third fastest: index 20 // 10
    assert peers.fastest_decile([0.5, 0.2, 0.9]) == 0.2


def test_summary_ratios_against_each_baseline_at_the_same_thread_count():
    speed = {
        "llama:q4_1": {1: [_result(200, 100, 50, 8.0), _result(200, 110, 52, 7.5)], 2: [_result(400, 150, 55)]},
        "etllm:8da4w": {1: [_result(1000, 160, 300), _result(1000, 180, 310)]},  # results from before p10
        "hm:mem": {1: [_result(300, 40, 900, 20.0), _result(250, 50, 950, 16.0)], 2: [_result(500, 75, 990)]},
    }
    meta = {
        "llama:q4_1": {"bytes_on_disk": 100, "bytes_per_token": 100, "ceiling_tokens_per_s": 150.0},
        "etllm:8da4w": {"bytes_on_disk": 94, "bytes_per_token": 80, "ceiling_tokens_per_s": 200.0},
        "hm:mem": {"bytes_on_disk": 1300, "bytes_per_token": 575, "ceiling_tokens_per_s": 27.0},
    }
    rows = peers.summarize(speed, meta, {"llama": "llama:q4_1", "etllm": "etllm:8da4w"})
    row = {(r["system"], r["threads"]): r for r in rows}
    mem1 = row[("hm:mem", 1)]
    assert mem1["decode_tokens_per_s"] == {"mean": 45.0, "sd": round(math.sqrt(50), 2), "runs": [40.0, 50.0]}
    assert mem1["peak_rss_mb"] == 950
    assert mem1["fraction_of_ceiling"] == round(45 / 27, 3)
    assert mem1["ratios"]["llama"] == {
        "prefill": 1.375,
        "decode": round(45 / 105, 3),
        "decode_paired": {"median": round((40 / 100 + 50 / 110) / 2, 3), "min": 0.4, "max": round(50 / 110, 3)},
        "decode_least_contended": round(62.5 / 133.33, 3),  # 1000 / 16 ms over 1000 / 7.5 ms
        "bytes": 13.0,
        "peak_rss": round(950 / 52, 3),
    }
    assert (
        mem1["decode_tokens_per_s_least_contended"] == 62.5
        and mem1["ratios"]["etllm"]["decode_least_contended"] is None
    )
    assert mem1["ratios"]["etllm"]["decode"] == round(45 / 170, 3)
    # No export_llm row at 2 threads: only the llama ratio exists there.
    assert set(row[("hm:mem", 2)]["ratios"]) == {"llama"}
    assert row[("hm:mem", 2)]["ratios"]["llama"]["decode"] == 0.5

    report = {
        "speed": rows,
        "baselines": {"llama": "llama:q4_1", "etllm": "etllm:8da4w"},
        "quality": {
            "hm:mem": {
                "float host": {
                    "positions": 4,
                    "top1_agree": 3,
                    "top1_agreement": 0.75,
                    "kl_mean_nats": 0.01,
                    "kl_max_nats": 0.05,
                    "nll": 2.0,
                    "perplexity": 7.389,
                }
            }
        },
    }
    table = peers.markdown_tables(report)
    assert "| `hm:mem` | 1 | 275.0 +/- 35.4 | 45.0 +/- 7.1 | - | 0.43x | 1.38x | 0.27x | 0.28x |" in table
    assert "| `hm:mem` | 0.0 | 0.0 | 27 | 1.67 | - | 950 | 13.00x | 18.27x | 13.83x | 3.06x |" in table
    assert "| `hm:mem` | float host | 4 | 3/4 (75.0%) | 0.0100 |" in table
    # round by round: 40/100, 50/110 ...; then the fastest deciles' ratios (none for export_llm's older results)
    assert "| `hm:mem` | 1 | 62.5 | 0.43x (0.40-0.46) | 0.26x (0.25-0.28) | 0.47x | - |" in table
    targets = peers.targets_check(report, "hm:mem")
    assert targets["decode_vs_etllm"] == {"measured": 0.265, "target": ">= 1.0", "met": False}
    assert targets["bytes_vs_llama"] == {"measured": 13.0, "target": "<= 1.25", "met": False}
    report["targets"] = {"hm:mem": targets}
    assert "| `hm:mem` | 0.27x (missed) | 0.43x (missed) | 13.00x (missed) |" in peers.markdown_tables(report)


def test_system_spec_is_checked(tmp_path):
    artifact = tmp_path / "model.gguf"
    artifact.write_bytes(b"")
    system = peers.System.parse(f"llama:q4_1={artifact}")
    assert (system.kind, system.name, system.label) == ("llama", "q4_1", "llama:q4_1")
    with pytest.raises(ValueError, match="KIND:NAME=PATH"):
        peers.System.parse(f"mlc:x={artifact}")
    with pytest.raises(ValueError, match="does not exist"):
        peers.System.parse(f"llama:q4_1={tmp_path / 'missing.gguf'}")


def test_bundle_bytes_count_the_one_program_once_and_one_path(decode_bundle):
    """One-program layout: the decode program is the target's only program (named by its entry and its decode
    entry alike: counted once); one path = the largest block of each level; the router is reported apart."""
    _, bundle = decode_bundle
    on_disk, per_token, parts = peers._bundle_bytes(bundle, "executorch")
    manifest = json.loads((bundle / "manifest.json").read_text())
    program = (bundle / "executorch" / "decode.pte").stat().st_size
    largest: dict[int, int] = {}
    for block in json.loads((bundle / "bank" / "index.json").read_text())["blocks"]:
        largest[block["level"]] = max(largest.get(block["level"], 0), block["length"])
    router = sum(p.stat().st_size for p in (bundle / "router").rglob("*") if p.is_file())
    router += (bundle / "router.safetensors").stat().st_size
    assert parts == {
        "programs": program,
        "program_files": 1,
        "path_blocks": sum(largest.values()),
        "embedding_table": 0,  # a float anchor: its tied table is the head, read whole every step
        "router_not_counted": router,
    }
    assert on_disk == per_token == program + sum(largest.values())
    assert manifest["targets"]["executorch"]["window"] == "decode"
    table = 64 * 32 // 2 + 2 * 64 * 32 // 32  # int4 codes + one float16 scale per group of 32
    assert peers.embedding_table_bytes(64, 32, {"weights": "int4 groups of 32", "group": 32}) == table
    assert peers.embedding_table_bytes(64, 32, None) == 0  # float tied table: the head, read whole
    shared = {"weights": "int8 groups of 32, float16 scales", "group": 32, "shared_with_head": True}
    assert peers.embedding_table_bytes(64, 32, shared) == 0  # -asym: the lookup reads the head's table
    screened = {"scheme": "screened", "exact_top": 64}  # -screen64: the step reads the int4 screen, 64 columns here
    assert peers.embedding_table_bytes(64, 32, shared, screened) == 64 * 32 + 2 * 64 * 32 // 32
