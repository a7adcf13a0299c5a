"""Host intake: a ``transformers`` model folder or a GGUF file becomes a host model, its tokenizer and a record
of where it came from.

Everything that can be refused is refused from metadata before any weight is read: for a GGUF file its
header (read with the ``gguf`` package: architecture, tensor types), then the ``transformers`` config built
from it, checked by :func:`~hm_export.hf.families.inspect_host`.  A GGUF host is dequantized by
``transformers`` (``gguf_file=``) into float32; its tokenizer is the fast tokenizer ``transformers`` builds from
the GGUF vocabulary and merges.  ``transformers`` cannot ``save_pretrained`` a GGUF-loaded model, and nothing
here needs it to: the host's weights go straight into the hm-export checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from hm_export.checkpoint import STORAGE_DTYPES
from hm_export.config import ConfigError
from hm_export.errors import InputError
from hm_export.hf.families import HostRefused

GGUF_SUFFIX = ".gguf"
TOKENIZER_FILE = "tokenizer.json"
FLOAT_GGML_TYPES = ("F32", "F16", "BF16")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, file type and tensor types of a GGUF file, refusing what cannot be dequantized or mapped."""
    try:
        import gguf
        from gguf.quants import _type_traits
    except ImportError as exc:
        raise ConfigError("GGUF hosts need the gguf package: pip install 'hm-export[hf]'") from exc
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(name: str) -> Any:
        entry = reader.fields.get(name)
        return None if entry is None else entry.contents()

    architecture = field("general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise HostRefused(
            f"{path}: GGUF architecture {architecture!r} has no transformers loader "
            f"(transformers reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    readable = {t.name for t in _type_traits} | set(FLOAT_GGML_TYPES)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unreadable = sorted(set(types) - readable)
    if unreadable:
        example = next(t.name for t in reader.tensors if t.tensor_type.name in unreadable)
        raise HostRefused(
            f"{path}: tensor {example!r} is {unreadable[0]}, which gguf {gguf.__version__} cannot dequantize"
        )
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return {
        "architecture": architecture,
        "name": field("general.name"),
        "file_type": file_type_name,
        "tensor_types": dict(sorted(types.items())),
    }


@dataclass(frozen=True)
class HostSource:
    """A host on disk: a ``transformers`` folder (``config.json`` + safetensors) or a GGUF file."""

    path: Path  # the folder, or the .gguf file
    is_gguf: bool

    @classmethod
    def locate(cls, host: Path | str, gguf_file: str | None = None) -> HostSource:
        """``host`` a ``.gguf`` file, a folder plus ``gguf_file`` (a file name in it), or a ``transformers`` folder."""
        host = Path(host)
        if gguf_file is not None:
            if not host.is_dir():
                raise InputError(f"{host}: not a directory (--gguf-file names a file inside one)", path=host)
            path = host / gguf_file
            if not path.is_file():
                raise InputError(f"{path}: no such GGUF file", path=path)
            return cls(path, True)
        if host.is_file():
            if host.suffix.lower() != GGUF_SUFFIX:
                raise ConfigError(f"{host}: a host is a transformers model folder or a {GGUF_SUFFIX} file")
            return cls(host, True)
        if not host.is_dir():
            raise InputError(f"{host}: no such file or directory", path=host)
        if not (host / "config.json").is_file():
            ggufs = sorted(p.name for p in host.glob(f"*{GGUF_SUFFIX}"))
            hint = f"; it holds {', '.join(ggufs)}: pass --gguf-file" if ggufs else ""
            config = host / "config.json"
            raise InputError(f"{config}: missing (not a transformers model folder{hint})", path=config)
        return cls(host, False)

    @property
    def folder(self) -> Path:
        return self.path.parent if self.is_gguf else self.path

    def _gguf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.path.name} if self.is_gguf else {}

    def read_config(self) -> Any:
        """The host's ``transformers`` config, from metadata only (a GGUF header is checked first)."""
        from transformers import AutoConfig

        if self.is_gguf:
            _gguf_header(self.path)
        try:
            return AutoConfig.from_pretrained(str(self.folder), local_files_only=True, **self._gguf_kwargs())
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"{self.path}: cannot read the model config ({exc})") from exc

    def source_dtype(self, config: Any) -> str:
        """The host's float dtype at the source: a folder's ``dtype``, float32 for a dequantized GGUF."""
        if self.is_gguf:
            return "float32"
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
        return dtype if dtype in STORAGE_DTYPES else "float32"

    def record(self) -> dict[str, Any]:
        """Where the host came from, for the checkpoint's metadata and the bundle manifest."""
        if not self.is_gguf:
            return {"format": "transformers", "path": str(self.path)}
        header = _gguf_header(self.path)
        return {
            "format": "gguf",
            "path": str(self.path),
            "sha256": _sha256(self.path),
            **header,
            "dequantized_to": "float32",
        }

    def load_model(self) -> nn.Module:
        """The host's weights in float32 (a GGUF's dequantized), eager attention, eval mode."""
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = self._gguf_kwargs() or {"use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(
            str(self.folder), local_files_only=True, dtype=torch.float32, attn_implementation="eager", **kwargs
        )
        return model.eval()

    def load_tokenizer(self) -> Tokenizer:
        """The host's fast tokenizer: a folder's ``tokenizer.json``, or the one ``transformers`` builds (GGUF)."""
        if not self.is_gguf and (self.path / TOKENIZER_FILE).is_file():
            return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True, **self._gguf_kwargs())
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"{self.path}: cannot build the host's tokenizer ({exc})") from exc
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise ConfigError(f"{self.path}: the host's tokenizer is not a fast (tokenizers) tokenizer")
        return backend
