"""The exported file: safetensors tensors plus JSON metadata, with an integrity digest.

Loading never executes code: safetensors holds raw arrays, and the metadata (op graph, per-layer
quantization parameters, the run's config) is plain JSON in the safetensors header. A SHA-256
over the metadata and every tensor (name, dtype, shape, bytes) is stored beside it, so a
truncated or edited file is refused with a one-line error instead of computing garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from qexp.errors import QexpError

#: bumped when the layout of the metadata changes incompatibly
FORMAT_VERSION = 1
_META_KEY = "qexp_export"
_DIGEST_KEY = "sha256"


def _digest(meta_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def encode_export(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """The bytes of an export file holding ``tensors`` and the JSON-able ``meta``."""
    from safetensors.numpy import save

    meta = {**meta, "format": FORMAT_VERSION}
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = {_META_KEY: meta_json, _DIGEST_KEY: _digest(meta_json, arrays)}
    return save(arrays, metadata=header)


def read_export(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors and metadata of an export file; QexpError if it is missing, cut or altered."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise QexpError(f"{path}: no such export file (make one with `qexp export RUN_DIR`)")
    data = path.read_bytes()
    redo = "re-export it with `qexp export RUN_DIR`"
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else "unreadable"
        raise QexpError(f"{path} is truncated or not a qexp export ({reason}): {redo}") from None
    if _META_KEY not in header or _DIGEST_KEY not in header:
        raise QexpError(f"{path} is a safetensors file but not a qexp export: {redo}")
    meta_json = header[_META_KEY]
    if _digest(meta_json, tensors) != header[_DIGEST_KEY]:
        raise QexpError(f"{path} was altered after export (checksum mismatch): {redo}")
    meta = json.loads(meta_json)
    if meta.get("format") != FORMAT_VERSION:
        raise QexpError(
            f"{path} has export format {meta.get('format')}, this qexp reads {FORMAT_VERSION}: "
            f"{redo}"
        )
    return tensors, meta
