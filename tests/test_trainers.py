"""Plain trainers train the routers: transformers' `Trainer` (gradient accumulation, a padding
collator) and TRL's `SFTTrainer`, with no subclass and no `compute_loss` override.

Only the routers train here, so the routed experts stay identical clones: then the task loss gives
the routers no gradient (any mix of equal experts is the same; 4e-10 of rounding), and a gradient
on them comes from the router losses the model added to its output's loss."""

from __future__ import annotations

import pytest
import torch
from core_helpers import VOCAB, tiny_llama
from torch import nn

import moeify
from moeify import moe_layers

LENGTHS = (9, 4, 7, 3, 8, 5, 6, 2)  # one epoch: 2 steps x 2 micro-batches x 2 sequences


def tiny_tokenizer():  # a PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>")


def text(length: int, seed: int) -> str:
    ids = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return " ".join(f"w{i}" for i in ids)


def routers_only(aux_loss_in_output: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, aux_loss_in_output=aux_loss_in_output)
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name)
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return model, start


def training_arguments(tmp_path) -> dict:
    """One epoch of LENGTHS (2 steps of 2 micro-batches of 2) on CPU, nothing saved or reported."""
    return dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )


def moved(model: nn.Module, start: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, p in model.named_parameters() if name in start and not torch.equal(p, start[name])]


@pytest.mark.parametrize("aux_loss_in_output", [True, False])
def test_plain_trainer_with_accumulation_and_padding(tmp_path, aux_loss_in_output: bool) -> None:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = tiny_tokenizer()
    model, start = routers_only(aux_loss_in_output)
    dataset = [tokenizer(text(length, seed)) for seed, length in enumerate(LENGTHS)]
    args = TrainingArguments(**training_arguments(tmp_path), data_seed=0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()

    # Padding was neither counted nor balanced: each layer counted the real tokens of the epoch.
    for _, layer in moe_layers(model):
        assert int(layer.tokens_per_expert.sum()) == sum(LENGTHS) * layer.top_k
    grad_norms = [float(entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == 2
    if aux_loss_in_output:
        assert min(grad_norms) > 1e-4
        assert sorted(moved(model, start)) == sorted(start)
    else:  # the task loss alone gives routers over identical experts no gradient (rounding aside)
        assert max(grad_norms) < 1e-6


def test_trl_sft_trainer_trains_the_routers(tmp_path) -> None:
    """TRL computes its own loss from fused log-probabilities (output.loss unused): one argument,
    compute_loss_func=moeify.integrations.trl.sft_loss(model), puts the router losses in."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from moeify.integrations.trl import sft_loss

    tokenizer = tiny_tokenizer()
    model, start = routers_only(True)
    dataset = Dataset.from_dict({"text": [text(length, seed) for seed, length in enumerate(LENGTHS)]})
    args = SFTConfig(**training_arguments(tmp_path), max_length=16, packing=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, compute_loss_func=sft_loss(model)
    )
    trainer.train()
    grad_norms = [float(entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == 2 and min(grad_norms) > 1e-4
    assert sorted(moved(model, start)) == sorted(start)


def test_trl_without_the_loss_function_is_told(tmp_path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from moeify.surgery import hooks

    hooks._warned_fused = False
    model, _ = routers_only(True)
    dataset = Dataset.from_dict({"text": [text(length, seed) for seed, length in enumerate(LENGTHS)]})
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=16,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer())
    with pytest.warns(UserWarning, match=r"compute_loss_func=moeify.integrations.trl.sft_loss\(model\)"):
        trainer.train()
