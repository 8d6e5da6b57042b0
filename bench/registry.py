"""Name → object registries in the style of timm's ``register_model``.

One :class:`Registry` instance per kind of thing (architectures, datasets, methods). Registering a name
twice is an error; looking up an unknown name fails with a did-you-mean hint that also names the CLI
command listing what exists.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; ``str()`` is the full, user-facing message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection filled by a decorator.

    Args:
        kind: what the entries are, used in messages ("architecture", "dataset", ...).
        list_command: the CLI command that lists the entries, quoted in error messages.
    """

    def __init__(self, kind: str, list_command: str) -> None:
        self.kind = kind
        self.list_command = list_command
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name raises ``ValueError``."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the entry called ``name``, or raise :class:`UnknownNameError` with a suggestion."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name.lower(), list(self._entries), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(self._entries))}"
        return f"unknown {self.kind} {name!r}{hint} ({self.list_command})"

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern (``list('resnet*')``)."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.list():
            yield name, self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
