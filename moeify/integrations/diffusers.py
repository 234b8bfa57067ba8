"""diffusers glue: convert a pipeline's denoiser in place; the pipeline keeps working.

    pipe = PixArtAlphaPipeline.from_pretrained(...)
    moeify_pipeline(pipe, num_experts=8, top_k=2, router="cross_attention")
    image = pipe(prompt).images[0]

It finds the denoiser (`pipe.transformer`, `pipe.transformer_2` for two-stage pipelines such as
Wan 2.2, or `pipe.unet`) and calls `moeify.moeify` on each with the same recipe. The
cross-attention router reads the `encoder_hidden_states` the pipeline passes (prompt embeddings,
doubled for classifier-free guidance) through a pre-hook on the denoiser: nothing else changes.
For routing per denoising step, see `moeify.monitors.TimestepRouting`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moeify.config import MoeifyConfig, recipe
from moeify.convert import moeify
from moeify.surgery.plan import plan_conversion

DENOISERS = ("transformer", "transformer_2", "unet")


def denoisers(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's denoising models by attribute name; a clear error when it has none."""
    found = {name: getattr(pipe, name) for name in DENOISERS if isinstance(getattr(pipe, name, None), nn.Module)}
    if not found:
        components = sorted(getattr(pipe, "components", {}) or vars(pipe))
        raise ValueError(
            f"{type(pipe).__name__} has no denoiser among {DENOISERS} (its components: {components}); "
            "convert the model you mean directly: moeify.moeify(pipe.<name>, ...)"
        )
    return found


def moeify_pipeline(pipe: Any, config: MoeifyConfig | None = None, **overrides: Any) -> Any:
    """`moeify` every denoiser of a diffusers pipeline in place, with one recipe; returns `pipe`.

    The recipe is validated and every denoiser planned before the first one changes, so a bad
    option or an unconvertible model leaves the whole pipeline untouched."""
    models = denoisers(pipe)
    config = recipe(config, overrides, "moeify_pipeline")
    for model in models.values():
        plan_conversion(model, config)
    for model in models.values():
        moeify(model, config)
    return pipe


__all__ = ["DENOISERS", "denoisers", "moeify_pipeline"]
