"""The built-in export formats, one handler per file; importing this package registers them.
How to add one: moeify.hub.export_formats."""

from moeify.hub.formats import mixtral, qwen  # noqa: F401 - registers mixtral, qwen2_moe, qwen3_moe
from moeify.hub.formats.base import (
    ExportError,
    ExportFormat,
    ExportSource,
    MoeShape,
    export_format,
    export_format_names,
    register_export_format,
)

__all__ = [
    "ExportError",
    "ExportFormat",
    "ExportSource",
    "MoeShape",
    "export_format",
    "export_format_names",
    "register_export_format",
]
