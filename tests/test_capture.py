"""Blocks that cannot run alone: traced on the inputs they receive in a forward of
`example_inputs`, and what was found recorded in the checkpoint, so that loading (which has no
inputs) rebuilds exactly the same model. The record is data: it can name no code to run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from core_helpers import assert_untouched, resign_checkpoint, snapshot
from torch import Tensor, nn

import moeify
from moeify import ConversionError, find_ffns, moe_layers
from moeify.hub.load import CheckpointError
from moeify.surgery.program import Program
from moeify.surgery.record import layout_from_dict, layout_to_dict

D, I, T = 16, 32, 8  # noqa: E741 - the shape legend's I
D_TIME = 8  # the timestep embedding's width: unlike the hidden states', so no stand-in fits


class Modulated(nn.Module):
    """A DiT-style block: adaLN modulation from a timestep embedding, an inline gated FFN (no
    module of its own); it cannot run without `temb` and its rotary `angles`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.modulation = nn.LayerNorm(D, elementwise_affine=False), nn.Linear(D_TIME, 2 * D)
        self.attn = nn.Linear(D, D)
        self.ff_in, self.ff_out = nn.Linear(D, 2 * I), nn.Linear(I, D)

    def forward(self, hidden_states: Tensor, temb: Tensor, angles: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = angles
        shift, scale = self.modulation(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        hidden_states = hidden_states + self.attn(hidden_states * cos + sin)
        x = self.norm(hidden_states) * (1 + scale) + shift
        gate, up = self.ff_in(x).chunk(2, dim=-1)
        return hidden_states + self.ff_out(F.silu(gate) * up)


class Denoiser(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.time = nn.Linear(1, D_TIME)
        self.blocks = nn.ModuleList(Modulated() for _ in range(depth))

    def forward(self, hidden_states: Tensor, timestep: Tensor) -> Tensor:
        temb = self.time(timestep[:, None])
        positions = torch.arange(hidden_states.shape[1], dtype=hidden_states.dtype)[:, None]
        angles = (torch.cos(positions / 4), torch.sin(positions / 4))
        for block in self.blocks:
            hidden_states = block(hidden_states, temb, angles)
        return hidden_states


def denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser().eval()


def inputs(seed: int = 1) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, T, D, generator=generator), "timestep": torch.tensor([0.3, 0.7])}


def test_without_example_inputs_the_error_asks_for_them() -> None:
    model = denoiser()
    report = find_ffns(model)
    assert report.sites == [] and [u.name for u in report.unrun] == ["blocks.0", "blocks.1"]
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model)
    message = str(error.value)
    assert "blocks.0 [Modulated]: cannot run alone on hidden states (2, 4, 8)" in message
    assert "Blocks that cannot run alone are traced on the inputs they receive" in message
    assert "pass moeify(model, example_inputs=...)" in message
    assert_untouched(model, before)


def test_blocks_are_traced_on_the_inputs_of_a_real_forward() -> None:
    model = denoiser()
    batch = inputs()
    report = find_ffns(model, example_inputs=batch)
    assert [(s.name, s.source, s.install_path, s.layout.kind) for s in report.sites] == [
        ("blocks.0", "example_inputs", "blocks.0.ff_out", "fused_gated"),
        ("blocks.1", "example_inputs", "blocks.1.ff_out", "fused_gated"),
    ]
    assert report.sites[0].layout.split  # the activation is a function between the projections
    assert report.unrun == [] and set(report.captured) == {"blocks.0", "blocks.1"}
    with torch.no_grad():
        dense = model(**batch)
    moeify.moeify(model, num_experts=4, shared_expert_init="zero_out", example_inputs=batch)
    with torch.no_grad():
        assert (model(**batch) - dense).abs().max() <= 1e-5 * dense.abs().max()
    assert [name for name, _ in moe_layers(model)] == ["blocks.0.ff_out.moe", "blocks.1.ff_out.moe"]
    assert set(model.moeify_state.captured) == {"blocks.0", "blocks.1"}


def test_inputs_that_do_not_run_the_model_are_refused_before_anything_changes() -> None:
    model = denoiser()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"example_inputs do not run the dense Denoiser \(TypeError"):
        moeify.moeify(model, example_inputs={"hidden_states": torch.randn(2, T, D)})
    assert_untouched(model, before)


def test_a_checkpoint_records_what_was_found_on_inputs_and_loads_without_them(tmp_path) -> None:
    model = denoiser()
    batch = inputs()
    moeify.moeify(model, num_experts=4, example_inputs=batch)
    with torch.no_grad():
        expected = model(**batch)
    moeify.save_pretrained(model, tmp_path)
    record = json.loads((tmp_path / "moeify_config.json").read_text())
    assert record["format_version"] == 2 and set(record["captured"]) == {"blocks.0", "blocks.1"}
    assert record["captured"]["blocks.0"]["layout"]["kind"] == "fused_gated"
    loaded = moeify.from_pretrained(tmp_path, base_model=denoiser(seed=5))  # other weights: all are loaded
    with torch.no_grad():
        assert torch.equal(loaded(**batch), expected)


def test_the_layout_record_round_trips() -> None:
    model = denoiser()
    site = find_ffns(model, example_inputs=inputs()).sites[0]
    data = json.loads(json.dumps(layout_to_dict(site.layout)))
    again = layout_from_dict(data)
    assert again == site.layout  # every plain field; the callables compared through what they build
    block = model.blocks[0]
    h = torch.randn(5, I)
    assert torch.equal(again.act(block)(h), site.layout.act(block)(h))


@pytest.mark.parametrize(
    "function",
    [
        {"namespace": "torch", "name": "load"},
        {"namespace": "os", "name": "system"},
        {"namespace": "tensor", "name": "tolist"},
    ],
)
def test_a_record_can_name_no_other_code(function: dict) -> None:
    """A checkpoint is untrusted input: its recorded activation may only call element-wise, dropout
    and split functions."""
    data = {
        "steps": [{"fn": function, "args": [{"slot": [0, None]}], "kwargs": {}}],
        "result": {"slot": [1, None]},
        "modules": {},
    }
    with pytest.raises(ValueError, match="not an element-wise, dropout or split function"):
        Program.from_dict(data)


def test_a_damaged_record_is_a_clear_error(tmp_path) -> None:
    model = denoiser()
    moeify.moeify(model, num_experts=4, example_inputs=inputs())
    moeify.save_pretrained(model, tmp_path)
    path = tmp_path / "moeify_config.json"
    record = json.loads(path.read_text())
    record["captured"]["blocks.0"]["layout"]["version"] = 99
    path.write_text(json.dumps(record))
    resign_checkpoint(tmp_path)  # reach the layout check, not the checksum
    with pytest.raises(CheckpointError, match="its recorded FFN layouts cannot be read"):
        moeify.from_pretrained(tmp_path, base_model=denoiser())
