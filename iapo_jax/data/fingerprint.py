"""Stable sha256 fingerprints of data (prompt lists, score arrays, ...) for run records.

The digest depends only on content: every value is written with a type tag and a length prefix
(so ["ab", "c"] and ["a", "bc"] differ), arrays as dtype + shape + little-endian C-order bytes (so
the same numbers hash the same on any machine), dict keys in sorted order. It is the same across
processes, Python versions and platforms, unlike ``hash()``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np


def fingerprint(data: Any) -> str:
    """Hex sha256 of ``data``: str, bytes, numbers, bool, None, arrays, and lists/tuples/dicts of them."""
    digest = hashlib.sha256()
    _feed(digest, data)
    return digest.hexdigest()


def _tagged(digest, tag: bytes, payload: bytes) -> None:
    digest.update(tag + struct.pack("<Q", len(payload)) + payload)


def _feed(digest, value: Any) -> None:
    if value is None:
        _tagged(digest, b"N", b"")
    elif isinstance(value, bool):  # before int: bool is an int subclass
        _tagged(digest, b"B", b"1" if value else b"0")
    elif isinstance(value, str):
        _tagged(digest, b"S", value.encode("utf-8"))
    elif isinstance(value, bytes):
        _tagged(digest, b"Y", value)
    elif isinstance(value, int):
        _tagged(digest, b"I", str(value).encode())
    elif isinstance(value, float):
        _tagged(digest, b"F", struct.pack("<d", value))
    elif isinstance(value, (list, tuple)):
        _tagged(digest, b"L", struct.pack("<Q", len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("fingerprint: dict keys must be strings so their order is well defined")
        _tagged(digest, b"D", struct.pack("<Q", len(keys)))
        for key in sorted(keys):
            _feed(digest, key)
            _feed(digest, value[key])
    elif hasattr(value, "__array__") or isinstance(value, np.generic):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError("fingerprint: object arrays are not supported; convert to a list first")
        if arr.dtype.kind in "US":  # text arrays: hash their elements as strings/bytes
            _tagged(digest, b"T", repr(arr.shape).encode())
            for item in arr.reshape(-1).tolist():
                _feed(digest, item)
            return
        little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header = f"{little.dtype.str}|{arr.shape}".encode()
        _tagged(digest, b"A", header)
        _tagged(digest, b"a", np.ascontiguousarray(little).tobytes())
    else:
        raise TypeError(
            f"fingerprint: unsupported type {type(value).__name__}; pass strings, numbers, arrays "
            "or lists/dicts of them"
        )
