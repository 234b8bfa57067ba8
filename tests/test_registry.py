"""moeify.registry.Registry: the one table behind every register_* (one duplicate rule, one
unknown-key error), and the check that no registry keeps its own."""

from __future__ import annotations

from pathlib import Path

import pytest

import moeify
from moeify.architectures import registry as architectures
from moeify.hub.formats import base as formats
from moeify.hub.formats.base import ExportError
from moeify.layers.routers import base as routers
from moeify.monitors import base as monitors
from moeify.monitors import homogenization
from moeify.registry import Registry

PACKAGE = Path(moeify.__file__).parent


def test_register_get_and_order() -> None:
    table: Registry[str, int] = Registry("widget", listing="registered widgets")
    table.register("b", 2)
    table.register("a", 1)
    assert list(table) == ["b", "a"]  # registration order
    assert table.names() == ["a", "b"]  # sorted
    assert table.items() == [("b", 2), ("a", 1)]
    assert table["a"] == 1 and table.get("c") is None and table.get("c", 7) == 7
    assert "a" in table and "c" not in table and len(table) == 2


def test_duplicate_is_refused_and_changes_nothing() -> None:
    table: Registry[str, int] = Registry("widget")
    table.register("a", 1)
    with pytest.raises(ValueError, match=r"^a widget named 'a' is already registered$"):
        table.register("a", 2)
    assert table["a"] == 1 and len(table) == 1


def test_unknown_key_names_what_is_registered() -> None:
    table: Registry[str, int] = Registry("widget", listing="registered widgets")
    table.register("b", 2)
    table.register("a", 1)
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; registered widgets: \['a', 'b'\]$"):
        table["c"]
    typed: Registry[str, int] = Registry("format", listing="supported", error=ExportError, where="moeify.export")
    with pytest.raises(ExportError, match=r"^moeify.export: unknown format 'x'; supported: \[\]$"):
        typed["x"]


def test_copy_is_independent_and_unregister() -> None:
    table: Registry[str, int] = Registry("widget")
    table.register("a", 1)
    twin = table.copy()
    assert twin == table and twin is not table
    twin.register("b", 2)
    assert "b" not in table and twin != table
    assert twin.unregister("b") == 2 and twin == table
    with pytest.raises(ValueError, match="unknown widget 'b'"):
        twin.unregister("b")


def test_callable_keys_are_named_by_their_qualname() -> None:
    def reader(module):
        return []

    table: Registry = Registry("expert weight reader", duplicate="expert weight reader")
    table.register(reader, bool)
    with pytest.raises(ValueError, match=r"expert weight reader '.*reader' is already registered"):
        table.register(reader, bool)


@pytest.mark.parametrize(
    ("table", "noun"),
    [
        (routers._ROUTERS, "router kind"),
        (architectures._FFN, "FFN class"),
        (architectures._SKIP, "skipped class"),
        (architectures._CONDITIONING, "conditioning entry"),
        (monitors._MONITORS, "monitor"),
        (formats._FORMATS, "format"),
        (homogenization._READERS, "expert weight reader"),
    ],
)
def test_every_register_function_uses_a_registry(table, noun: str) -> None:
    assert isinstance(table, Registry) and table.noun == noun


def test_no_module_keeps_its_own_duplicate_check() -> None:
    """The duplicate error is written once, in moeify/registry.py."""
    owners = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any('is already registered")' in line for line in path.read_text().splitlines())
    )
    assert owners == ["registry.py"]
