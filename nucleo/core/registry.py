"""Registries: one per extension point; the registered names are the command-line names.

Foundation module: imports nothing from the project. The families register themselves when
their package is imported (``import architectures``); ``nucleo.train.components`` does that
import. Other installed packages add components through entry-point groups, one per registry
(``nucleo.architectures``, ``nucleo.losses``, ``nucleo.tokenizers``, ``nucleo.tasks``): each
entry point names a module, which registers its components when the registry first looks a
name up. So a lab adds a family without forking::

    # its pyproject.toml
    [project.entry-points."nucleo.architectures"]
    tinyconv = "my_lab.tinyconv"      # the module holding @ARCHITECTURES.register("tinyconv")
"""

from __future__ import annotations

import difflib
import warnings
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
    """A registered component: its name, the class that builds it, its typed config (``dict``
    for components configured by keyword arguments, such as tasks) and a one-line summary."""

    name: str
    cls: type[T]
    config: type
    summary: str


class Registry(Generic[T]):
    """Maps names to component classes and their config dataclasses; ``group`` is the
    entry-point group whose modules are imported (once) before the first lookup."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_loaded = group is None

    def register(self, name: str, *, config: type = dict) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@ARCHITECTURES.register("transformer", config=TransformerConfig)``."""

        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, cls, config, doc[0] if doc else "")
            return cls

        return decorate

    def load_plugins(self) -> None:
        """Import every module of this registry's entry-point group (once). A plugin that
        fails to import is skipped with a one-line warning naming it and its package."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for point in entry_points(group=self.group or ""):
            try:
                point.load()
            except Exception as err:  # a broken plugin must not take nucleo down with it
                package = point.dist.name if point.dist else "an unknown package"
                warnings.warn(
                    f"{self.kind} plugin {point.name!r} ({point.value}, from {package}) was "
                    f"not loaded: {type(err).__name__}: {err}",
                    stacklevel=2,
                )

    def get(self, name: str) -> Entry[T]:
        self.load_plugins()
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
        builder: Any = entry.cls
        return builder(config, **kwargs)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


ARCHITECTURES: Registry[Any] = Registry("architecture", "nucleo.architectures")
LOSSES: Registry[Any] = Registry("loss", "nucleo.losses")
TOKENIZERS: Registry[Any] = Registry("tokenizer", "nucleo.tokenizers")
TASKS: Registry[Any] = Registry("task", "nucleo.tasks")
