"""IDX files (MNIST, Fashion-MNIST): reading them and finding them. numpy and the standard library only,
so that code without lightning or torchvision (the examples) reads the same files the same way."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

# IDX header: magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``), as used by MNIST and Fashion-MNIST; returns the array it stores."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a readable gzip file ({type(error).__name__}: {error}); it is corrupt or truncated: "
            "download or reinstall the dataset"
        ) from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: header bytes {data[:4]!r}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(root: Path, stem: str) -> Path | None:
    """The first of ``root/stem[.gz]`` and torchvision's ``root/FashionMNIST/raw/stem[.gz]`` that exists."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None
