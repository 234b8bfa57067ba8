"""moeify: turn a dense transformers / diffusers model into a sparse Mixture-of-Experts model.

from moeify import moeify, MoeifyConfig, find_ffns, aux_loss
model = moeify(model, num_experts=8, top_k=2)
loss = task_loss + aux_loss(model)
"""

from moeify._version import __version__
from moeify.architectures import FFNLayout, register_conditioning, register_ffn, register_skip
from moeify.config import MoeifyConfig
from moeify.control import Schedule, set_routing
from moeify.convert import MoeifyState, aux_loss, moeify, token_mask
from moeify.hub.card import model_card
from moeify.hub.export import ExportError, export
from moeify.hub.export_formats import register_export_format
from moeify.hub.load import from_pretrained
from moeify.hub.push import PushError, push_to_hub
from moeify.hub.save import save_pretrained
from moeify.layers import MoeLayer, register_router
from moeify.layers.inventory import moe_layers
from moeify.monitors import attach_monitors
from moeify.precision import check_bf16, guard_bf16
from moeify.recipes.param_groups import param_groups, warmup_schedule
from moeify.surgery import ConversionError, FFNReport, find_ffns


def __getattr__(name: str):  # PEP 562
    # `moeify.lora_config` is peft glue: importing peft costs ~3 s, paid on first use only.
    if name == "lora_config":
        from moeify.integrations.peft import lora_config

        return lora_config
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")


__all__ = [
    "ConversionError",
    "ExportError",
    "FFNLayout",
    "FFNReport",
    "MoeLayer",
    "MoeifyConfig",
    "MoeifyState",
    "PushError",
    "Schedule",
    "__version__",
    "attach_monitors",
    "aux_loss",
    "check_bf16",
    "export",
    "find_ffns",
    "from_pretrained",
    "guard_bf16",
    "lora_config",
    "model_card",
    "moe_layers",
    "moeify",
    "param_groups",
    "push_to_hub",
    "register_conditioning",
    "register_export_format",
    "register_ffn",
    "register_router",
    "register_skip",
    "save_pretrained",
    "set_routing",
    "token_mask",
    "warmup_schedule",
]
