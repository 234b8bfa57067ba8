"""moeify: turn a dense transformers / diffusers model into a sparse Mixture-of-Experts model.

    from moeify import moeify, MoeifyConfig, find_ffns, aux_loss
    model = moeify(model, num_experts=8, top_k=2)
    loss = task_loss + aux_loss(model)
"""

from moeify.architectures import FFNLayout, register_conditioning, register_ffn, register_skip
from moeify.config import MoeifyConfig
from moeify.convert import MoeifyState, aux_loss, moe_layers, moeify
from moeify.hub.export import ExportError, export
from moeify.hub.load import from_pretrained
from moeify.hub.save import save_pretrained
from moeify.layers import MoeLayer, register_router
from moeify.precision import check_bf16, guard_bf16
from moeify.surgery import ConversionError, FFNReport, find_ffns

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "ExportError",
    "FFNLayout",
    "FFNReport",
    "MoeLayer",
    "MoeifyConfig",
    "MoeifyState",
    "__version__",
    "aux_loss",
    "check_bf16",
    "export",
    "find_ffns",
    "from_pretrained",
    "guard_bf16",
    "moe_layers",
    "moeify",
    "register_conditioning",
    "register_ffn",
    "register_router",
    "register_skip",
    "save_pretrained",
]
