"""save_pretrained / from_pretrained: bit-identical round trips (transformers, diffusers, plain
nn.Module; fresh and after a training step), sharding, meta-device rebuild, strict keys, pickle
refusal, and plain transformers / diffusers loaders failing loudly on a moeify directory."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from core_helpers import resign_checkpoint
from safetensors.torch import load_file, save_file
from tiny_diffusers import pixart
from tiny_transformers import BY_NAME
from torch import nn

import moeify
from moeify.hub import load as load_module
from moeify.hub.load import CheckpointError
from moeify.hub.save import GUARD_NAME, MOEIFY_CONFIG, WEIGHTS, WEIGHTS_INDEX

RECIPE = {"num_experts": 4, "top_k": 2, "seed": 3}


def train_step(model: nn.Module, output: Callable[[nn.Module], torch.Tensor]) -> None:
    """One SGD step on a squared-output loss + the router losses: routers, experts and shared
    experts all move, and the experts stop being clones of each other."""
    model.train()
    loss = output(model).float().pow(2).mean() + moeify.aux_loss(model)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad, alpha=1.0)
                p.grad = None
    model.eval()


def experts_differ(model: nn.Module) -> bool:
    experts = moeify.moe_layers(model)[0][1].experts
    if hasattr(experts, "w_in"):
        return not torch.equal(experts.w_in[0], experts.w_in[1])
    first, second = experts.experts[0], experts.experts[1]  # generic experts: module copies
    return any(not torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def reload(model: nn.Module, directory: Path, **kwargs) -> nn.Module:
    moeify.save_pretrained(model, directory, **kwargs)
    return moeify.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "opt", "phi3"])
def test_transformers_round_trip_after_training_is_bit_identical(name: str, tmp_path: Path) -> None:
    tiny = BY_NAME[name]
    model = moeify.moeify(tiny.build(), **RECIPE)
    inputs = tiny.inputs(model)
    train_step(model, lambda m: tiny.output(m(**inputs)))
    assert experts_differ(model)
    with torch.no_grad():
        before = tiny.output(model(**inputs))
    loaded = reload(model, tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        after = tiny.output(loaded(**inputs))
    assert torch.equal(before, after), f"max diff {(before - after).abs().max()}"
    assert_same_state(model, loaded)
    assert loaded.config._attn_implementation == model.config._attn_implementation == "eager"
    assert [c.to_dict() for c in loaded.moeify_state.conversions] == [
        c.to_dict() for c in model.moeify_state.conversions
    ]


class Compiled(nn.Module):
    """What torch.compile returns, structurally: the model under `_orig_mod` (without importing dynamo)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_tied_lm_head_is_stored_once_and_tied_again(tmp_path: Path) -> None:
    model = moeify.moeify(BY_NAME["gpt2"].build(), **RECIPE)
    assert model.lm_head.weight is model.transformer.wte.weight
    loaded = reload(Compiled(model), tmp_path)  # the wrapper's `_orig_mod.` prefix is not saved
    record = json.loads((tmp_path / MOEIFY_CONFIG).read_text())
    assert record["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in load_file(tmp_path / WEIGHTS)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_fresh_conversion_records_recipe_and_base(tmp_path: Path) -> None:
    tiny = BY_NAME["llama"]
    model = moeify.moeify(tiny.build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)
    record = json.loads((tmp_path / MOEIFY_CONFIG).read_text())
    assert record["format"] == "moeify" and record["moeify_version"] == moeify.__version__
    assert record["base"] | {"module": None} == {
        "library": "transformers",
        "class_name": "LlamaForCausalLM",
        "module": None,
        "model_type": "llama",
        "auto_class": "AutoModelForCausalLM",
        "attn_implementation": "eager",
        "config_file": "base_config.json",
        "name_or_path": None,  # built from a config, not loaded from a path
    }
    assert json.loads((tmp_path / "base_config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base_config.json",
        "config.json",
        "generation_config.json",
        MOEIFY_CONFIG,
        WEIGHTS,
    ]
    loaded = moeify.from_pretrained(tmp_path)
    assert loaded.moeify_state.config.verify is True  # the recipe as saved, not the verify=False re-application
    assert len(loaded.moeify_state.report.sites) == 2


def test_two_recipes_and_bf16_round_trip(tmp_path: Path) -> None:
    """Recipes are re-applied in order; bf16 weights stay bf16 (routers fp32), and buffers that
    `.to(bf16)` cast (rotary inv_freq) come back in that dtype."""
    tiny = BY_NAME["llama"]
    model = moeify.moeify(tiny.build(), layers=[0], **RECIPE)
    moeify.moeify(model, layers=[1], num_experts=2, top_k=1, num_shared_experts=0)
    model.to(torch.bfloat16)
    inputs = tiny.inputs(model)
    with torch.no_grad():
        before = tiny.output(model(**inputs))
    loaded = reload(model, tmp_path)
    with torch.no_grad():
        after = tiny.output(loaded(**inputs))
    assert torch.equal(before, after)
    assert [c.num_experts for c in loaded.moeify_state.conversions] == [4, 2]
    assert loaded.model.layers[0].mlp.experts.w_in.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.router.gate.weight.dtype == torch.float32
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.bfloat16


def test_diffusers_cross_attention_router_round_trip(tmp_path: Path) -> None:
    model, kwargs = pixart()
    moeify.moeify(model, router="cross_attention", **RECIPE)
    train_step(model, lambda m: m(**kwargs).sample)
    assert experts_differ(model)
    with torch.no_grad():
        before = model(**kwargs).sample
    loaded = reload(model, tmp_path)
    assert type(loaded) is diffusers.PixArtTransformer2DModel
    with torch.no_grad():
        after = loaded(**kwargs).sample
    assert torch.equal(before, after)
    assert_same_state(model, loaded)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_plain_module_round_trip_needs_base_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = moeify.moeify(Net(), target_modules=["ffn"], **RECIPE).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    train_step(model, lambda m: m(x))
    assert experts_differ(model)
    with torch.no_grad():
        before = model(x)
    moeify.save_pretrained(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"plain torch module \(.*Net\).*base_model="):
        moeify.from_pretrained(tmp_path)
    with init_empty_weights():
        skeleton = Net()
    loaded = moeify.from_pretrained(tmp_path, base_model=skeleton)
    assert loaded is skeleton
    with torch.no_grad():
        assert torch.equal(before, loaded(x))
    with pytest.raises(CheckpointError, match="already converted"):
        moeify.from_pretrained(tmp_path, base_model=loaded)


# ---------------------------------------------------------------------------------------------
# Sharding, meta device, strict keys


def test_sharded_save_reloads(tmp_path: Path) -> None:
    tiny = BY_NAME["llama"]
    model = moeify.moeify(tiny.build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)  # first a single file: the sharded save replaces it
    moeify.save_pretrained(model, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and all(name.startswith("moeify_model-0") for name in shards)
    index = json.loads((tmp_path / WEIGHTS_INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    loaded = moeify.from_pretrained(tmp_path)
    assert_same_state(model, loaded)


def test_rebuild_is_on_meta_and_load_leaves_nothing_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)
    seen = {}
    reapply = load_module.reapply

    def spy(skeleton: nn.Module, record: dict) -> list:
        seen["params_on_meta"] = all(p.is_meta for p in skeleton.parameters())
        seen["buffers_real"] = not any(b.is_meta for b in skeleton.buffers())
        return reapply(skeleton, record)

    monkeypatch.setattr(load_module, "reapply", spy)
    loaded = moeify.from_pretrained(tmp_path)
    assert seen == {"params_on_meta": True, "buffers_real": True}
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    counts = loaded.model.layers[0].mlp.tokens_per_expert
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.zeros(4, dtype=torch.int64))
    assert "tokens_per_expert" not in " ".join(load_file(tmp_path / WEIGHTS))  # a per-step statistic


def test_base_model_built_on_torch_meta_device_is_refused(tmp_path: Path) -> None:
    tiny = BY_NAME["llama"]
    moeify.save_pretrained(moeify.moeify(tiny.build(), **RECIPE), tmp_path)
    with torch.device("meta"):
        skeleton = tiny.build()  # buffers (rotary inv_freq) on meta too: nothing can fill them
    with pytest.raises(CheckpointError, match=r"meta device: .*inv_freq.*init_empty_weights"):
        moeify.from_pretrained(tmp_path, base_model=skeleton)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / WEIGHTS_INDEX).read_text())
    victim = "model.layers.1.mlp.experts.w_out"
    shard = tmp_path / index["weight_map"][victim]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.bogus"] = tensors.pop(victim)
    save_file(tensors, shard)
    resign_checkpoint(tmp_path)  # reach the key check, not the checksum
    with pytest.raises(
        CheckpointError, match=rf"missing 1 key\(s\): {victim}; unexpected 1 key\(s\): model.layers.1.mlp.bogus"
    ):
        moeify.from_pretrained(tmp_path)


def test_wrong_shapes_and_newer_format_are_refused(tmp_path: Path) -> None:
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)
    record = json.loads((tmp_path / MOEIFY_CONFIG).read_text())
    record["conversions"][0]["num_experts"] = 2  # the rebuilt model no longer fits the weights
    (tmp_path / MOEIFY_CONFIG).write_text(json.dumps(record))
    resign_checkpoint(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"6 key\(s\) of another shape: model.layers.0.mlp.experts.w_in \[4, 128, 32\] \(model \[2, 128, 32\]\)",
    ):
        moeify.from_pretrained(tmp_path)
    record = json.loads((tmp_path / MOEIFY_CONFIG).read_text())
    record["format_version"] = 99
    (tmp_path / MOEIFY_CONFIG).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="pip install -U moeify"):
        moeify.from_pretrained(tmp_path)


