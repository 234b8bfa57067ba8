"""`HostReads`: records every call that copies a tensor value to the host, for the tests that
check a hot path (a forward, an optimizer step) adds no device-to-host sync."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode


class HostReads(TorchFunctionMode):
    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))
