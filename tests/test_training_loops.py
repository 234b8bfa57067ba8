"""The loops people run: padded batches, copies of the model at any point of a step (EMA), several
forwards before one backward, gradient accumulation, layers that receive no token."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from core_helpers import HIDDEN, VOCAB, tiny_llama, tokens
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel

import moeify
from moeify import aux_loss, moe_layers
from moeify.layers import moe as moe_module
from moeify.monitors import runner as runner_module

# ------------------------------------------------------------------------------------------- padding

LENGTHS = (8, 5, 3)


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "bert",
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return AutoModel.from_config(config).eval()


BUILDERS = {"llama (causal, right padding)": tiny_llama, "bert (encoder)": tiny_bert}


def _layer_inputs(model: nn.Module) -> tuple[dict[str, list[Tensor]], list]:
    seen: dict[str, list[Tensor]] = {name: [] for name, _ in moe_layers(model)}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().clone()))
        for name, layer in moe_layers(model)
    ]
    return seen, handles


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
def test_padding_is_not_counted_nor_balanced(build) -> None:
    """A batch padded to one length gives the counts and the balance / z / entropy losses of its
    real tokens alone: the same as the sequences run one by one, unpadded."""
    model = moeify.moeify(build(), num_experts=4, top_k=2, router_init_std=0.5).eval()
    ids = tokens(batch=len(LENGTHS), seq=max(LENGTHS))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)

    # Unpadded, one sequence at a time: what each layer saw, and its counts.
    seen, handles = _layer_inputs(model)
    with torch.no_grad():
        for row, length in enumerate(LENGTHS):
            model(input_ids=ids[row : row + 1, :length])
    for handle in handles:
        handle.remove()
    expected_counts = {name: layer.tokens_per_expert.clone() for name, layer in moe_layers(model)}
    for _, layer in moe_layers(model):
        layer.reset_stats()

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    padded = {name: (layer.tokens_per_expert.clone(), dict(layer.last_losses)) for name, layer in moe_layers(model)}
    assert sum(int(c.sum()) for c, _ in padded.values()) == sum(LENGTHS) * 2 * len(padded)
    for name, layer in moe_layers(model):
        counts, losses = padded[name]
        assert torch.equal(counts, expected_counts[name]), name
        # The real tokens alone, as one unmasked batch: the losses a padding-free batch gives.
        model._moeify_tokens.captured = dict.fromkeys(model._moeify_tokens.captured)
        with torch.no_grad():
            layer(torch.cat(seen[name], dim=1))
        for key, value in layer.last_losses.items():
            torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_padding_of_the_decoder_is_read_from_decoder_attention_mask() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "t5",
        d_model=HIDDEN,
        d_ff=64,
        d_kv=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    model = moeify.moeify(AutoModel.from_config(config).eval(), num_experts=4, top_k=1)
    ids = tokens(batch=2, seq=6)
    encoder_mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    decoder_mask = torch.tensor([[1] * 5 + [0], [1] * 6])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=encoder_mask, decoder_input_ids=ids, decoder_attention_mask=decoder_mask)
    counted = {name: int(layer.tokens_per_expert.sum()) for name, layer in moe_layers(model)}
    assert counted == {name: (8 if name.startswith("encoder") else 11) for name in counted}


def test_token_mask_for_models_without_an_attention_mask_argument() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2)
    keep = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    moeify.token_mask(model, keep)
    with torch.no_grad():
        model(input_ids=tokens())
    assert all(int(layer.tokens_per_expert.sum()) == 11 * 2 for _, layer in moe_layers(model))
    moeify.token_mask(model, None)  # back to the captured mask (none here): every token counts
    with torch.no_grad():
        model(input_ids=tokens())
    assert all(int(layer.tokens_per_expert.sum()) == (11 + 16) * 2 for _, layer in moe_layers(model))
    with pytest.raises(TypeError, match="token_mask takes a tensor"):
        moeify.token_mask(model, [[1, 0]])
    with pytest.raises(ValueError, match="converted by moeify"):
        moeify.token_mask(tiny_llama(), keep)


def test_a_decoding_step_with_a_cache_counts_its_tokens() -> None:
    """During generate() the mask covers past + new tokens and the layers see only the new ones:
    laid out differently, so every new token counts."""
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2)
    ids = tokens(batch=2, seq=5)
    mask = torch.ones_like(ids)
    model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert all(int(layer.tokens_per_expert.sum()) == (10 + 2 + 2) * 2 for _, layer in moe_layers(model))


# ------------------------------------------------------------------------------------- edge batches


@pytest.mark.parametrize("shape", [(0, HIDDEN), (2, 0, HIDDEN)], ids=["no tokens", "empty sequences"])
def test_a_layer_without_tokens_gives_finite_losses_with_a_graph(shape) -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2)
    layer = moe_layers(model)[0][1].train()
    out = layer(torch.zeros(shape))
    assert out.shape == shape
    losses = dict(layer.last_losses)
    assert all(torch.isfinite(value) and float(value) == 0.0 for value in losses.values()), losses
    aux = layer.aux_loss()
    assert aux.grad_fn is not None and torch.isfinite(aux)
    aux.backward()
    for name, p in layer.router.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert int(layer.tokens_per_expert.sum()) == 0


def test_a_batch_of_padding_only_gives_finite_losses() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2).train()
    ids = tokens()
    moeify.token_mask(model, torch.zeros_like(ids, dtype=torch.bool))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and float(out.aux_loss.detach()) == 0.0
    out.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    assert all(int(layer.tokens_per_expert.sum()) == 0 for _, layer in moe_layers(model))


# ------------------------------------------------------------------------------------------- copies


def _converted(**overrides) -> nn.Module:
    return moeify.moeify(tiny_llama(), num_experts=4, top_k=2, **overrides).train()


def test_copies_at_every_point_of_a_step() -> None:
    model = _converted(aux_loss_in_output=False)
    ids = tokens()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def copies() -> None:
        clone = copy.deepcopy(model)
        assert moe_layers(clone)[0][1].aux_loss() is None  # a copy starts without the losses' graph
        pickle.loads(pickle.dumps(model))
        assert set(model.state_dict()) == set(clone.state_dict())

    copies()  # before any forward
    loss = model(input_ids=ids).logits.pow(2).mean()
    copies()  # after the forward, losses collected with their graph
    loss = loss + aux_loss(model)
    copies()  # after taking them
    loss.backward()
    copies()  # after backward
    optimizer.step()
    copies()
    # The original still trains on: its next forward collects afresh.
    (model(input_ids=ids).logits.pow(2).mean() + aux_loss(model)).backward()


def test_a_copy_of_a_cross_attention_model_captures_its_own_conditioning() -> None:
    import tiny_diffusers as td

    model, kwargs = td.pixart()
    moeify.moeify(model, num_experts=4, top_k=2, router="cross_attention")
    text = kwargs["encoder_hidden_states"].clone().requires_grad_(True)
    model(**kwargs | {"encoder_hidden_states": text * 2})  # conditioning with a graph
    clone = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**kwargs).sample
        torch.testing.assert_close(clone(**kwargs).sample, expected)


def test_averaged_model_and_diffusers_ema_train_alongside() -> None:
    from diffusers.training_utils import EMAModel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _converted()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema = EMAModel(model.parameters(), decay=0.9)
    start = [p.detach().clone() for p in averaged.parameters()]
    for step in range(3):
        ids = tokens(seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        if step == 1:  # mid-step, the losses' graph still alive: EMA libraries copy here too
            averaged = copy.deepcopy(averaged)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        averaged.update_parameters(model)
        ema.step(model.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(start, averaged.parameters())]
    assert sum(moved) > len(moved) // 2
    target = copy.deepcopy(model)
    ema.copy_to(target.parameters())
    with torch.no_grad():
        assert torch.isfinite(averaged(input_ids=tokens()).logits).all()
        assert torch.isfinite(target(input_ids=tokens()).logits).all()


# -------------------------------------------------------------------------------- several forwards


def _aux_of(model: nn.Module, ids: Tensor) -> Tensor:
    model(input_ids=ids).logits.sum()
    return aux_loss(model)


def test_two_forwards_before_one_backward_both_count() -> None:
    """Classifier-free guidance, DPO's chosen / rejected: aux_loss is the mean over both forwards,
    and its gradient reaches the routers through both."""
    model = _converted(aux_loss_in_output=False)
    a, b = tokens(seed=1), tokens(seed=2)
    single = [_aux_of(copy.deepcopy(model), ids) for ids in (a, b)]
    model(input_ids=a)
    model(input_ids=b)
    both = aux_loss(model)
    torch.testing.assert_close(both, (single[0] + single[1]) / 2)
    torch.testing.assert_close(aux_loss(model), both)  # taken again before a new forward: the same
    both.backward()

    twin = copy.deepcopy(model)
    twin.zero_grad()
    twin(input_ids=a)
    first = aux_loss(twin)
    twin(input_ids=b)  # after a take: a new collection
    second = aux_loss(twin)
    ((first + second) / 2).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_gradient_accumulation_takes_each_micro_batch_once() -> None:
    model = _converted(aux_loss_in_output=False)
    micro = [tokens(seed=s) for s in range(3)]
    expected = [_aux_of(copy.deepcopy(model), ids).detach() for ids in micro]
    for ids, value in zip(micro, expected):
        model(input_ids=ids)
        aux = aux_loss(model)
        torch.testing.assert_close(aux.detach(), value)
        (aux / len(micro)).backward()


def test_a_backward_without_the_losses_ends_their_collection() -> None:
    """A step that leaves the router losses out (a warm-up) must not make the next step's
    aux_loss reach into a freed graph."""
    model = _converted(aux_loss_in_output=False)
    model(input_ids=tokens(seed=1)).logits.pow(2).mean().backward()
    expected = _aux_of(copy.deepcopy(model), tokens(seed=2))
    model(input_ids=tokens(seed=2))
    aux = aux_loss(model)
    torch.testing.assert_close(aux, expected)
    aux.backward()


def test_an_evaluation_pass_between_steps_does_not_leak_in() -> None:
    model = _converted(aux_loss_in_output=False)
    expected = _aux_of(copy.deepcopy(model), tokens(seed=2))
    with torch.no_grad():
        model.eval()(input_ids=tokens(seed=5))
    model.train()(input_ids=tokens(seed=2))
    torch.testing.assert_close(aux_loss(model), expected)


def test_never_taking_the_losses_is_bounded_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_module, "_warned_uncollected", False)
    model = _converted(aux_loss_in_output=False)
    layer = moe_layers(model)[0][1]
    with pytest.warns(UserWarning, match="nobody took their router losses"):
        for _ in range(moe_module.MAX_COLLECTED + 1):
            model(input_ids=tokens())
    assert layer._collected == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # no graph, nothing kept alive: no bound, no warning
            for _ in range(moe_module.MAX_COLLECTED + 1):
                model(input_ids=tokens())
    assert layer._collected == moe_module.MAX_COLLECTED + 1


# ------------------------------------------------------------------------------ loss on the output


def test_output_loss_includes_the_router_losses_in_training_only() -> None:
    model = _converted()
    ids = tokens()
    reference = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, aux_loss_in_output=False).train()
    out, plain = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, plain.loss + aux_loss(reference))
    torch.testing.assert_close(out.aux_loss, aux_loss(reference))
    with pytest.warns(UserWarning, match="counts them twice"):
        aux_loss(model)
    model.eval()
    evaluated = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(evaluated.loss, plain.loss)  # eval: the task loss (perplexity) alone
    assert evaluated.aux_loss is not None
    assert model(input_ids=ids).loss is None  # no labels: nothing added
    with torch.no_grad():  # inference (eval, no autograd, no monitor): the router losses are not computed
        inferred = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(inferred.loss, plain.loss)
    assert getattr(inferred, "aux_loss", None) is None


# -------------------------------------------------------------------------------- exact statistics


def test_counts_are_all_reduced_as_int64(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 holds integers exactly only below 2**24: counts must not travel as floats."""
    model = _converted()
    layer = moe_layers(model)[0][1]
    layer.tokens_per_expert.fill_(2**24 + 1)
    reduced = []

    def all_reduce(tensor: Tensor, op=None) -> None:  # a second rank with the same values
        reduced.append(tensor.dtype)
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stats = runner_module.gather([("layer", layer)])
    assert torch.int64 in reduced
    assert stats[0].tokens_per_expert == (2 * (2**24 + 1),) * layer.num_experts


