"""`apply_expert_parallel`: place each MoE layer's experts on the ranks of a 1-D mesh.

    mesh = init_device_mesh("cuda", (world_size,))     # every rank; "cpu" with gloo
    moeify.distributed.apply_expert_parallel(model, mesh)
    model = moeify.distributed.data_parallel(model)   # DDP on the rest (the experts stay out of it)
    ...
    moeify.distributed.clip_grad_norm_(model.parameters(), 1.0)

The packed expert tensors ([E, ...]: w_in, b_in, w_out, b_out) become DTensors sharded on dim 0,
`Shard(0)`: rank r stores experts r*E/ep ... (r+1)*E/ep - 1, and optimizers, gradient clipping and
`torch.distributed.checkpoint` see their global shape. Routers and shared experts stay replicated.
`moeify.integrations.accelerate.prepare(..., ep_size=N)` does all of this under accelerate.

Gradients: each rank's loss is its own batch's, and data parallelism averages the replicated
parameters' gradients over the ranks. A local expert receives the gradients of every rank's tokens
(the exchange's backward brings them), i.e. the sum over the mesh; a hook divides it by the mesh
size, so every gradient equals one process's on the global batch (tests/test_expert_parallel.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moeify.distributed.exchange import TokenExchange
from moeify.layers.experts import PackedExperts
from moeify.layers.inventory import moe_layers, peft_module_name, require_moe_layers, unwrap
from moeify.layers.moe import MoeLayer


def _check(model: nn.Module, mesh: DeviceMesh) -> list[tuple[str, MoeLayer]]:
    """Every reason to refuse, before anything changes."""
    where = "moeify.distributed.apply_expert_parallel"
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: torch.distributed is not initialised; call dist.init_process_group first")
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        got = f"a {mesh.ndim}-D DeviceMesh" if isinstance(mesh, DeviceMesh) else type(mesh).__name__
        raise ValueError(
            f"{where}: the expert mesh must be a 1-D DeviceMesh, got {got}; "
            'take one dimension of a larger mesh, e.g. mesh["ep"]'
        )
    layers = require_moe_layers(model, where)
    peft = peft_module_name(model)
    if peft is not None:
        raise ValueError(f"{where}: the model holds peft adapters (at {peft or 'the root'}); shard the experts first")
    ep = mesh.size()
    for name, layer in layers:
        experts = layer.experts
        if not isinstance(experts, PackedExperts):
            raise ValueError(
                f"{where}: {name}'s experts are {type(experts).__name__} (an FFN converted through the generic "
                "path); expert parallelism shards packed experts. Register the FFN's layout "
                "(moeify.register_ffn) so that it converts to packed experts"
            )
        if experts.exchange is not None:
            raise ValueError(f"{where}: {name} is already expert-parallel ({experts.exchange!r})")
        if layer.num_experts % ep:
            raise ValueError(
                f"{where}: {name} has {layer.num_experts} experts, not divisible by the mesh size {ep}; "
                f"convert with num_experts a multiple of {ep} or use a mesh whose size divides {layer.num_experts}"
            )
        if any(p.device.type == "meta" for p in experts.parameters()):
            raise ValueError(f"{where}: {name}'s experts are on the meta device; load the weights first")
    return layers


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's packed experts over the 1-D `ep_mesh` and route tokens to them by
    all-to-all (moeify.distributed.exchange); in place, returns `model`. Call it on every rank of the
    mesh with the same converted model; rank 0's expert weights are scattered to the others (as
    `distribute_tensor` does), so all ranks start from one truth. The parameters of the experts are
    new objects: build the optimizer afterwards (accelerate's `prepare` wrapper remaps it)."""
    model = unwrap(model)
    layers = _check(model, ep_mesh)
    ep = ep_mesh.size()
    for _, layer in layers:
        experts = layer.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(param.detach(), ep_mesh, [Shard(0)]), param.requires_grad)
            if sharded.requires_grad:
                # Sum over the mesh's tokens -> mean over its ranks (the module docstring).
                sharded.register_hook(lambda grad, ep=ep: grad / ep)
            setattr(experts, name, sharded)
        experts.exchange = TokenExchange(ep_mesh, layer.num_experts)
    return model


def is_expert_parallel(model: nn.Module) -> bool:
    return any(getattr(layer.experts, "exchange", None) is not None for _, layer in moe_layers(unwrap(model)))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters (what data parallelism over the rest must leave alone)."""
    return [
        p
        for _, layer in moe_layers(unwrap(model))
        if layer.experts.exchange is not None
        for p in layer.experts.parameters()
    ]


def local_expert_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of routed-expert parameters this rank stores, bytes of all of them): what expert
    parallelism divides by the mesh size."""
    local = total = 0
    for _, layer in moe_layers(unwrap(model)):
        for p in layer.experts.parameters():
            stored = p.to_local() if isinstance(p, DTensor) else p
            local += stored.numel() * stored.element_size()
            total += p.numel() * p.element_size()
    return local, total


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model that mixes DTensor parameters (sharded experts,
    FSDP2) with plain ones (replicated under DDP), which torch's own refuses ("got mixed
    torch.Tensor and DTensor"). The total norm is the global one: each DTensor group's norm is
    reduced over its mesh. Returns the total norm (a plain tensor) before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    # By mesh: sharded experts (the expert mesh), FSDP2's shards (its own mesh), plain tensors (None).
    groups: dict[DeviceMesh | None, list[Tensor]] = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for mesh, group in groups.items():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm if mesh is None else norm.full_tensor())
    device = norms[0].device
    norms = [n.to(device) for n in norms]
    total = torch.stack(norms).max() if math.isinf(norm_type) else torch.stack(norms).norm(norm_type)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


__all__ = [
    "apply_expert_parallel",
    "clip_grad_norm_",
    "expert_parameters",
    "is_expert_parallel",
    "local_expert_bytes",
]
