"""iapo_jax: inference-aware alignment (InfAlign/CTRL) and controlled decoding in JAX/Flax.

Top-level entry points (imported on first use, so `import iapo_jax.<sub>` stays light):
    load_model(source, dtype="float32", param_dtype=None) -> Transformer
    load_tokenizer(source, model=None) -> transformers tokenizer
    save_hf(model, directory, tokenizer=None) -> Path
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "load_model": "iapo_jax.models.checkpoints",
    "save_hf": "iapo_jax.models.checkpoints",
    "load_tokenizer": "iapo_jax.models.tokenizer",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iapo_jax' has no attribute {name!r}")
