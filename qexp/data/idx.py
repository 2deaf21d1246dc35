"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

Format: 2 zero bytes, a type code byte, a dimension-count byte, then one big-endian uint32 per
dimension, then the data (big-endian) in C order. See http://yann.lecun.com/exdb/mnist/.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from qexp.errors import QexpError

# IDX type code -> numpy dtype (multi-byte types are big-endian).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, transparently gunzipped (detected by magic bytes, not by name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise QexpError(f"cannot read data file {path}: {e.strerror or e}") from e
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise QexpError(
            f"data file {path} is a truncated or corrupt gzip file ({e}); "
            "delete it and fetch it again"
        ) from e


def read_idx(
    path: str | Path, *, dtype_code: int | None = None, ndim: int | None = None
) -> np.ndarray:
    """Read an IDX file into a writable numpy array of its stored shape.

    `dtype_code` / `ndim`, when given, must match the header (e.g. 0x08, 3 for MNIST images);
    any mismatch or a wrong data size raises QexpError naming the file.
    """
    path = Path(path)
    buf = _read_bytes(path)
    fix = "delete it and fetch it again"
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise QexpError(f"data file {path} is not an IDX file (bad magic number); {fix}")
    code, nd = buf[2], buf[3]
    if code not in _DTYPES:
        raise QexpError(f"data file {path} has unknown IDX type code 0x{code:02x}; {fix}")
    expected = f"0x{dtype_code or code:02x}{ndim if ndim is not None else nd:02x}"
    if (dtype_code is not None and code != dtype_code) or (ndim is not None and nd != ndim):
        raise QexpError(
            f"data file {path} has IDX magic 0x{code:02x}{nd:02x}, expected {expected} "
            "(labels are 0x0801, images 0x0803); check that the file names are not swapped"
        )
    header_len = 4 + 4 * nd
    if len(buf) < header_len:
        raise QexpError(f"data file {path} is truncated (incomplete header); {fix}")
    dims = struct.unpack(f">{nd}I", buf[4:header_len])
    dtype = _DTYPES[code]
    need = math.prod(dims) * dtype.itemsize
    have = len(buf) - header_len
    if have != need:
        what = "truncated" if have < need else "longer than its header says"
        raise QexpError(
            f"data file {path} is {what} (header {dims} needs {need} data bytes, found {have}); "
            f"{fix}"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=math.prod(dims), offset=header_len)
    # frombuffer over bytes is read-only; torch.from_numpy wants writable memory. Native byte
    # order also keeps later conversions cheap.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """uint8 images (N, H, W) from an IDX file with magic 0x0803."""
    return read_idx(path, dtype_code=0x08, ndim=3)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """uint8 labels (N,) from an IDX file with magic 0x0801."""
    return read_idx(path, dtype_code=0x08, ndim=1)


def write_idx(path: str | Path, arr: np.ndarray, *, compress: bool | None = None) -> None:
    """Write `arr` as an IDX file (gzipped if `compress`, default: if the name ends in .gz).

    Used by tests and handy for making small fixture data sets.
    """
    path = Path(path)
    arr = np.asarray(arr)
    codes = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
    native = arr.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    code = codes[native]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
