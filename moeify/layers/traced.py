"""`TracedActivation`: an FFN's activation read off a recorded forward and replayed.

Many FFNs apply their activation as functions in their own `forward` (`F.silu(gate) * up`,
`0.5 * x * (1 + torch.tanh(...))`, `ACT2FN[...]` called inline) rather than holding an activation
module. moeify's packed experts need the activation as a module applied to the intermediate
`[A, I]` rows; this module is that: the recorded torch functions (and any leaf modules they
called), in order, with the input in place of the recorded tensor. Only functions that act
element by element or on the last dimension are ever recorded here (moeify.surgery.dataflow),
so the replay is valid for any number of leading dimensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class Slot:
    """A value of the replay: output `pos` of step `step` (step 0 is the input)."""

    step: int
    pos: int | None = None  # None: the step returned one tensor


@dataclass(frozen=True)
class Const:
    """A constant tensor the recorded code made (`torch.tensor(1.702)`): a non-persistent buffer of
    the replay, so it follows the module to its device and is never in a checkpoint."""

    name: str


@dataclass(frozen=True)
class Training:
    """The `training` argument of a recorded dropout: the replay's own train/eval flag (recorded in
    eval mode, it must still drop in training)."""


@dataclass(frozen=True)
class Step:
    fn: Callable | str  # a torch function, or the key of a module in `TracedActivation.fns`
    args: tuple
    kwargs: dict


def _describe(value: Any) -> str:
    if isinstance(value, Training):
        return "self.training"
    if isinstance(value, Const):
        return value.name
    if isinstance(value, Slot):
        return "x" if value.step == 0 else f"v{value.step}" + ("" if value.pos is None else f"[{value.pos}]")
    return repr(value)


class TracedActivation(nn.Module):
    def __init__(
        self,
        steps: list[Step],
        result: Slot,
        modules: dict[str, nn.Module] | None = None,
        constants: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.steps, self.result = list(steps), result
        self.fns = nn.ModuleDict(modules or {})
        for name, value in (constants or {}).items():
            self.register_buffer(name, value, persistent=False)

    @property
    def inplace(self) -> bool:
        """Whether a recorded step writes into a tensor (`relu_`, `mul_`): the expert loop, which
        recomputes the activation from its input in backward, then stands aside."""
        names = [getattr(s.fn, "__name__", "") for s in self.steps if not isinstance(s.fn, str)]
        modules = [getattr(m, "inplace", False) for m in self.fns.values()]
        return any(n.endswith("_") and not n.endswith("__") or n.startswith("__i") for n in names) or any(modules)

    def forward(self, x: Tensor) -> Tensor:
        values: list[Any] = [x]

        def resolve(value: Any) -> Any:
            if isinstance(value, Training):
                return self.training
            if isinstance(value, Const):
                return getattr(self, value.name)
            if not isinstance(value, Slot):
                return value
            found = values[value.step]
            return found if value.pos is None else found[value.pos]

        for step in self.steps:
            fn = self.fns[step.fn] if isinstance(step.fn, str) else step.fn
            values.append(fn(*tree_map(resolve, step.args), **tree_map(resolve, step.kwargs)))
        return resolve(self.result)

    def extra_repr(self) -> str:
        lines = []
        for index, step in enumerate(self.steps, start=1):
            name = step.fn if isinstance(step.fn, str) else getattr(step.fn, "__name__", repr(step.fn))
            args = [_describe(a) for a in step.args] + [f"{k}={_describe(v)}" for k, v in step.kwargs.items()]
            lines.append(f"v{index} = {name}({', '.join(args)})")
        return "\n".join(lines + [f"return {_describe(self.result)}"])
