"""Rewards by name, so configs and the CLI can pick one with a string."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from iapo_jax.rewards.base import Reward

_FACTORIES: dict[str, Callable[..., Reward]] = {}

# Modules whose import registers built-in rewards. Imported on first lookup, so that
# `import iapo_jax.rewards` stays cheap and optional scorers load only when asked for.
_BUILTIN_MODULES = ("iapo_jax.rewards.packaged", "iapo_jax.rewards.reward_model")


def register_reward(name: str):
    """Class or factory decorator: ``@register_reward("vader")``. Names must be unique."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def wrap(factory):
        existing = _FACTORIES.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(
                f"reward {name!r} is already registered by {existing.__module__}."
                f"{existing.__qualname__}; choose another name"
            )
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards (whether or not their optional package is installed)."""
    _load_builtins()
    return sorted(_FACTORIES)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Builds the reward registered under ``name`` with ``kwargs`` (e.g. ``target=`` for 'length')."""
    _load_builtins()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; available rewards: {', '.join(sorted(_FACTORIES))}"
        ) from None
    return factory(**kwargs)
