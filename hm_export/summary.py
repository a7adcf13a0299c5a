"""``inspect``: a summary of a bundle's manifest, as data (``--json``) and as a few readable lines."""

from __future__ import annotations

import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hm_export.bundle import MANIFEST, read_manifest, safe_relative
from hm_export.errors import BundleError
from hm_export.formats.manifest import Manifest
from hm_export.integrity import seal_signer

MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")


def summarize_bundle(bundle_dir: Path, verify_key: bytes | None = None) -> dict[str, Any]:
    """The manifest's model, slot, bank, targets, checks, files and versions, plus the seal (signer, and
    whether the signature was verified with ``verify_key``); raises HmExportError naming the file."""
    root = Path(bundle_dir)
    manifest = read_manifest(root, verify_key)
    try:
        return _summarize(root, manifest, verify_key is not None)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{root / MANIFEST}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _summarize(bundle_dir: Path, manifest: Manifest, verified: bool) -> dict[str, Any]:
    model, slot = manifest.model, manifest.slot
    bank_dir = safe_relative(bundle_dir, manifest.bank.dir, "bank", kind="dir")
    return {
        "bundle": str(bundle_dir),
        "format_version": manifest.format_version,
        "created": manifest.created,
        "integrity": {"signed_by": seal_signer(bundle_dir), "signature_verified": verified},
        "model": {k: model.get(k) for k in MODEL_FIELDS},
        "memory": model["memory"],
        "slot": {
            "seq_len": slot["seq_len"],
            "strategy": slot.get("strategy", "host-fp32"),
            "schema_hash": slot["schema_hash"],
            "inputs": [
                {"name": t["name"], "shape": t["shape"], "dtype": t["dtype"], "level_ranges": t["level_ranges"]}
                for t in slot["tensors"]
            ],
        },
        "bank": {
            **manifest.record["bank"],
            "bytes_on_disk": _regular_bytes(bank_dir),
        },
        "targets": {
            name: {
                "files": t.files,
                "window": t.window,
                "anchor_quant": t.get("anchor_quant", {"preset": "none"}),
                "delegation": t.get("delegation") or (t.decode.get("delegation") if t.decode else None),
                "decode": {"files": t.decode.files, "cache": t.decode.get("cache")} if t.decode else None,
            }
            for name, t in manifest.targets.items()
        },
        "router": {
            "embedder": manifest.router.embedder,
            "dim": manifest.router.dim,
            "tokenizer": manifest.router.tokenizer.file if manifest.router.tokenizer else None,
            "programs": {name: p.files for name, p in manifest.router.programs.items()},
        },
        "checks": manifest.record.get("checks"),
        "files": {name: asdict(record) for name, record in manifest.files.items()},
        "versions": manifest.record.get("versions"),
    }


def _regular_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, symlinks neither followed nor counted."""
    total = 0
    for directory, _, files in os.walk(root, followlinks=False):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def summary_text(summary: dict[str, Any]) -> str:
    """``hm-export inspect`` without ``--json``: what the bundle holds, in a few lines."""
    model, memory, slot, bank = summary["model"], summary["memory"], summary["slot"], summary["bank"]
    integrity = summary["integrity"]
    signed = "not signed"
    if integrity["signed_by"]:
        state = "verified" if integrity["signature_verified"] else "not verified: pass --verify-key"
        signed = f"signed by {integrity['signed_by'][:16]}... ({state})"
    program_bytes = sum(r["bytes"] for f, r in summary["files"].items() if not f.startswith(f"{bank['dir']}/"))
    lines = [
        f"{summary['bundle']}: hm-export bundle v{summary['format_version']}, created {summary['created']}, {signed}",
        f"  model     vocab {model['vocab_size']}, d_model {model['d_model']}, {model['n_layers']} layers, "
        f"{model['n_heads']}/{model['n_kv_heads']} heads, FFN {model['ffn_hidden']}",
        f"  memory    branching {memory['branching']}, widths {memory['widths']}, on layers {memory['layers']}",
        f"  slot      {slot['strategy']}, {len(slot['inputs'])} inputs, window {slot['seq_len']} tokens",
        f"  bank      {bank['scheme']} ({', '.join(bank.get('levels', []))}), {bank['bytes_on_disk'] / 1e6:.2f} MB",
    ]
    for name, target in summary["targets"].items():
        programs = ", ".join([*target["files"].values(), *((target["decode"] or {}).get("files", {}).values())])
        lines.append(f"  target    {name}: {programs}")
    router = summary["router"]
    programs = ", ".join(f"{name}: {' '.join(files.values())}" for name, files in router["programs"].items())
    lines.append(
        f"  router    {router['embedder']} (dim {router['dim']}), "
        + (f"tokenizer {router['tokenizer']}, programs {programs}" if programs else "no router program (host embeds)")
    )
    checks = summary["checks"]
    lines.append(f"  checks    {checks['count']} golden checks" if checks else "  checks    none (--checks 0)")
    lines.append(f"  files     {len(summary['files'])} with sha256, {program_bytes / 1e6:.2f} MB outside the bank")
    return "\n".join(lines)
