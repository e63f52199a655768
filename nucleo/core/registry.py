"""Registries: one per extension point; the registered names are the command-line names.

Foundation module: imports nothing from the project. The families register themselves when
their package is imported (``import architectures``); ``nucleo.train.components`` does that import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: its name, the class that builds it and its typed config."""

    name: str
    cls: type[T]
    config: type
    summary: str


class Registry(Generic[T]):
    """Maps names to component classes and their config dataclasses."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, config: type) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@ARCHITECTURES.register("transformer", config=TransformerConfig)``."""

        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, cls, config, doc[0] if doc else "")
            return cls

        return decorate

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {known}")
        return self._entries[name]

    def build(self, name: str, config: Any, **kwargs: Any) -> T:
        """Instantiate ``name`` from its config object (an instance of ``get(name).config``)."""
        entry = self.get(name)
        if not isinstance(config, entry.config):
            raise TypeError(f"{self.kind} {name!r} takes {entry.config.__name__}")
        return entry.cls(config, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


ARCHITECTURES: Registry[Any] = Registry("architecture")
LOSSES: Registry[Any] = Registry("loss")
TOKENIZERS: Registry[Any] = Registry("tokenizer")
