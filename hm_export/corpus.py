"""Documents to train memories on: a JSON-lines corpus, or the text every Python installation ships.

:func:`stdlib_documents` is the corpus of both shipped examples (``examples/stdlib_docs``,
``examples/smollm2_stdlib``): the source of the running interpreter's standard-library modules (code,
comments, docstrings; tests, idlelib, lib2to3 and site-packages excluded) plus the ``pydoc_data.topics``
language reference that ``help()`` shows, one document per module or topic.  :func:`is_heldout` splits
documents by a hash of their name, so the split does not depend on the order or the count of documents.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

from hm_export.formats import read_json_lines

EXCLUDED_STDLIB_PARTS = ("site-packages", "test", "idlelib", "lib2to3")
MIN_MODULE_CHARS = 2000


def read_corpus(path: Path) -> list[dict[str, str]]:
    """JSON lines, one document per line: ``text`` and optionally ``context`` (the text routing it)."""
    return read_json_lines(
        path,
        lambda item: isinstance(item, dict) and isinstance(item.get("text"), str),
        "a document needs a string 'text'",
        "documents",
    )


def stdlib_documents() -> dict[str, str]:
    """``{name: text}``: ``module:<dotted name>`` for every stdlib module of at least 2000 characters and
    ``topic:<name>`` for every pydoc topic, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in EXCLUDED_STDLIB_PARTS or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) > MIN_MODULE_CHARS:
            docs[f"module:{'.'.join(rel.with_suffix('').parts)}"] = text
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        docs[f"topic:{name}"] = text
    return docs


def is_heldout(name: str, percent: int, salt: str = "") -> bool:
    """Whether document ``name`` falls in the held-out ``percent`` (a CRC-32 of ``salt + name``)."""
    return zlib.crc32((salt + name).encode()) % 100 < percent
