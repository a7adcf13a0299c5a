"""hm-export: export memory-augmented small language models to device bundles."""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _hide_checkout_kernels_folder() -> None:
    """Run from a checkout (``python -m pytest``, ``python -c``), the repository's top-level ``kernels/`` folder
    (installed as ``hm_export.kernels``) is importable as ``kernels`` and shadows Hugging Face's ``kernels``
    package, which ``transformers`` probes for at import and then fails on.  Mark the name absent."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if spec is not None and spec.origin is not None and Path(spec.origin).resolve() == ours:
        sys.modules["kernels"] = None  # type: ignore[assignment]  # find_spec/import now report it missing


_hide_checkout_kernels_folder()