# Each damage re-signs the checkpoint (its checksums recomputed), as if it had been saved that way:
# the check under test is reached instead of the checksum (tests/test_properties.py flips bytes).
def _remove(name: str) -> Callable[[Path], None]:
    return lambda directory: ((directory / name).unlink(), resign_checkpoint(directory))


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda directory: ((directory / name).write_text(text), resign_checkpoint(directory))


def _record(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        record = json.loads((directory / MOEIFY_CONFIG).read_text())
        change(record)
        (directory / MOEIFY_CONFIG).write_text(json.dumps(record))
        resign_checkpoint(directory)

    return edit


DAMAGES = [
    (_remove("base_config.json"), r"base_config.json \(the base model's config\) is missing"),
    (_write("base_config.json", "{oops"), r"base_config.json \(the base model's config\) is not valid JSON"),
    (_record(lambda r: r.pop("base")), r"the record names no base model library .*base_model="),
    (_record(lambda r: r.update(format_version="2")), "format_version must be a positive integer, got '2'"),
    (_record(lambda r: r.update(format_version=True)), "format_version must be a positive integer, got True"),
    (_record(lambda r: r.update(tied=[])), "'tied' must be a JSON object, got list"),
    (_record(lambda r: r.update(conversions={})), "'conversions' must be a JSON list, got dict"),
]


@pytest.mark.parametrize(("damage", "says"), DAMAGES, ids=[d[1][:40] for d in DAMAGES])
def test_a_damaged_record_is_a_clear_error(tmp_path: Path, damage: Callable[[Path], None], says: str) -> None:
    moeify.save_pretrained(moeify.moeify(BY_NAME["llama"].build(), **RECIPE), tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=says):
        moeify.from_pretrained(tmp_path)


def test_checksums_name_the_damaged_file_and_older_records_without_them_load(tmp_path: Path) -> None:
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)
    weights = bytearray((tmp_path / WEIGHTS).read_bytes())
    weights[-1] ^= 0x01  # the last byte of the last tensor: the header still parses, a weight changed
    (tmp_path / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} does not match its checksum .*fetch or save it again"):
        moeify.from_pretrained(tmp_path)
    weights[-1] ^= 0x01
    (tmp_path / WEIGHTS).write_bytes(bytes(weights))
    record_text = (tmp_path / MOEIFY_CONFIG).read_text()
    (tmp_path / MOEIFY_CONFIG).write_text(record_text.replace('"top_k": 2', '"top_k": 1'))
    with pytest.raises(CheckpointError, match="does not match its checksum; the record is damaged"):
        moeify.from_pretrained(tmp_path)
    record = json.loads(record_text)
    del record["checksums"], record["record_checksum"]  # as written before checksums existed
    (tmp_path / MOEIFY_CONFIG).write_text(json.dumps(record))
    loaded, ids = moeify.from_pretrained(tmp_path), torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("recorded", [True, False], ids=["record-has-dtypes", "older-record"])
