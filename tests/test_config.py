"""MoeifyConfig: every bad value is refused with a ValueError naming its field; JSON round-trips
with a version; unknown keys, newer versions and unknown option names are refused."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from core_helpers import llama_config
from transformers import AutoModelForCausalLM

from moeify import MoeifyConfig, moeify
from moeify.config import CONFIG_VERSION

# (field, bad value): each must raise ValueError whose message names the field.
BAD_VALUES = [
    ("num_experts", 0),
    ("num_experts", -2),
    ("num_experts", 1.5),
    ("num_experts", True),
    ("top_k", 0),
    ("top_k", 9),  # > num_experts=8
    ("top_k", 2.0),
    ("num_shared_experts", -1),
    ("shared_expert_init", "bar"),
    ("shared_expert_init", None),
    ("shared_noise_std", 0.0),
    ("shared_noise_std", -1e-4),
    ("router", "foo"),
    ("router", "Linear"),
    ("router_hidden_size", 0),
    ("router_hidden_size", 16.0),
    ("router_hidden_size", True),
    ("router_num_heads", 0),
    ("router_init_std", -0.02),
    ("router_init_std", math.inf),
    ("router_temperature", 0.0),
    ("router_temperature", math.nan),
    ("router_temperature", math.inf),
    ("router_temperature", "1"),
    ("balance_loss_weight", -0.01),
    ("balance_loss_weight", math.inf),
    ("balance_loss_weight", True),
    ("z_loss_weight", -1e-3),
    ("z_loss_weight", math.nan),
    ("entropy_loss_weight", -1),
    ("target_modules", "(["),  # bad regex
    ("target_modules", []),
    ("target_modules", [""]),
    ("target_modules", ["mlp", 3]),
    ("target_modules", 3),
    ("exclude_modules", "*mlp"),  # bad regex
    ("exclude_modules", []),
    ("layers", [-1]),
    ("layers", []),
    ("layers", [1.0]),
    ("layers", "1"),
    ("layers", True),
    ("conditioning_dim", 0),
    ("conditioning_dim", True),
    ("verify", "yes"),
    ("verify_tolerance", 0),
    ("verify_tolerance", math.nan),
    ("seed", 1.0),
    ("seed", None),
    ("seed", -1),
    ("seed", 2**63),  # torch could not even take it
    ("version", CONFIG_VERSION + 1),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_value_names_its_field(name: str, value) -> None:
    with pytest.raises(ValueError) as error:
        MoeifyConfig(**{name: value})
    assert name in str(error.value), str(error.value)


def test_accepted_values_are_normalised() -> None:
    config = MoeifyConfig(
        num_experts=4,
        top_k=4,
        num_shared_experts=0,
        router="mlp",
        layers=3,
        target_modules={"up", "mlp"},
        exclude_modules=["layers.0.mlp"],
        router_temperature=2,
        entropy_loss_weight=0,
    )
    assert config.layers == (3,)
    assert config.target_modules == ("mlp", "up")  # a set is sorted: the order is reproducible
    assert config.exclude_modules == ("layers.0.mlp",)
    assert MoeifyConfig(layers=[2, 0, 2]).layers == (0, 2)
    assert MoeifyConfig(target_modules=r".*\.mlp").target_modules == r".*\.mlp"


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MoeifyConfig().num_experts = 4


@pytest.mark.parametrize(
    "config",
    [
        MoeifyConfig(),
        MoeifyConfig(
            num_experts=4,
            top_k=1,
            num_shared_experts=2,
            shared_expert_init="zero_out",
            router="cross_attention",
            router_hidden_size=16,
            router_num_heads=2,
            router_temperature=0.5,
            entropy_loss_weight=0.1,
            target_modules=["mlp", "ffn"],
            exclude_modules=r".*\.0\.mlp",
            layers=[1, 0],
            conditioning_dim=12,
            verify=False,
            seed=7,
        ),
    ],
    ids=["defaults", "every-field"],
)
def test_json_round_trip(config: MoeifyConfig) -> None:
    text = config.to_json()
    data = json.loads(text)
    assert data["version"] == CONFIG_VERSION
    assert set(data) == {f.name for f in dataclasses.fields(MoeifyConfig)}
    loaded = MoeifyConfig.from_json(text)
    assert loaded == config
    assert loaded.to_json() == text


def test_unknown_key_refused() -> None:
    data = MoeifyConfig().to_dict() | {"num_expert": 4}
    with pytest.raises(ValueError, match=r"unknown MoeifyConfig key\(s\) \['num_expert'\]"):
        MoeifyConfig.from_dict(data)


def test_newer_version_refused() -> None:
    data = MoeifyConfig().to_dict() | {"version": CONFIG_VERSION + 1}
    with pytest.raises(
        ValueError, match=rf"version {CONFIG_VERSION + 1}, written by a newer moeify.*pip install -U moeify"
    ):
        MoeifyConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("version", [0, -1, "1", 1.0])
def test_invalid_version_refused(version) -> None:
    data = MoeifyConfig().to_dict() | {"version": version}
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        MoeifyConfig.from_dict(data)


def test_not_a_config_refused() -> None:
    no_version = MoeifyConfig().to_dict()
    del no_version["version"]
    with pytest.raises(ValueError, match="no 'version' field"):
        MoeifyConfig.from_dict(no_version)
    with pytest.raises(ValueError, match="not valid JSON"):
        MoeifyConfig.from_json("{num_experts: 4")
    with pytest.raises(ValueError, match="JSON object, got list"):
        MoeifyConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="num_experts must be >= 1"):  # loaded values are validated too
        MoeifyConfig.from_dict(MoeifyConfig().to_dict() | {"num_experts": 0})


def test_replace() -> None:
    base = MoeifyConfig(num_experts=4)
    changed = base.replace(top_k=1, router="mlp")
    assert (changed.num_experts, changed.top_k, changed.router) == (4, 1, "mlp")
    assert base.top_k == 2  # the original is not mutated
    with pytest.raises(ValueError) as error:
        base.replace(num_expert=2, topk=1)
    message = str(error.value)
    assert "['num_expert', 'topk']" in message
    assert "known options" in message and "'num_experts'" in message and "'top_k'" in message
    assert "'version'" not in message  # not an option a user sets
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts=4"):
        base.replace(top_k=5)  # the copy is validated again


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(llama_config())


def test_bad_override_raises_before_touching_the_model() -> None:
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        moeify(model, num_experts=0)
    with pytest.raises(ValueError, match="known options"):
        moeify(model, MoeifyConfig(num_experts=4), num_expert=4)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "moeify_state")
