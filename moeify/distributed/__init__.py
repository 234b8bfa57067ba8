"""Scaling past one process: expert parallelism over torch.distributed (DeviceMesh, DTensor
`Shard(0)`, `all_to_all_single`) and sharded checkpoints (`torch.distributed.checkpoint`).

    from torch.distributed.device_mesh import init_device_mesh
    import moeify.distributed as md
    md.apply_expert_parallel(model, init_device_mesh("cuda", (world_size,)))
    model = md.data_parallel(model)          # DDP on the rest; or FSDP2, or accelerate's prepare(ep_size=N)
"""

from moeify.distributed.checkpoint import full_state_dict, load_sharded, save_sharded
from moeify.distributed.data_parallel import data_parallel, keep_experts_local, keep_stats_local
from moeify.distributed.exchange import TokenExchange
from moeify.distributed.expert_parallel import (
    apply_expert_parallel,
    clip_grad_norm_,
    expert_parameters,
    is_expert_parallel,
    local_expert_bytes,
)

__all__ = [
    "TokenExchange",
    "apply_expert_parallel",
    "clip_grad_norm_",
    "data_parallel",
    "expert_parameters",
    "full_state_dict",
    "is_expert_parallel",
    "keep_experts_local",
    "keep_stats_local",
    "load_sharded",
    "local_expert_bytes",
    "save_sharded",
]