def test_a_tensor_stored_in_another_dtype_is_refused(tmp_path: Path, recorded: bool) -> None:
    """The files' headers are checked against the dtypes the save wrote (the record's `dtypes`),
    and routers must be fp32 in any checkpoint: a float16 router would fail at the first forward."""
    moeify.save_pretrained(moeify.moeify(BY_NAME["llama"].build(), **RECIPE), tmp_path)
    if not recorded:
        _record(lambda r: r.pop("dtypes"))(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    router = "model.layers.0.mlp.router.gate.weight"
    tensors[router] = tensors[router].half()
    save_file(tensors, tmp_path / WEIGHTS)
    resign_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=rf"1 key\(s\) of another dtype: {router} F16 \(saved as F32\)"):
        moeify.from_pretrained(tmp_path)
    expert = "model.layers.1.mlp.experts.w_in"
    tensors[router] = tensors[router].float()
    tensors[expert] = tensors[expert].half()
    save_file(tensors, tmp_path / WEIGHTS)
    resign_checkpoint(tmp_path)
    if recorded:
        with pytest.raises(CheckpointError, match=rf"{expert} F16 \(saved as F32\)"):
            moeify.from_pretrained(tmp_path)
    else:  # an older record says nothing of the experts' dtype: weights keep the dtype they are stored in
        assert moeify.from_pretrained(tmp_path).model.layers[1].mlp.experts.w_in.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Refusals and guards


