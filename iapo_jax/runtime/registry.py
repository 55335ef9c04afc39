"""Things of one kind by name (rewards, transforms, estimators), so configs and the command line
can pick one with a string, and a wrong string says what the choices are."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> item for one kind of thing.

    ``register(name)`` is a decorator (or ``register(name, item)`` a call); a name is taken once.
    ``get(name)`` raises ValueError listing the available names. ``on_first_lookup`` runs once
    before the first lookup, to import the modules whose import registers the built-in items.
    """

    def __init__(self, kind: str, on_first_lookup: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._on_first_lookup = on_first_lookup

    def register(self, name: str, item: T | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(item: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not item:
                where = f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)}"
                raise ValueError(f"{self.kind} {name!r} is already registered by {where}; choose another name")
            self._items[name] = item
            return item

        return add if item is None else add(item)

    def _loaded(self) -> dict[str, T]:
        if self._on_first_lookup is not None:
            load, self._on_first_lookup = self._on_first_lookup, None  # a lookup inside load sees no loop
            try:
                load()
            except BaseException:
                self._on_first_lookup = load  # a failed import is retried at the next lookup
                raise
        return self._items

    def get(self, name: str) -> T:
        items = self._loaded()
        if name not in items:
            raise ValueError(f"unknown {self.kind} {name!r}; available {self.kind}s: {', '.join(sorted(items))}")
        return items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._loaded()))  # registration order

    def __len__(self) -> int:
        return len(self._loaded())
