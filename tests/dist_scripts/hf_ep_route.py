"""transformers' own expert parallelism on checkpoints written by `moeify.export` (launched by
tests/test_scale_routes.py: torchrun --nproc_per_node 2 hf_ep_route.py OUT). OUT holds one
exported checkpoint per format (OUT/<format>) and the token ids (OUT/inputs.pt); each is loaded
with `from_pretrained(..., distributed_config=DistributedConfig(ep_size=2, ...))` in both layouts:

    "fsdp": DistributedConfig(ep_size=2, fsdp_size=2)  each rank its own row of the batch; dense
            weights FSDP2-sharded; tokens reach the experts through all-to-all
    "tp":   DistributedConfig(ep_size=2, tp_size=2)    both ranks the whole batch; dense weights
            tensor-parallel; each rank runs its experts and the outputs are all-reduced

Records, per format and layout, the logits, the experts' local count and shards, and the
experts' gradient after one backward of the LM loss. Writes OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYOUTS = {"fsdp": {"ep_size": 2, "fsdp_size": 2}, "tp": {"ep_size": 2, "tp_size": 2}}


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def run(directory: Path, layout: str, ids_BS: torch.Tensor, rank: int) -> dict:
    config = DistributedConfig(**LAYOUTS[layout])
    model = AutoModelForCausalLM.from_pretrained(directory, distributed_config=config)
    # Under FSDP each rank is a data-parallel replica with its own batch; under TP both share one.
    ids_BS = ids_BS[rank : rank + 1] if layout == "fsdp" else ids_BS
    with torch.no_grad():
        logits_BSV = full(model.eval()(input_ids=ids_BS).logits)
    model.train()
    model(input_ids=ids_BS, labels=ids_BS).loss.backward()
    experts = [layer.mlp.experts for layer in model.model.layers]
    return {
        "logits": logits_BSV,
        "num_experts": [e.num_experts for e in experts],
        "gate_up_proj": [local(e.gate_up_proj) for e in experts],
        "down_proj": [local(e.down_proj) for e in experts],
        "gate_up_proj_grad": [local(e.gate_up_proj.grad) for e in experts],
    }


def main(out: Path) -> None:
    ids_BS = torch.load(out / "inputs.pt")
    rank = int(os.environ["RANK"])
    try:
        record = {fmt: {layout: run(out / fmt, layout, ids_BS, rank) for layout in LAYOUTS} for fmt in FORMATS}
        assert dist.get_world_size() == 2, dist.get_world_size()
        record["backend"] = dist.get_backend()
        torch.save(record, out / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
