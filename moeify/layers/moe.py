"""`MoeLayer`: router + routed experts + shared experts, installed in place of one dense FFN.

It keeps the FFN's call signature (`forward(hidden_states, *args, **kwargs) -> Tensor` of the
same shape), so the block around it runs unchanged.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from moeify.layers import losses, scoring, stats
from moeify.layers.dispatch import count_per_expert
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.routers.base import Router
from moeify.layers.tokens import ENCODER, TokenMask

Experts = PackedExperts | ModuleExperts

# Forwards with autograd whose router losses were never taken: past this many the oldest are
# dropped (their graphs hold activations), with a warning, since a loop that never takes them leaks.
MAX_COLLECTED = 16
_warned_uncollected = False
# Training forwards of a layer whose bias or schedules move per optimizer step, with no step in
# between: past this many nothing is stepping them (no optimizer hooked), and that is said once.
MAX_UNSTEPPED_FORWARDS = 100
_warned_unstepped = False


# The loss collection of a layer that has collected nothing (also what copies start from).
_NO_LOSSES = {
    "_loss_sum": None,  # weighted router losses summed over the collected forwards
    "_loss_count": None,  # forwards collected, on the device
    "_collected": 0,  # the same on the host, outside torch.compile (for the cap)
    "_loss_taken": False,
    "_loss_consumed": False,  # a backward went through the collected forwards
    "_loss_mode": None,  # (autograd on, training) of the collected forwards
}


def _recomputing() -> bool:
    """Whether this forward is gradient checkpointing's re-run inside backward. Under
    torch.compile the re-run happens inside the compiled backward and never reaches Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class MoeLayer(nn.Module):
    """Token-choice top-k MoE. The top-k weights are renormalised to sum to 1, so while the
    routed experts are identical clones the layer reproduces the dense FFN exactly (Law 3);
    `normalize_topk=False` keeps the raw scores. `granularity` G: each routed expert is a 1/G
    slice of the FFN (moeify.recipes.granularity; recorded for the repr and the parameter counts).
    Scores, choice and weights: moeify.layers.scoring. The routing settings (loss weights,
    temperature, bias rate) are changed live with `moeify.set_routing`."""

    def __init__(
        self,
        *,
        router: Router,
        experts: Experts,
        shared_experts: Experts | None = None,
        top_k: int,
        temperature: float = 1.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        entropy_loss_weight: float = 0.0,
        router_score: str = "softmax",
        balance_bias_rate: float = 0.0,
        calls_per_forward: int = 1,
        normalize_topk: bool = True,
        granularity: int = 1,
    ) -> None:
        super().__init__()
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        # > 1: one layer serving several depths (ALBERT's shared block); its counts add every run.
        self.calls_per_forward = calls_per_forward
        self.num_experts, self.top_k, self.temperature = experts.num_experts, top_k, temperature
        if router_score not in scoring.SCORES:
            raise ValueError(f"router_score must be one of {scoring.SCORES}, got {router_score!r}")
        self.router_score = router_score
        self.normalize_topk, self.granularity = normalize_topk, granularity
        self.loss_weights = {"balance": balance_loss_weight, "z_loss": z_loss_weight, "entropy": entropy_loss_weight}
        # Routing counts build up on the device across forwards and are read (and reset) by the
        # monitors once per optimizer step: no host sync here. int64: bf16 counts miscount above 256.
        # On the experts' device (a model converted on the GPU counts on the GPU); on CPU for a meta
        # model: these buffers are never in a checkpoint, so loading must find them real.
        device = next(experts.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.int64, device=device), persistent=False
        )
        # Further statistics (moeify.layers.stats) only while monitors are attached.
        self.collect_stats = False
        self.register_buffer("stat_sums", torch.zeros(len(stats.STATS), device=device), persistent=False)
        self.register_buffer("stat_prob_sum", torch.zeros(self.num_experts, device=device), persistent=False)
        # Auxiliary-loss-free balancing: expert_bias_E shifts the top-k choice (moeify.layers.scoring)
        # and is saved with the weights; bias_counts_E counts training assignments between two
        # bias updates (moeify.control.bias). Both exist only once a bias rate was set (as torchtitan).
        self.balance_bias_rate = balance_bias_rate
        self.register_buffer("expert_bias", None)
        self.register_buffer("bias_counts", None, persistent=False)
        # Set while a bias rate or a schedule needs optimizer steps (moeify.control), which reset the count.
        self.expects_steps, self.forwards_since_step = balance_bias_rate > 0, 0
        if balance_bias_rate > 0:
            self.enable_bias()
        # The model's padding masks (moeify.layers.tokens), shared by its layers; which one is ours.
        self.token_mask: TokenMask | None = None
        self.mask_source = ENCODER
        # The latest forward's router losses, unweighted and detached (for logging).
        self.last_losses: dict[str, Tensor] = {}
        self.clear_losses()

    def _apply(self, fn, recurse=True):  # torch's own signature
        # The statistics stay fp32 across `.to(torch.bfloat16)` / `.half()`, as the routers do
        # (Fp32Module): bf16 sums lose their tail after a few hundred tokens
        # (test_routers_and_statistics_stay_fp32_in_a_bf16_model).
        # So does the selection bias: its steps are ~1e-3 of scores in [0, 1].
        fp32_buffers = {id(self.stat_sums), id(self.stat_prob_sum), id(self.expert_bias)}

        def keep_stats_fp32(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in fp32_buffers and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_stats_fp32, recurse)

    def extra_repr(self) -> str:
        shared = self.shared_experts.num_experts if self.shared_experts is not None else 0
        runs = f", calls_per_forward={self.calls_per_forward}" if self.calls_per_forward > 1 else ""
        score = f", router_score={self.router_score}" if self.router_score != "softmax" else ""
        bias = f", balance_bias_rate={self.balance_bias_rate}" if self.expert_bias is not None else ""
        recipe = (f", granularity={self.granularity}" if self.granularity > 1 else "") + (
            "" if self.normalize_topk else ", normalize_topk=False"
        )
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, shared={shared}, "
            f"temperature={self.temperature}{score}{bias}{recipe}{runs}"
        )

    def enable_bias(self) -> None:
        """Give the layer its (zero) selection bias and the counts that move it; kept once made."""
        if self.expert_bias is not None:
            return
        device = self.tokens_per_expert.device
        self.expert_bias = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        self.bias_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=device)

    def route(
        self, x_TD: Tensor, batch_shape: torch.Size, *, with_top: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """fp32 routing: logits_TE, probs_TE (rows sum to 1), the top-(k+1) probabilities (None
        unless `with_top`; the (k+1)-th gives the top-k boundary margin), expert_idx_TK and weights_TK."""
        logits_TE = self.router(x_TD, batch_shape)
        scores_TE, probs_TE = scoring.scores(logits_TE, self.temperature, self.router_score)
        expert_idx_TK, weights_TK, top_probs_TK1 = scoring.choose(
            scores_TE, probs_TE, self.top_k, self.expert_bias, with_top=with_top, normalize=self.normalize_topk
        )
        return logits_TE, probs_TE, top_probs_TK1, expert_idx_TK, weights_TK

    def infers(self) -> bool:
        """Whether forwards now serve inference only: eval mode, autograd off, no monitor
        attached. Then nothing will read the router losses or the statistics, and the layer
        computes neither (a decode step's routing work halves); the routing counts still add up."""
        return not (self.training or self.collect_stats or torch.is_grad_enabled())

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:  # FFN signature
        batch_shape = hidden_states.shape[:-1]
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE, probs_TE, top_probs_TK1, expert_idx_TK, weights_TK = self.route(
            x_TD, batch_shape, with_top=self.collect_stats
        )
        routed_TD, tokens_per_expert_E = self.experts(x_TD, expert_idx_TK, weights_TK)
        shared_TD = self.shared_experts(x_TD).to(routed_TD.dtype) if self.shared_experts is not None else None
        y_TD = routed_TD if shared_TD is None else routed_TD + shared_TD
        keep_T = self._keep_T(batch_shape, x_TD.device)
        if keep_T is not None:  # the experts counted every token; the statistics count real ones
            kept_A = keep_T.to(torch.int64).repeat_interleave(self.top_k)  # [T*K], token-major as expert_idx_TK
            tokens_per_expert_E = count_per_expert(expert_idx_TK.reshape(-1), self.num_experts, kept_A)
        if self.infers():  # a forward in another mode: the collection starts again, empty
            self.tokens_per_expert.add_(tokens_per_expert_E)
            if self._loss_sum is not None:
                self.clear_losses()
            return y_TD.reshape(*batch_shape, y_TD.shape[-1])
        entropy_T = losses.entropy(probs_TE)
        layer_losses = {
            "balance": losses.balance_loss(probs_TE, tokens_per_expert_E, self.top_k, keep_T, self._batch_group()),
            "z_loss": losses.z_loss(logits_TE, keep_T),
            "entropy": losses.entropy_bonus(entropy_T, self.num_experts, keep_T),
        }
        # Gradient checkpointing re-runs this forward inside backward. The recompute must save the
        # same tensors (so the losses are computed), but must neither count its tokens again nor
        # add to the losses the current backward is using.
        if not _recomputing():
            self.tokens_per_expert.add_(tokens_per_expert_E)
            if self.bias_counts is not None and self.training:
                self.bias_counts.add_(tokens_per_expert_E)
            if self.expects_steps and self.training and not torch.compiler.is_compiling():
                self._count_unstepped()
            self._collect(layer_losses)
            if probs_TE.requires_grad and not torch.compiler.is_compiling():
                # Backward through this forward (with or without the router losses) ends the
                # collection: a later forward must not add to losses whose graph is freed.
                probs_TE.register_hook(self._backward_reached)
            if self.collect_stats:
                stats.accumulate(
                    self.stat_sums,
                    self.stat_prob_sum,
                    probs_TE,
                    entropy_T,
                    top_probs_TK1,
                    self.top_k,
                    routed_TD,
                    shared_TD,
                    keep_T,
                )
        return y_TD.reshape(*batch_shape, y_TD.shape[-1])

    def _count_unstepped(self) -> None:
        global _warned_unstepped
        self.forwards_since_step += 1
        if self.forwards_since_step > MAX_UNSTEPPED_FORWARDS and not _warned_unstepped:
            _warned_unstepped = True
            warnings.warn(
                f"moeify: this model's expert bias (balance_bias_rate={self.balance_bias_rate}) or routing schedules "
                f"move once per optimizer step, and {MAX_UNSTEPPED_FORWARDS} training forwards ran without a step: "
                "nothing steps them. Hook the optimizer once: moeify.set_routing(model, optimizer=optimizer) "
                "(moeify.integrations.accelerate.prepare and MoeifyCallback do it for you), or call "
                "moeify.set_routing(model).step() after each optimizer step",
                stacklevel=3,
            )

    def _batch_group(self) -> torch.distributed.ProcessGroup | None:
        """The ranks whose batches form one global batch for the balance loss: under expert
        parallelism (moeify.distributed) every rank's; otherwise this process's batch alone."""
        exchange = getattr(self.experts, "exchange", None)
        return None if exchange is None else exchange.batch_group

    def _keep_T(self, batch_shape: torch.Size, device: torch.device) -> Tensor | None:
        if self.token_mask is None:
            return None
        keep_T = self.token_mask.keep_T(self.mask_source, batch_shape)
        return None if keep_T is None else keep_T.to(device)

    def _collect(self, layer_losses: dict[str, Tensor]) -> None:
        """Add this forward's weighted router losses to those collected since `aux_loss` last took
        them. A forward after a take, or in another mode (autograd on/off, train/eval: an evaluation
        pass between two training steps), starts a new collection."""
        global _warned_uncollected
        weighted = sum(self.loss_weights[name] * value for name, value in layer_losses.items())
        self.last_losses = {name: value.detach() for name, value in layer_losses.items()}
        mode = (torch.is_grad_enabled(), self.training)
        # Under torch.compile the forward count lives in a tensor (a Python int attribute that
        # changes every call would recompile every call), and the cap, which needs it on the host,
        # is not applied.
        compiling = torch.compiler.is_compiling()
        overflow = not compiling and mode[0] and self._collected >= MAX_COLLECTED and not self._loss_taken
        # Compiled, the backward hook that ends a collection is not there, so a backward that left the
        # losses out cannot be seen: untaken losses with a graph are replaced, never added to (their
        # graph may be freed). Take aux_loss after each forward that needs it.
        stale = compiling and self._loss_sum is not None and self._loss_sum.requires_grad
        if self._loss_taken or self._loss_consumed or mode != self._loss_mode or overflow or stale:
            if overflow and not _warned_uncollected:
                _warned_uncollected = True
                warnings.warn(
                    f"moeify: {MAX_COLLECTED} forwards with autograd ran and nobody took their router losses; the "
                    "older ones are dropped (their graphs were keeping activations alive). Add "
                    "moeify.aux_loss(model) to the loss each step, or run forwards that need none under "
                    "torch.no_grad()",
                    stacklevel=3,
                )
            self._loss_sum, self._loss_count, self._collected, self.loss_taken_by_output = None, None, 0, False
        self._loss_taken, self._loss_consumed, self._loss_mode = False, False, mode
        if self._loss_sum is None:
            self._loss_sum, self._loss_count = weighted, weighted.detach().new_ones(())
        else:
            self._loss_sum, self._loss_count = self._loss_sum + weighted, self._loss_count + 1
        if not compiling:
            self._collected += 1

    def _backward_reached(self, grad: Tensor) -> None:
        self._loss_consumed = True

    def clear_losses(self) -> None:
        """Forget the collected router losses (a check's forwards are not training's)."""
        self.__dict__.update(_NO_LOSSES)
        self.loss_taken_by_output = False

    def loss_state(self) -> dict:
        """The collected losses and counts, to put back with `restore_loss_state` after forwards
        that must not count (export's logit check)."""
        fields = (*_NO_LOSSES, "loss_taken_by_output", "last_losses")
        return {"tokens_per_expert": self.tokens_per_expert.clone()} | {name: getattr(self, name) for name in fields}

    def restore_loss_state(self, state: dict) -> None:
        self.tokens_per_expert.copy_(state["tokens_per_expert"])
        for name, value in state.items():
            if name != "tokens_per_expert":
                setattr(self, name, value)

    def __getstate__(self) -> dict:
        # copy.deepcopy (EMA models, AveragedModel) and pickle at any point of a step: the
        # collected losses carry the forward's graph, which cannot be copied (and should not be).
        state = super().__getstate__()
        state.update(_NO_LOSSES)
        return state

    def reset_stats(self) -> None:
        """Zero the accumulated routing statistics (the monitor runner does this after each read)."""
        self.tokens_per_expert.zero_()
        self.stat_sums.zero_()
        self.stat_prob_sum.zero_()

    def aux_loss(self) -> Tensor | None:
        """The weighted sum of this layer's router losses, averaged over the forwards collected
        since they were last taken (None before any), and marks them taken: the next forward starts
        a new collection, while calling this again before it returns the same value."""
        if self._loss_sum is None:
            return None
        self._loss_taken = True
        return self._loss_sum / self._loss_count


def total_aux_loss(layers: list[MoeLayer]) -> Tensor | None:
    """Every layer's `aux_loss()` summed (on the first one's device), taking them; None when no
    layer has collected a forward."""
    present = [term for term in (layer.aux_loss() for layer in layers) if term is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term.to(total.device)
    return total


def require_graph(layers: list[MoeLayer], total: Tensor) -> None:
    """Refuse router losses without a graph when autograd is on and the routers are trainable:
    reentrant checkpointing runs the first forward under no_grad, so the losses recorded there
    carry no graph and the routers would silently never train."""
    if not torch.is_grad_enabled() or total.requires_grad:  # (requires_grad: torch.compile traces it)
        return
    if any(p.requires_grad for layer in layers for p in layer.router.parameters()):
        raise RuntimeError(
            "the router losses (moeify.aux_loss) have no gradient: the forward ran under torch.no_grad (e.g. "
            "gradient checkpointing with use_reentrant=True). Use non-reentrant checkpointing: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), "
            "or read aux_loss under torch.no_grad() if you only log it."
        )
