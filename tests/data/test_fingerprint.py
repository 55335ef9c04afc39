"""Data fingerprints for run records: content-only, unambiguous, stable across processes."""

import hashlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.data.fingerprint import fingerprint


def test_is_a_sha256_hex_digest_and_deterministic():
    fp = fingerprint(["a", "b"])
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == fingerprint(["a", "b"]) == fingerprint(("a", "b"))


def test_empty_string_matches_hand_computed_sha256():
    # Independent check of the encoding: tag "S" + little-endian u64 length + utf-8 bytes.
    assert fingerprint("") == hashlib.sha256(b"S" + (0).to_bytes(8, "little")).hexdigest()
    assert fingerprint("hé") == hashlib.sha256(b"S" + (3).to_bytes(8, "little") + "hé".encode()).hexdigest()


def test_distinguishes_what_it_should():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])  # boundaries
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])  # order
    assert fingerprint([1]) != fingerprint(["1"]) != fingerprint([1.0])  # types
    assert fingerprint(np.zeros(3, np.float32)) != fingerprint(np.zeros(3, np.float64))  # dtype
    assert fingerprint(np.zeros((2, 3))) != fingerprint(np.zeros((3, 2)))  # shape
    assert fingerprint(np.array([1.0, 2.0])) != fingerprint(np.array([1.0, 2.5]))


def test_ignores_what_it_should():
    assert fingerprint({"b": 1, "a": [2]}) == fingerprint({"a": [2], "b": 1})  # key order
    little = np.arange(6, dtype="<f4").reshape(2, 3)
    assert fingerprint(little) == fingerprint(little.astype(">f4"))  # byte order
    assert fingerprint(little) == fingerprint(np.asfortranarray(little))  # memory layout
    assert fingerprint(little) == fingerprint(jnp.asarray(little))  # jax vs numpy
    assert fingerprint(np.array(["x", "yz"])) == fingerprint(np.array(["x", "yz"], dtype="<U8"))


def test_same_in_a_fresh_process_with_another_hash_seed():
    code = "from iapo_jax.data.fingerprint import fingerprint; print(fingerprint({'p': ['x', 'y'], 'n': 3}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "JAX_PLATFORMS": "cpu"},
    ).stdout.strip()
    assert out == fingerprint({"p": ["x", "y"], "n": 3})


def test_rejects_unsupported_values():
    with pytest.raises(TypeError, match="unsupported type object"):
        fingerprint([object()])
    with pytest.raises(TypeError, match="dict keys must be strings"):
        fingerprint({1: "a"})
