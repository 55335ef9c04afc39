"""One Flax NNX decoder (Llama and GPT-2 families), scalar heads, LoRA, and checkpoint loading/saving."""

from iapo_jax.models.checkpoints import default_model_path, load_config, load_model, save_hf
from iapo_jax.models.config import ModelConfig
from iapo_jax.models.heads import RewardModel, ValueModel
from iapo_jax.models.kv_cache import KVCache
from iapo_jax.models.tokenizer import load_tokenizer
from iapo_jax.models.transformer import LOGICAL_AXES, Transformer

__all__ = [
    "KVCache", "LOGICAL_AXES", "ModelConfig", "RewardModel", "Transformer", "ValueModel",
    "default_model_path", "load_config", "load_model", "load_tokenizer", "save_hf",
]
