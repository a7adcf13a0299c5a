"""The bundle's integrity root: ``bundle.sig`` seals the exact bytes of ``manifest.json``.

The manifest lists every other file with its size and sha256 (the bank blocks through ``bank/index.json``'s
CRC-32s), so it is the one thing to protect.  ``bundle.sig`` holds

* ``manifest_sha256``: the sha256 of the manifest's exact bytes, written by every export.  Runtimes check it
  before parsing a single field (no JSON re-serialisation, whose number formatting differs between
  languages): a damaged or carelessly edited manifest is refused;
* optionally ``signature``: an Ed25519 signature of the same bytes (``hm-export sign``, or ``export
  --sign-key``).  A loader given a trusted public key (``--verify-key``; ``HmExportError`` unless it
  verifies) refuses any bundle not signed by it, so an edit that recomputes every checksum -- a buggy
  writer or a hostile download -- is refused too.

The manifest is written canonically (keys sorted, ASCII, two-space indent, one trailing newline) so the
same content always has the same digest.  Signing uses PyCA ``cryptography`` (``pip install
'hm-export[sign]'``); checking the digest needs nothing.  Keys are PEM files (PKCS#8 private key,
SubjectPublicKeyInfo public key) or, for public keys, 64 hex digits (the raw 32-byte key).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm_export.errors import InputError, IntegrityError, missing_extra
from hm_export.formats import parse_json
from hm_export.safeio import read_capped

SEAL_FILE = "bundle.sig"
SEAL_FORMAT = "hm-export-bundle-seal"
SEAL_VERSION = 1
MAX_SEAL_BYTES = 64 << 10
MAX_KEY_BYTES = 16 << 10
ALGORITHM = "ed25519"


def canonical_json(body: Any) -> bytes:
    """The bytes a manifest is written as: sorted keys, ASCII only, two-space indent, trailing newline."""
    return (json.dumps(body, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode()


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise missing_extra("cryptography", "sign", "Ed25519 signing and signature checks") from None
    return ed25519


def _serialization() -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization

    return serialization


def public_key_bytes(path: Path) -> bytes:
    """The raw 32-byte Ed25519 public key in ``path`` (PEM, or 64 hex digits)."""
    data = read_capped(path, "public key", MAX_KEY_BYTES, InputError).strip()
    if len(data) == 64 and all(c in b"0123456789abcdefABCDEF" for c in data):
        return bytes.fromhex(data.decode())
    serialization = _serialization()
    try:
        key = serialization.load_pem_public_key(data)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    except Exception as exc:  # cryptography raises ValueError / UnsupportedAlgorithm
        raise InputError(f"{path}: not an Ed25519 public key (PEM or 64 hex digits): {exc}", path=path) from None
    if len(raw) != 32:
        raise InputError(f"{path}: not an Ed25519 public key", path=path)
    return raw


def _private_key(path: Path) -> Any:
    ed25519 = _crypto()
    serialization = _serialization()
    data = read_capped(path, "private key", MAX_KEY_BYTES, InputError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception as exc:
        raise InputError(f"{path}: not an unencrypted PEM private key: {exc}", path=path) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key", path=path)
    return key


def generate_key(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair (private PEM readable by the owner only, public PEM); return the public
    key as hex (what the C API and apps embed)."""
    ed25519 = _crypto()
    serialization = _serialization()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    for path in (private_path, public_path):
        if Path(path).exists():
            raise InputError(f"{path}: already exists (not overwriting a key)", path=path)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    Path(public_path).write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def seal_body(manifest: bytes, private_key: Path | None = None) -> dict[str, Any]:
    """The contents of ``bundle.sig`` for these manifest bytes (signed with ``private_key`` when given)."""
    body: dict[str, Any] = {
        "format": SEAL_FORMAT,
        "format_version": SEAL_VERSION,
        "manifest": "manifest.json",
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    if private_key is not None:
        serialization = _serialization()
        key = _private_key(Path(private_key))
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        body["signature"] = {"algorithm": ALGORITHM, "public_key": public.hex(), "value": key.sign(manifest).hex()}
    return body


def write_seal(root: Path, manifest: bytes, private_key: Path | None = None) -> None:
    """Write ``root/bundle.sig`` for the manifest bytes (through a temp file and a rename)."""
    tmp = Path(root) / f".{SEAL_FILE}.tmp"
    tmp.write_bytes(canonical_json(seal_body(manifest, private_key)))
    os.replace(tmp, Path(root) / SEAL_FILE)


@dataclass(frozen=True)
class Seal:
    """What a bundle's seal says: the manifest digest, and the signer's public key (hex) when signed;
    ``verified``: the signature was checked against a trusted key."""

    manifest_sha256: str
    signer: str | None
    verified: bool


def check_seal(root: Path, manifest: bytes, verify_key: bytes | None = None) -> Seal:
    """Check the manifest bytes against ``root/bundle.sig``; with ``verify_key`` (raw 32-byte Ed25519 public
    key) also require a valid signature by that key.  Raises :class:`IntegrityError` naming the file."""
    path = Path(root) / SEAL_FILE
    if not path.exists() and not path.is_symlink():
        raise IntegrityError(
            f"{path}: missing: the bundle has no integrity root (exported by an older hm-export? export it again)",
            path=path,
        )
    body = parse_json(read_capped(path, "bundle seal", MAX_SEAL_BYTES, IntegrityError), path, IntegrityError)
    if not isinstance(body, dict) or body.get("format") != SEAL_FORMAT or body.get("format_version") != SEAL_VERSION:
        raise IntegrityError(f"{path}: not an {SEAL_FORMAT} version {SEAL_VERSION} file", path=path)
    digest = hashlib.sha256(manifest).hexdigest()
    if body.get("manifest_sha256") != digest:
        raise IntegrityError(
            f"{Path(root) / 'manifest.json'}: sha256 {digest[:16]}... differs from the one sealed in {path} "
            "(manifest damaged or edited after export)",
            path=Path(root) / "manifest.json",
            field="manifest_sha256",
        )
    signature = body.get("signature")
    signer = signature.get("public_key") if isinstance(signature, dict) else None
    if verify_key is None:
        return Seal(digest, signer if isinstance(signer, str) else None, False)
    if not isinstance(signature, dict):
        raise IntegrityError(f"{path}: the bundle is not signed, and a verify key was given", path=path)
    value = signature.get("value")
    if signature.get("algorithm") != ALGORITHM or not isinstance(value, str):
        raise IntegrityError(f"{path}: signature is not an {ALGORITHM} signature", path=path, field="signature")
    ed25519 = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(verify_key).verify(bytes.fromhex(value), manifest)
    except Exception:  # InvalidSignature, or a malformed value
        raise IntegrityError(
            f"{path}: signature does not verify with the given key (manifest edited, or signed by another key)",
            path=path,
            field="signature",
        ) from None
    return Seal(digest, verify_key.hex(), True)


def sign_bundle(root: Path, private_key: Path) -> str:
    """Sign an exported bundle's manifest with ``private_key``; returns the public key (hex).  The manifest
    must still match its digest: a bundle edited since export is refused, not re-sealed."""
    root = Path(root)
    manifest = read_capped(root / "manifest.json", "bundle manifest", 64 << 20, IntegrityError)
    check_seal(root, manifest)
    write_seal(root, manifest, private_key)
    return str(seal_signer(root))


def seal_signer(root: Path) -> str | None:
    """The public key (hex) that signed the bundle's seal, if it is signed (not a verification)."""
    path = Path(root) / SEAL_FILE
    body = parse_json(read_capped(path, "bundle seal", MAX_SEAL_BYTES, IntegrityError), path, IntegrityError)
    signature = body.get("signature") if isinstance(body, dict) else None
    signer = signature.get("public_key") if isinstance(signature, dict) else None
    return signer if isinstance(signer, str) else None
