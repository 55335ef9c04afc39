"""Registry: names taken once, errors that list the choices, built-ins loaded on first lookup."""

import pytest

from iapo_jax.runtime.registry import Registry


def test_lookup_names_and_errors():
    reg = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg.get("b") == 2 and reg.names() == ["a", "b"] and list(reg) == ["b", "a"]
    with pytest.raises(ValueError, match="unknown widget 'c'; available widgets: a, b"):
        reg.get("c")
    reg.register("b", 2)  # the same item again is fine
    with pytest.raises(ValueError, match="'b' is already registered"):
        reg.register("b", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", 1)


def test_builtins_load_once_and_a_failed_load_is_retried():
    calls = []

    def load():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("optional package missing")
        reg.register("x", 1)

    reg = Registry("widget", on_first_lookup=load)
    with pytest.raises(ImportError):
        reg.get("x")
    assert reg.get("x") == 1 and "x" in reg and len(reg) == 1
    assert len(calls) == 2
    reg.names()
    assert len(calls) == 2  # loaded once it succeeded
