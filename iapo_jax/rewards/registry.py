"""Rewards by name, so configs and the CLI can pick one with a string."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from iapo_jax.rewards.base import Reward
from iapo_jax.runtime.registry import Registry

# Modules whose import registers built-in rewards. Imported on first lookup, so that
# `import iapo_jax.rewards` stays cheap and optional scorers load only when asked for.
_BUILTIN_MODULES = ("iapo_jax.rewards.packaged", "iapo_jax.rewards.reward_model")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


REWARDS: Registry[Callable[..., Reward]] = Registry("reward", on_first_lookup=_load_builtins)


def register_reward(name: str):
    """Class or factory decorator: ``@register_reward("vader")``. Names must be unique."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards (whether or not their optional package is installed)."""
    return REWARDS.names()


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Builds the reward registered under ``name`` with ``kwargs`` (e.g. ``target=`` for 'length')."""
    return REWARDS.get(name)(**kwargs)
