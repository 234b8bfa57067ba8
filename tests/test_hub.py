"""The model card and push_to_hub, through the REAL huggingface_hub client talking HTTP to the
loopback Hub of hub_server.py: one commit holding weights, card and diagnostics; the card's YAML
and links; the pull back with moeify.from_pretrained (bit-identical outputs); server errors
(500 on commit, 401 on create, no server) that publish nothing and change no local file; the
CLI's card and push commands."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from core_helpers import llama_config
from hub_server import TOKEN, HubServer
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moeify
from moeify.cli import main
from moeify.hub.card import parameter_counts
from moeify.monitors import attach_monitors
from moeify.sinks.jsonl import JsonlSink

ROOT = Path(__file__).resolve().parents[1]
PLOTS = {"diagnostics/load_heatmap.png", "diagnostics/entropy.png", "diagnostics/deadlock_map.png"}
RUN_FILES = {"diagnostics/history.jsonl", "diagnostics/events.jsonl", "diagnostics/summary.json"}
CHECKPOINT = {"moeify_config.json", "config.json", "base_config.json", "moeify_model.safetensors"}
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def tiny_llama(**recipe) -> torch.nn.Module:
    config = llama_config(head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    return moeify.moeify(
        AutoModelForCausalLM.from_config(config), **{"num_experts": 4, "top_k": 2, "seed": 1, **recipe}
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A converted tiny Llama trained 6 steps with the default monitors and a JsonlSink."""
    model = tiny_llama()
    run_dir = tmp_path_factory.mktemp("run")
    runner = attach_monitors(model, sinks=[JsonlSink(run_dir)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(3, 100, (2, 8), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
    runner.close()
    return model.eval(), runner, run_dir


def snapshot(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def check_markdown(text: str, files: set[str]) -> None:
    """Tables have as many cells per row as their header; images are relative links to `files`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(-+\|)+", lines[i + 1]):
            width = len(re.split(r"(?<!\\)\|", line)) - 2
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                assert len(re.split(r"(?<!\\)\|", lines[j])) - 2 == width, lines[j]
                j += 1
    for link in IMAGE.findall(text):
        assert not re.match(r"\w+://|/", link) and link in files, link


def outputs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_push_one_commit_then_pull_bit_identical(trained, hub: HubServer) -> None:
    model, _, run_dir = trained
    before = snapshot(run_dir)
    info = moeify.push_to_hub(model, "alice/tiny-moe", monitors=run_dir, token=TOKEN, endpoint=hub.url)
    commits = hub.commits("alice/tiny-moe")
    assert [c["summary"] for c in commits][0] == "initial commit" and len(commits) == 2  # ONE commit of ours
    assert info.oid == commits[-1]["sha"] and str(info).endswith(info.oid)
    files = set(commits[-1]["files"])
    assert CHECKPOINT | RUN_FILES | PLOTS | {"README.md"} <= files
    routes = [r["route"] for r in hub.requests if r["route"] != "harnesses"]
    assert routes == ["create", "validate", "preupload", "commit"]  # the card was validated first
    assert {r["authorization"] for r in hub.requests if r["route"] != "harnesses"} == {f"Bearer {TOKEN}"}

    stored = hub.tree("alice/tiny-moe")
    text = (stored / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "moeify" and card.data.pipeline_tag == "text-generation"
    assert {"moe", "mixture-of-experts", "moeify", "upcycled"} <= set(card.data.tags)
    block = card.data.to_dict()["moeify"]
    assert block["recipes"][0]["num_experts"] == 4 and block["recipes"][0]["top_k"] == 2
    assert block["parameters"] == parameter_counts(model)
    health = block["routing_health"]
    assert health["steps"] == 6 and health["moe_layers"] == 2 and health["dead_experts"] == 0
    assert health["deadlocked_layers"] == [] and health["ecology_E_min"] == 0.0  # default recipe: H = 0
    assert health["events"]["low_ecology"] == 1
    assert set(IMAGE.findall(text)) == PLOTS
    check_markdown(text, files)
    assert "`model.layers.1.mlp` |" in text and "low_ecology" in text
    assert (stored / "diagnostics/history.jsonl").read_bytes() == (run_dir / "history.jsonl").read_bytes()
    assert snapshot(run_dir) == before  # the run directory was only read

    pulled = moeify.from_pretrained("alice/tiny-moe")
    assert torch.equal(outputs(pulled), outputs(model))
    assert pulled.moeify_state.conversions == model.moeify_state.conversions


def test_push_from_runner_private_and_again(trained, hub: HubServer) -> None:
    model, runner, _ = trained
    moeify.push_to_hub(model, "bob/runner-moe", monitors=runner, private=True)  # token from HF_TOKEN
    assert hub.repos["bob/runner-moe"]["private"]
    stored = hub.tree("bob/runner-moe")
    assert len((stored / "diagnostics/history.jsonl").read_text().splitlines()) == len(runner.history) == 6
    assert PLOTS <= set(hub.commits("bob/runner-moe")[-1]["files"])
    # A second push to the existing repo is one more commit (create_repo: exist_ok).
    moeify.push_to_hub(model, "bob/runner-moe", commit_message="again")
    assert [c["summary"] for c in hub.commits("bob/runner-moe")][1:] == ["Upload moeify MoE model (12 files)", "again"]


def test_commit_500_publishes_nothing_and_keeps_local_files(
    trained, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, run_dir = trained
    before_run, before_state = snapshot(run_dir), {k: v.clone() for k, v in model.state_dict().items()}
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    hub.fail("commit", 500)
    with pytest.raises(moeify.PushError, match=r"committing \d+ files .* HTTP 500.*Nothing was committed") as caught:
        moeify.push_to_hub(model, "carol/moe", monitors=run_dir)
    assert "try again later" in str(caught.value)
    assert [c["summary"] for c in hub.commits("carol/moe")] == ["initial commit"]
    assert snapshot(run_dir) == before_run and list(staging.iterdir()) == []  # staging removed
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    hub.clear_failures()
    moeify.push_to_hub(model, "carol/moe")  # the retry lands whole
    assert len(hub.commits("carol/moe")) == 2


def test_bad_token_and_no_server(trained, hub: HubServer, tmp_path: Path) -> None:
    model, _, _ = trained
    with pytest.raises(moeify.PushError, match=r"creating the repo dave/moe .*HTTP 401.*hf auth login"):
        moeify.push_to_hub(model, "dave/moe", token="hf_wrong")
    assert "dave/moe" not in hub.repos
    hub.fail("create", 500, times=1)
    with pytest.raises(moeify.PushError, match=r"HTTP 500"):
        moeify.push_to_hub(model, "dave/moe")
    closed = HubServer(tmp_path / "closed")  # never started: its port refuses connections
    closed.stop()
    with pytest.raises(moeify.PushError, match=r"could not reach http://127\.0\.0\.1:\d+ \(ConnectError"):
        moeify.push_to_hub(model, "dave/moe", endpoint=closed.url)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        moeify.push_to_hub(model, "no spaces/allowed here")


def test_card_without_diagnostics(hub: HubServer) -> None:
    model = tiny_llama(layers=[0], num_shared_experts=2)
    card = moeify.model_card(model, base_model="meta-llama/Llama-3.2-1B")
    text = str(card)
    assert ModelCard(text).data.to_dict() == card.data.to_dict()  # the YAML round-trips
    card.validate()  # the loopback Hub's /api/validate-yaml accepts it
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and "Routing health" not in text
    assert "routing_health" not in card.data.moeify and not IMAGE.findall(text)
    assert "| `model.layers.1.mlp` | LlamaMLP | block 1 is not in layers=[0] |" in text
    assert 'moeify.from_pretrained("path/to/this/checkpoint")' in text
    check_markdown(text, set())
    # Active per token: outside the MoE layer, plus its router, 2 shared and top-2 of 4 routed experts.
    layer = moeify.moe_layers(model)[0][1]
    expert = sum(p.numel() for p in layer.experts.parameters()) // 4
    total = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == {
        "total": total,
        "active_per_token": total - 2 * expert,
        "dense": total - 5 * expert - sum(p.numel() for p in layer.router.parameters()),
    }
    assert card.data.moeify["skipped_sites"] == 1 and card.data.moeify["moe_layers"] == 1
    # The server checks what the Hub checks: a local path is no base_model.
    with pytest.raises(ValueError, match="base_model"):
        ModelCard(text.replace("base_model: meta-llama/Llama-3.2-1B", "base_model: /tmp/my model")).validate()
    with pytest.raises(ValueError, match="not a Hub repo id"):
        moeify.model_card(model, base_model="/tmp/local/model")
    model.config._name_or_path = str(Path.cwd())  # converted from a local checkpoint: left out
    assert moeify.model_card(model).data.base_model is None


def test_cli_card_and_push(trained, hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, _, run_dir = trained
    saved = moeify.save_pretrained(model, tmp_path / "ckpt")
    readme = tmp_path / "card" / "README.md"
    assert main(["card", str(run_dir), "--model", str(saved), "-o", str(readme), "--repo-id", "erin/moe"]) == 0
    text = readme.read_text()
    check_markdown(text, {p.relative_to(readme.parent).as_posix() for p in readme.parent.rglob("*")})
    assert len(IMAGE.findall(text)) == 3 and 'from_pretrained("erin/moe")' in text
    assert "wrote " in capsys.readouterr().out
    assert main(["card", str(run_dir), "--model", str(saved)]) == 0  # printed
    assert capsys.readouterr().out.startswith("---\nlibrary_name: moeify\n")
    assert main(["card", str(run_dir), "--model", str(saved), "-o", str(readme)]) == 1
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["card", str(tmp_path), "--model", str(saved)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeify card: error:") and "not a moeify run directory" in err and err.count("\n") == 1

    assert main(["push", str(saved), "erin/moe", "--run", str(run_dir), "--private"]) == 0
    assert "pushed in one commit: http://127.0.0.1" in capsys.readouterr().out
    assert hub.repos["erin/moe"]["private"] and len(hub.commits("erin/moe")) == 2
    assert CHECKPOINT | RUN_FILES | PLOTS <= set(hub.commits("erin/moe")[-1]["files"])
    hub.fail("commit", 500)
    assert main(["push", str(saved), "erin/moe"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeify push: error: moeify.push_to_hub: committing") and "HTTP 500" in err
    assert err.count("\n") == 1 and len(hub.commits("erin/moe")) == 2


def test_cli_push_with_hf_endpoint_in_a_fresh_process(trained, tmp_path: Path) -> None:
    """HF_ENDPOINT as a user sets it (read when huggingface_hub is imported), the console path."""
    saved = moeify.save_pretrained(trained[0], tmp_path / "ckpt")
    with HubServer(tmp_path / "hub", token=TOKEN) as server:
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }
        done = subprocess.run(
            [sys.executable, "-m", "moeify.cli", "push", str(saved), "frank/moe"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert len(server.commits("frank/moe")) == 2
        stored = server.tree("frank/moe")
        # Tensors, not bytes: safetensors orders the header's metadata differently in each process.
        pushed, local = (load_file(d / "moeify_model.safetensors") for d in (stored, saved))
        assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    assert huggingface_hub.constants.ENDPOINT != server.url  # this process was left alone


def test_example_stages_locally_then_pushes(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("publish", ROOT / "examples" / "publish.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.delenv("HF_TOKEN")  # no token, no endpoint: nothing leaves the machine
    repo = example.main(["--out", str(tmp_path / "local"), "--steps", "3"])
    staged = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert CHECKPOINT | RUN_FILES | PLOTS | {"README.md"} <= staged and not hub.repos
    info = example.main(
        [
            "--out",
            str(tmp_path / "pushed"),
            "--steps",
            "3",
            "--repo-id",
            "gina/moe",
            "--token",
            TOKEN,
            "--endpoint",
            hub.url,
        ]
    )
    assert info.endswith(hub.commits("gina/moe")[-1]["sha"])
    assert set(hub.commits("gina/moe")[-1]["files"]) == staged | {".gitattributes"}
