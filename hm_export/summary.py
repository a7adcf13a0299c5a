"""``inspect``: a readable summary of a bundle's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hm_export.bundle import MANIFEST, BundleError, read_manifest, safe_relative


def summarize_bundle(bundle_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(Path(bundle_dir))
    try:
        return _summarize(Path(bundle_dir), manifest)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _summarize(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    model, slot = manifest["model"], manifest["slot"]
    bank_dir = safe_relative(bundle_dir, manifest["bank"]["dir"], "bank")
    return {
        "bundle": str(bundle_dir),
        "format_version": manifest["format_version"],
        "created": manifest["created"],
        "model": {k: model[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")},
        "memory": model["memory"],
        "slot": {
            "seq_len": slot["seq_len"],
            "schema_hash": slot["schema_hash"],
            "inputs": [
                {"name": t["name"], "shape": t["shape"], "dtype": t["dtype"], "level_ranges": t["level_ranges"]}
                for t in slot["tensors"]
            ],
        },
        "bank": {
            **manifest["bank"],
            "bytes_on_disk": sum(p.stat().st_size for p in bank_dir.rglob("*") if p.is_file()),
        },
        "targets": {
            name: {
                "files": t["files"],
                "delegation": t.get("delegation"),
                "decode": {"files": t["decode"]["files"], "cache": t["decode"]["cache"]} if "decode" in t else None,
            }
            for name, t in manifest["targets"].items()
        },
        "router": {
            "embedder": manifest["router"]["embedder"],
            "dim": manifest["router"]["dim"],
            "tokenizer": manifest["router"].get("tokenizer", {}).get("file"),
            "programs": {name: p["files"] for name, p in manifest["router"].get("programs", {}).items()},
        },
        "checks": manifest.get("checks"),
        "files": manifest["files"],
        "versions": manifest["versions"],
    }
