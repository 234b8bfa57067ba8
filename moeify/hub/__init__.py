"""Save, load and share converted models: `save_pretrained` / `from_pretrained` (save.py, load.py),
native-MoE export (export.py), routing plots (plots.py)."""

from moeify.hub.load import CheckpointError, from_pretrained
from moeify.hub.save import save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