class _Trap:
    """Unpickling this would create a file: proof that nothing was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_weights_are_refused_never_unpickled(tmp_path: Path) -> None:
    trap = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(trap)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        moeify.from_pretrained(tmp_path)
    # A moeify record whose safetensors were swapped for a pickle: refused the same way.
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS).unlink()
    (tmp_path / "ckpt" / "model.pt").write_bytes(pickle.dumps(_Trap(trap)))
    with pytest.raises(CheckpointError, match=r"\(model.pt\).*never unpickles"):
        moeify.from_pretrained(tmp_path / "ckpt")
    assert not trap.exists()


def test_not_a_moeify_directory_and_bad_paths(tmp_path: Path) -> None:
    dense = BY_NAME["llama"].build()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a moeify checkpoint.*moeify convert"):
        moeify.from_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="no such directory"):
        moeify.from_pretrained(tmp_path / "missing" / "dir")
    with pytest.raises(ValueError, match="was not converted"):
        moeify.save_pretrained(dense, tmp_path / "out")
    converted = moeify.moeify(dense, **RECIPE)
    with pytest.raises(ValueError, match="already holds a checkpoint that is not moeify's"):
        moeify.save_pretrained(converted, tmp_path / "dense")


def test_repo_id_downloads_json_safetensors_and_tokenizer_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fnmatch

    import huggingface_hub

    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path)
    calls = []

    def fake_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = moeify.from_pretrained("someone/tiny-llama-moe", revision="main")
    assert_same_state(model, loaded)
    assert len(calls) == 1 and calls[0][0] == "someone/tiny-llama-moe"
    options = calls[0][1]
    assert (options["revision"], options["token"]) == ("main", None)
    patterns = options["allow_patterns"]
    assert patterns[:2] == ["*.json", "*.safetensors"]
    assert {"tokenizer.model", "vocab.txt", "merges.txt", "chat_template.jinja", "*.tiktoken"} <= set(patterns)
    # Never a pickle (or code) file: those can run code when loaded.
    for name in ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "x.pkl", "tokenization_x.py"]:
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_plain_loaders_fail_loudly(tmp_path: Path) -> None:
    model = moeify.moeify(BY_NAME["llama"].build(), **RECIPE)
    moeify.save_pretrained(model, tmp_path / "llm")
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        with pytest.raises(ValueError, match=r"moeify\.from_pretrained"):
            auto.from_pretrained(tmp_path / "llm")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    assert GUARD_NAME in (tmp_path / "llm" / "config.json").read_text()

    dit, _ = pixart()
    moeify.save_pretrained(moeify.moeify(dit, **RECIPE), tmp_path / "dit")
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):
        diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"moeify\.from_pretrained"):
        diffusers.AutoModel.from_pretrained(tmp_path / "dit")


def test_base_model_name_survives_the_round_trip(tmp_path):
    from core_helpers import llama_config
    from transformers import AutoModelForCausalLM

    import moeify as moeify_pkg

    cfg = llama_config(num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"
    moeify_pkg.moeify(model, num_experts=2, top_k=1)
    moeify_pkg.save_pretrained(model, tmp_path / "ckpt")
    reloaded = moeify_pkg.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config._name_or_path == "meta-llama/Llama-3.2-1B"
