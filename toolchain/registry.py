"""One small registry, used for models, ranking criteria and benchmark backends (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from toolchain.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._options: dict[str, type[Any]] = {}

    def register(self, name: str, *, options: type[Any] | None = None) -> Callable[[T], T]:
        """Decorator adding ``name``; ``options``: the (frozen dataclass) type of the entry's options, if any
        (criteria use it: ``toolchain.ranking.options``)."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            if options is not None:
                self._options[name] = options
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def options(self, name: str) -> type[Any] | None:
        """The options type registered with ``name`` (None: it takes no options)."""
        self.get(name)  # an unknown name is a UserError, as for get
        return self._options.get(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
