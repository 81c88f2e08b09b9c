"""A registry of implementations by name (model families, objectives): the thirty lines behind every
`type:` key in a config. An unknown name is a KeyError whose message lists the registered ones."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, key: str):
        self.key = key  # the config key it answers, e.g. "model.type"
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.key} {name!r} is registered twice")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"{self.key} {name!r} is not registered (registered: {', '.join(self.names())})") from None
