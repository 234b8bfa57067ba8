"""FFN layouts as JSON, for the FFNs a checkpoint cannot rediscover on its own.

A block that cannot run alone (it needs a timestep embedding, rotary embeddings) is traced on the
inputs it receives during one forward of `example_inputs` (moeify.surgery.find). Loading a
checkpoint rebuilds the model without any inputs, so what was found there is written into the
checkpoint's record and read back: plain data (paths, sizes, rates) and the recorded activation
as a list of element-wise functions named from a fixed set (moeify.surgery.program), never code.
"""

from __future__ import annotations

from typing import Any

from moeify.architectures.layouts import FFNLayout
from moeify.surgery.placement import ChannelsFirstReference, ResidualReference
from moeify.surgery.program import NotReplayable, Program, Replay

LAYOUT_VERSION = 1
_PLAIN = ("kind", "proj_in", "proj_out", "proj_gate", "mid_dropout", "out_dropout", "install_at")
_FLAGS = ("gate_first", "split", "channels_first")


def _callable_to_dict(value: Any, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"path": value}
    if isinstance(value, Replay):
        return {"program": value.program.to_dict(), "copy_modules": value.copy_modules}
    if isinstance(value, ResidualReference):
        return {"residual": list(value.residual)}
    if isinstance(value, ChannelsFirstReference):
        return {
            "channels_first": value.positions,
            "inner": _callable_to_dict(value.inner, what),
            "chain": list(value.chain),
        }
    raise NotReplayable(f"the {what} of this layout ({value!r}) cannot be written to a checkpoint")


def _callable_from_dict(data: dict[str, Any] | None) -> Any:
    if data is None:
        return None
    if "path" in data:
        return str(data["path"])
    if "program" in data:
        return Replay(Program.from_dict(data["program"]), bool(data.get("copy_modules", True)))
    if "residual" in data:
        position, name = data["residual"]
        return ResidualReference((int(position), str(name)))
    if "channels_first" in data:
        chain = tuple(str(p) for p in data.get("chain") or ("",))
        return ChannelsFirstReference(int(data["channels_first"]), _callable_from_dict(data.get("inner")), chain)
    raise ValueError(f"unknown callable in a recorded FFN layout: {sorted(data)}")


def layout_to_dict(layout: FFNLayout) -> dict[str, Any]:
    """JSON-ready data for `layout`; raises NotReplayable if it holds something that is not data."""
    data: dict[str, Any] = {"version": LAYOUT_VERSION, **{key: getattr(layout, key) for key in _PLAIN + _FLAGS}}
    data["identities"] = list(layout.identities)
    data["residual"] = list(layout.residual) if layout.residual is not None else None
    data["act"] = _callable_to_dict(layout.act, "activation")
    data["up_act"] = _callable_to_dict(layout.up_act, "up activation")
    data["post_act"] = _callable_to_dict(layout.post_act, "post activation")
    data["reference"] = _callable_to_dict(layout.reference, "reference")
    return data


def layout_from_dict(data: dict[str, Any]) -> FFNLayout:
    if not isinstance(data, dict) or data.get("version") != LAYOUT_VERSION:
        raise ValueError(f"a recorded FFN layout must be a JSON object of version {LAYOUT_VERSION}")
    residual = data.get("residual")
    return FFNLayout(
        **{key: data.get(key) for key in _PLAIN},
        **{key: bool(data.get(key, key == "gate_first")) for key in _FLAGS},
        identities=tuple(data.get("identities") or ()),
        residual=(int(residual[0]), str(residual[1])) if residual else None,
        act=_callable_from_dict(data.get("act")),
        up_act=_callable_from_dict(data.get("up_act")),
        post_act=_callable_from_dict(data.get("post_act")),
        reference=_callable_from_dict(data.get("reference")),
    )
