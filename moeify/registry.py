"""One table for every `register_*` in moeify: routers, FFN classes, skipped classes, conditioning
entries, monitors, export formats and expert-weight readers.

Each registry is a `Registry`: entries by key in registration order, a duplicate refused with one
message, an unknown key refused with one message that lists what is registered. The module imports
nothing from moeify, so every layer can own its registry without importing upwards.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _label(key: object) -> str:
    # Callables (expert-weight readers) read better by their qualified name than by their repr.
    if callable(key) and hasattr(key, "__qualname__"):
        return repr(key.__qualname__)
    return repr(key)


class Registry(Generic[K, V]):
    """Entries by key, in registration order.

    `noun` names one entry in errors ("router kind"); `duplicate` starts the duplicate error
    ("a router kind named" → "a router kind named 'linear' is already registered"); `listing` heads
    the list of registered keys in the unknown-key error ("registered kinds"); `error` is the
    exception class of that error and `where` its prefix ("moeify.export")."""

    def __init__(
        self,
        noun: str,
        *,
        duplicate: str | None = None,
        listing: str = "registered",
        error: type[Exception] = ValueError,
        where: str = "",
    ) -> None:
        self.noun = noun
        self.duplicate = duplicate if duplicate is not None else f"a {noun} named"
        self.listing = listing
        self.error = error
        self.where = where
        self._entries: dict[K, V] = {}

    def register(self, key: K, value: V) -> None:
        """Add `key`; a key already registered is a ValueError and changes nothing."""
        self.refuse_duplicate(key)
        self._entries[key] = value

    def refuse_duplicate(self, key: K) -> None:
        """The duplicate check alone, for registrations that validate more before adding."""
        if key in self._entries:
            raise ValueError(f"{self.duplicate} {_label(key)} is already registered")

    def unregister(self, key: K) -> V:
        """Remove `key` (tests and plugins that register temporarily); unknown keys are refused."""
        value = self[key]
        del self._entries[key]
        return value

    def __getitem__(self, key: K) -> V:
        if key not in self._entries:
            prefix = f"{self.where}: " if self.where else ""
            raise self.error(f"{prefix}unknown {self.noun} {key!r}; {self.listing}: {self.names()}")
        return self._entries[key]

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._entries.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[K, V]]:
        return list(self._entries.items())

    def names(self) -> list[K]:
        """The keys, sorted (by their text, so callables sort too)."""
        return sorted(self._entries, key=str)

    def copy(self) -> Registry[K, V]:
        """A registry with the same settings and entries; changing one leaves the other alone."""
        twin: Registry[K, V] = Registry(
            self.noun, duplicate=self.duplicate, listing=self.listing, error=self.error, where=self.where
        )
        twin._entries = dict(self._entries)
        return twin

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Registry):
            return self._entries == other._entries
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by entries

    def __repr__(self) -> str:
        return f"Registry({self.noun!r}, {len(self)} entries)"
