"""`TokenExchange`: moves routed tokens to the ranks that hold their experts and the results back.

With expert parallelism each of the `ep` ranks of a 1-D mesh keeps `e = E / ep` consecutive
experts of every MoE layer (rank r: experts r*e ... r*e + e - 1). A layer routes its own tokens
(every rank has the whole router), sorts the T*K assignments by expert (moeify.layers.dispatch),
and then, as torchtitan's `ExpertParallel` and Megatron's all-to-all dispatcher do:

  1. counts: one `all_to_all_single` of the int64 per-expert counts (even splits: e per rank), so
     each rank learns how many assignments every rank sends to each of its experts;
  2. one host read of the split sizes (uneven all-to-all needs them as Python ints, the one sync);
  3. tokens: `all_to_all_single` with those uneven splits, autograd-aware (torch's functional
     collective `all_to_all_single_autograd`: its backward is the reverse exchange);
  4. the received rows arrive grouped by source rank, then by local expert: a stable sort puts
     them by local expert, the grouped product runs, the inverse permutation restores the order;
  5. results: the reverse `all_to_all_single`, back in the sender's sorted order.

Everything works with uneven routing, an expert that receives nothing, and a rank with no tokens
(it sends and receives empty splits, and still serves its experts to the others). Every rank of
the mesh must run every MoE forward (the exchange is a collective), as with any collective.

Shape legend: A assignments sent (sorted by global expert), B assignments received, D model dim,
E experts, e = E / ep local experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

# run(x_BD, expert_B, counts_e) -> y_BD: the local experts' grouped product over sorted rows.
RunLocal = Callable[[Tensor, Tensor, Tensor], Tensor]


class TokenExchange:
    """The all-to-all dispatch of one MoE layer's packed experts over a 1-D expert mesh."""

    def __init__(self, mesh: DeviceMesh, num_experts: int, batch_group: dist.ProcessGroup | None = None) -> None:
        self.mesh, self.group = mesh, mesh.get_group()
        self.ep_size, self.rank = mesh.size(), mesh.get_local_rank()
        self.num_experts, self.local_experts = num_experts, num_experts // mesh.size()
        # Whose batches make the global batch of the balance loss (moeify.layers.losses): all ranks.
        self.batch_group = batch_group if batch_group is not None else dist.group.WORLD

    def __deepcopy__(self, memo: dict) -> TokenExchange:
        # A copy of the model (an EMA copy) exchanges over the same ranks; process groups do not copy.
        return self

    def __repr__(self) -> str:
        first = self.rank * self.local_experts
        return f"TokenExchange(ep_size={self.ep_size}, experts {first}..{first + self.local_experts - 1} on rank {self.rank})"

    @staticmethod
    def local(tensor: Tensor | None) -> Tensor | None:
        """This rank's slice of a sharded expert tensor ([e, ...]); autograd flows to the DTensor."""
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    @torch.compiler.disable  # collectives with host-read split sizes: eager, a graph break
    def __call__(self, x_AD: Tensor, counts_E: Tensor, run: RunLocal) -> Tensor:
        """y_AD for the assignments x_AD (sorted by global expert, `counts_E` per expert)."""
        ep, e = self.ep_size, self.local_experts
        # 1. received_Re[r, j]: assignments rank r sends to my local expert j.
        received_Re = torch.empty_like(counts_E)
        dist.all_to_all_single(received_Re, counts_E.contiguous(), group=self.group)
        received_Re = received_Re.view(ep, e)
        # 2. The one host read: rows sent to / received from each rank.
        send_R, recv_R = torch.stack([counts_E.view(ep, e).sum(1), received_Re.sum(1)]).tolist()
        # 3. Rows, grouped by source rank then by local expert.
        x_BD = self._exchange(x_AD, send=send_R, recv=recv_R)
        # 4. By local expert (stable: rows of one expert keep their source-rank order).
        expert_B = torch.repeat_interleave(
            torch.arange(e, device=x_BD.device).repeat(ep), received_Re.reshape(-1).to(x_BD.device)
        )
        order_B = torch.argsort(expert_B, stable=True)
        y_sorted_BD = run(x_BD.index_select(0, order_B), expert_B[order_B], received_Re.sum(0))
        inverse_B = torch.empty_like(order_B).scatter_(0, order_B, torch.arange(order_B.numel(), device=order_B.device))
        # 5. Back to the senders, in their order.
        return self._exchange(y_sorted_BD.index_select(0, inverse_B), send=recv_R, recv=send_R)

    def _exchange(self, rows: Tensor, *, send: list[int], recv: list[int]) -> Tensor:
        # The functional collective with autograd (as torchtitan's ExpertParallel): its backward is
        # the reverse exchange. `torch.distributed.nn.functional.all_to_all_single` is deprecated.
        return all_to_all_single_autograd(rows.contiguous(), recv, send, self.group)
