"""The coverage sweep's fast subset (the whole sweep: `make coverage`, benchmarks/COVERAGE.md): one
model per family and per way an FFN can be written, built tiny from the zoos, converted with
`example_inputs` and compared to the dense outputs by the sweep's own classifier.

Each entry pins the outcome and the number of FFN sites: a model whose FFNs stop being found, or
one that starts converting something more, fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from coverage import convert_one
from zoo import diffusers_zoo, transformers_zoo

# (status, FFN sites). What each one covers is in the comment.
TRANSFORMERS = {
    "bert": ("preserved", 2),  # registry, FFN split over intermediate / output.dense
    "deberta-v2": ("preserved", 2),  # a layer that needs an attention mask to run alone
    "mobilebert": ("preserved", 8),  # a list of small FFNs inside each block, and the block's own
    "albert": ("preserved", 1),  # one layer serving every depth
    "xlnet": ("preserved", 2),  # a dropout module used twice: split
    "bart": ("preserved", 4),  # fc1 / activation_fn / fc2 on the layer
    "whisper": ("preserved", 4),  # audio encoder-decoder
    "wav2vec2": ("preserved", 2),  # raw-audio encoder
    "clip": ("preserved", 4),  # two towers
    "starcoder2": ("preserved", 2),  # a registry entry this transformers no longer fits: dataflow
    "bloom": ("preserved", 2),  # the residual added inside the MLP
    "modernbert": ("preserved", 2),  # fused gate/up split by chunk, functional activation
    "convnext": ("preserved", 4),  # channels-first block around a channels-last FFN
    "poolformer": ("preserved", 4),  # 1x1-convolution FFN
    "squeezebert": ("preserved", 2),  # grouped 1x1 convolutions, chained in the layer
    "apertus": ("preserved", 2),  # an activation with parameters (xIELU)
    "glm5_next_text": ("preserved", 1),  # a clamp on the up half; the other layer is MoE
    "bitnet": ("preserved", 2),  # a norm after the gated product
    "gemma3n_text": ("preserved", 2),  # activation sparsity: per-token statistics, constants
    "sam_vision_model": ("preserved", 2),  # weights of 1e-10
    "lightglue": ("preserved", 4),  # an FFN of a concatenation (wider input than output)
    "llava": ("preserved", 5),  # vision tower, projector and language model
    "mamba": ("refused", 0),  # a convolution over tokens in the mixer
    "mixtral": ("refused", 0),  # already a MoE
    "segformer": ("refused", 0),  # Mix-FFN: a depthwise convolution between the projections
    "switch_transformers": ("refused", 0),  # MoE, and attention with wide heads
}
DIFFUSERS = {
    "DiTTransformer2DModel": ("preserved", 2),
    "FluxTransformer2DModel": ("preserved", 4),  # dual-stream ff / ff_context; single-stream refused
    "PRXTransformer2DModel": ("preserved", 2),  # inline FFN in blocks that need a timestep: example_inputs
    "MiniMaxMusic3Transformer1DModel": ("preserved", 2),  # same, blocks need rotary embeddings
    "Kandinsky3UNet": ("preserved", 18),  # 1x1-convolution FFNs in blocks that need a timestep
    "SanaTransformer2DModel": ("refused", 0),  # its FFN is a convolution over tokens
    "StableCascadeUNet": ("refused", 0),  # global response norm and depthwise convolutions
}


CASES = [(transformers_zoo, name, expected) for name, expected in TRANSFORMERS.items()] + [
    (diffusers_zoo, name, expected) for name, expected in DIFFUSERS.items()
]


@pytest.mark.parametrize(("zoo", "name", "expected"), CASES, ids=[name for _, name, _ in CASES])
def test_model(zoo, name: str, expected: tuple[str, int]) -> None:  # a zoo module
    row = convert_one(zoo.build(name))
    assert (row["status"], row["sites"]) == expected, row
    if row["status"] == "preserved":
        assert row["max_relative_difference"] <= 1e-5