@pytest.mark.parametrize("router", ["linear", "mlp", "cross_attention"])
def test_no_router_reads_the_host_with_masks(router: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every router kind, with a padding mask and (cross-attention) a conditioning mask in the
    additive-bias format, on the grouped path GPUs take: nothing waits for the device."""
    import tiny_diffusers as td
    from host_reads import HostReads

    from moeify.layers import expert_loop

    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", 1 << 62)
    model, kwargs = td.pixart()
    moeify.moeify(model, num_experts=4, top_k=2, router=router)
    name, layer = moe_layers(model)[0]
    text = kwargs["encoder_hidden_states"]
    bias = torch.zeros(text.shape[:2])
    bias[1, 3:] = -10000.0  # diffusers' additive format: the second prompt has 3 real tokens
    x = torch.randn(text.shape[0], 16, model.config.num_attention_heads * model.config.attention_head_dim)
    with HostReads() as reads:
        if router == "cross_attention":
            conditioning = {"encoder_hidden_states": text, "encoder_attention_mask": bias}
            model._moeify_conditioning.capture(model, (), conditioning)
        model._moeify_tokens.capture(model, (), {"attention_mask": (torch.arange(16) < 12).expand(2, 16).float()})
        layer(x)
    assert reads.calls == [], name
    assert int(layer.tokens_per_expert.sum()) == 2 * 12 * 2


def test_under_trainer_accumulation_router_losses_are_weighted_like_the_task_loss() -> None:
    """Trainer passes num_items_in_batch (the step's labelled tokens): the task loss is then this
    micro-batch's sum over that total, and the router losses get the same share."""
    model = _converted()
    reference = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, aux_loss_in_output=False).train()
    ids = tokens()
    labels = ids.masked_fill(torch.arange(ids.shape[1]) >= 6, -100)  # 2 x 6 labelled tokens
    total = torch.tensor(48)  # as if three more such micro-batches followed
    out = model(input_ids=ids, labels=labels, num_items_in_batch=total)
    plain = reference(input_ids=ids, labels=labels, num_items_in_batch=total)
    torch.testing.assert_close(out.loss, plain.loss + aux_loss(reference) * 12 / 48)
