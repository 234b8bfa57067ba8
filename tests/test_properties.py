"""Properties over random inputs (hypothesis, derandomized: the same examples on every run).

- Any value for any MoeifyConfig field is accepted and round-trips through JSON, or is refused with a
  ValueError / TypeError, never another exception.
- Random tiny models x random recipes: moeify preserves the outputs (zero_out), or raises
  ConversionError and leaves the model bit-identical.
- Random truncations and byte flips of a saved checkpoint: loading gives a clear CheckpointError /
  ValueError, or (a change no checksum covers, such as a file it does not read) the same model;
  never a crash from inside torch, safetensors or json, never a silently different model.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_helpers import Blocks, assert_untouched, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import moeify
from moeify import ConversionError, MoeifyConfig
from moeify.hub.load import CheckpointError

SETTINGS = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
D, I = 8, 16  # noqa: E741 - the shape legend's I

# ------------------------------------------------------------------------------------ configs

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 12), max_size=4),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FIELDS = [f.name for f in dataclasses.fields(MoeifyConfig)]


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=ANY)
def test_any_config_value_is_accepted_and_round_trips_or_is_refused(field: str, value: object) -> None:
    try:
        config = MoeifyConfig(**{field: value})
    except (ValueError, TypeError):
        return
    assert MoeifyConfig.from_json(config.to_json()) == config


@SETTINGS
@given(text=st.text(max_size=80))
def test_any_json_text_loads_as_a_config_or_is_refused(text: str) -> None:
    try:
        MoeifyConfig.from_json(text)
    except (ValueError, TypeError):
        pass


# ---------------------------------------------------------------------- models x recipes


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, I), nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, I), nn.GELU(approximate="tanh"), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Mixer(nn.Module):
    """A token mixer between two projections: always refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.cumsum(torch.relu(self.fc1(x)), dim=1))


class Residual(nn.Module):
    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(D), ffn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.norm(x))


KINDS = {"gated": Gated, "plain": Plain, "mixer": Mixer}
RECIPES = st.fixed_dictionaries(
    {
        "num_experts": st.integers(1, 4),
        "num_shared_experts": st.integers(0, 2),
        "router": st.sampled_from(["linear", "mlp"]),
        "seed": st.integers(0, 1000),
    }
).flatmap(lambda r: st.integers(1, r["num_experts"]).map(lambda k: {**r, "top_k": k}))


@SETTINGS
@given(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=3), recipe=RECIPES, seed=st.integers(0, 99))
def test_conversion_preserves_or_refuses_and_leaves_the_model_alone(kinds: list[str], recipe: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = Blocks(*(Residual(KINDS[k]()) for k in kinds)).eval()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dense = model(x)
    before = snapshot(model)
    try:
        moeify.moeify(model, shared_expert_init="zero_out", example_inputs=x, **recipe)
    except ConversionError:
        assert set(kinds) == {"mixer"}  # the only refusal: nothing token-wise to convert
        assert_untouched(model, before)
        return
    with torch.no_grad():
        assert (model(x) - dense).abs().max() <= 1e-5 * dense.abs().max()
    assert len(moeify.moe_layers(model)) == sum(k != "mixer" for k in kinds)


# --------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = moeify.moeify(Blocks(Residual(Gated()), Residual(Plain())), num_experts=2).eval()
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    moeify.save_pretrained(model, directory)
    return directory, model


def _probe() -> Tensor:
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(5))


def _base() -> nn.Module:
    return Blocks(Residual(Gated()), Residual(Plain()))


@SETTINGS
@given(data=st.data())
def test_truncated_or_flipped_checkpoints_never_load_as_another_model(checkpoint, tmp_path_factory, data) -> None:
    source, model = checkpoint
    with torch.no_grad():  # here, under this test's settings (threads, expert path), as `loaded` runs
        expected = model(_probe())
    directory = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(source, directory)
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    path = directory / data.draw(st.sampled_from(files), label="file")
    content = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        content = content[: data.draw(st.integers(0, max(len(content) - 1, 0)), label="length")]
    else:
        at = data.draw(st.integers(0, len(content) - 1), label="byte")
        content[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path.write_bytes(bytes(content))
    try:
        loaded = moeify.from_pretrained(directory, base_model=_base())
    except (CheckpointError, ValueError, TypeError) as error:
        assert str(error)  # a message that says what is wrong
        return
    with torch.no_grad():
        assert torch.equal(loaded(_probe()), expected), f"{path.name} damaged, and a different model loaded"


# ------------------------------------------------------------------------------------ the CLI

WORDS = st.sampled_from(
    ["inspect", "convert", "export", "card", "push", "--experts", "--top-k", "--shared", "--router", "--layers",
     "--seed", "--format", "--json", "--model", "-o", "mixtral", "linear", "0", "-1", "3", "99999999999999999999",
     "1,x", "nan", "", "/nonexistent/dir", "user/repo", "--help"]
)  # fmt: skip


@SETTINGS
@given(argv=st.lists(WORDS, max_size=6))
def test_the_cli_never_prints_a_traceback(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    """Whatever the arguments: an exit code (0, 1 a failure, 2 a usage error), and on failure a
    message on stderr without a traceback."""
    from moeify.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code:
        assert err.strip(), argv
