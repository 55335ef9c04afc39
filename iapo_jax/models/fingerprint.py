"""Content hash of a model source for the run record: the bytes of its weights, config and tokenizer.

A model is named by a path, a .gguf file or a packaged name; which files that means is the
checkpoint loader's business (`checkpoints.resolve_source`), so the hash is taken here, on the
models floor, with the runtime's streamed tree hash.
"""

from __future__ import annotations

import os
from typing import Any

from iapo_jax.models.checkpoints import resolve_source
from iapo_jax.runtime.fingerprints import tree_fingerprint


def model_fingerprint(source: str | os.PathLike) -> dict[str, Any]:
    """The weights (and config, tokenizer) of a model source: {"sha256", "format", "source"}."""
    kind, path = resolve_source(source)
    return {"sha256": tree_fingerprint(path), "format": kind, "source": str(source)}
