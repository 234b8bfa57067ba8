"""Save, load and share converted models: `save_pretrained` / `from_pretrained` (save.py, load.py),
native-MoE export (export.py), routing plots (plots.py), the model card (card.py),
`push_to_hub` (push.py), and the tokenizer / processor files that travel with every one of them
(companions.py)."""

from moeify.hub.card import model_card
from moeify.hub.load import CheckpointError, from_pretrained
from moeify.hub.push import PushError, push_to_hub
from moeify.hub.save import save_pretrained

__all__ = ["CheckpointError", "PushError", "from_pretrained", "model_card", "push_to_hub", "save_pretrained"]
