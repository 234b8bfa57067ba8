"""Tiny versions of every diffusers transformer and UNet class, with forward inputs that run them.

    python benchmarks/zoo/diffusers_zoo.py [--only NAME ...] [--output PATH]

`model_classes()` lists the classes exported by the installed diffusers whose module is under
`diffusers.models.transformers` or `diffusers.models.unets` (`controlnet_classes()`: under
`diffusers.models.controlnets`); `build(name)` shrinks one from its constructor arguments, makes
inputs for it and runs it (twice: it must be deterministic), or raises `ZooSkip` saying why not. Both
halves are generic rules (the `__init__` signature says which size arguments exist, the forward
signature and the built config which inputs to make) plus per-class data in `diffusers_overrides.py`
for what the rules cannot guess. Batch 2, 5 text tokens of width 16, 4-channel 8x8 latents (2 frames
for video), heads of 2 x 8, 1-2 blocks of each kind.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__:
    from . import MAX_PARAMETERS, Built, ZooSkip
    from .diffusers_overrides import CONFIG, INPUTS, LAYOUT, NEEDS, ROPE_AXES, SIZE_NAMES, SKIPS
else:  # run as a script: import the package by its folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zoo import MAX_PARAMETERS, Built, ZooSkip
    from zoo.diffusers_overrides import CONFIG, INPUTS, LAYOUT, NEEDS, ROPE_AXES, SIZE_NAMES, SKIPS

BATCH, TEXT_TOKENS, FRAMES = 2, 5, 2
CHANNELS, SIDE = 4, 8  # latent channels, latent height and width
HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM  # every model width and every conditioning (text, pooled, image) width
UNET_CHANNELS = (8, 16)  # UNets keep their first and last block types at these widths
# Never turned into skip reasons: the zoo's own refusals, and a caller's alarm (coverage.py raises TimeoutError)
PASS_THROUGH = (ZooSkip, TimeoutError)

# The tiny value of each size role; diffusers_overrides.SIZE_NAMES says which argument names play it.
ROLE_VALUES = {
    "layers": 2,
    "blocks": 1,
    "heads": HEADS,
    "head_dim": HEAD_DIM,
    "width": WIDTH,
    "ffn": 2 * WIDTH,
    "channels": CHANNELS,
    "side": SIDE,
    "groups": 4,
    "condition_encoder": 8,
}
TINY = {name: ROLE_VALUES[role] for role, names in SIZE_NAMES.items() for name in names.split()}


def _tiny_value(name: str, default: Any, blocks: int) -> Any:
    """The tiny value of one constructor argument, or `default` when the rules have none."""
    if name in ROPE_AXES and isinstance(default, (tuple, list)):
        share = HEAD_DIM // len(default) // 2 * 2
        axes = [share] * (len(default) - 1) + [HEAD_DIM - share * (len(default) - 1)]
        return type(default)(axes)
    # None and flags select variants (out_channels=None: same as in_channels; cross_attention_dim=None: no
    # cross-attention), kept as they are; but a None in_channels only means "required".
    if name not in TINY or isinstance(default, bool) or (default is None and name != "in_channels"):
        return default
    if isinstance(default, (tuple, list)):
        return type(default)([TINY[name]] * blocks)
    return TINY[name]


def _unet_blocks(params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """A UNet keeps its first and last down (and up) block types: two resolutions, UNET_CHANNELS wide."""
    config: dict[str, Any] = {"block_out_channels": UNET_CHANNELS}
    for key in ("down_block_types", "up_block_types"):  # controlnets have the down half only
        if key in params:
            types = params[key].default
            config[key] = (types[0], types[-1])
    # Most UNets name the head *count* attention_head_dim (a legacy misnomer) and refuse num_attention_heads.
    if "attention_head_dim" in params:
        config["attention_head_dim"] = HEADS
        if "num_attention_heads" in params:
            config["num_attention_heads"] = None
    return config


def tiny_config(cls: type) -> dict[str, Any]:
    """Constructor arguments that make `cls` tiny: the generic rules, then CONFIG[cls.__name__]."""
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self")
    is_unet = "down_block_types" in params and "block_out_channels" in params
    blocks = len(UNET_CHANNELS) if is_unet else 1
    config = {}
    for name, param in params.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is param.empty:
            continue
        value = _tiny_value(name, param.default, blocks)
        if value != param.default:
            config[name] = value
    if is_unet:
        config.update(_unet_blocks(params))
    config.update(CONFIG.get(cls.__name__, {}))
    return config


def _check_size(model: nn.Module) -> None:
    """Refuse a model that was not shrunk, or shrunk so far that a layer rounded down to nothing."""
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ZooSkip(f"{count:,} parameters at tiny size (limit {MAX_PARAMETERS:,})")
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:
        raise ZooSkip(f"a layer is 0 wide at tiny size: {empty}")


@contextmanager
def _uninitialised_as_nan() -> Iterator[None]:
    """Under deterministic algorithms torch.empty fills with NaN, which shows weights a constructor
    leaves uninitialised (garbage memory otherwise: neither seeded nor finite)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _redraw_dead_weights(model: nn.Module) -> None:
    """Redraw (from the current seeded RNG) the weights left uninitialised, and the zero-initialised ones
    (output projections, adaLN-Zero gates, zero convs), which would hide the layers behind them, FFNs
    included, from the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and (parameter.isnan().any() or not parameter.any()):
                parameter.normal_(std=0.02)


def _instantiate(cls: type, config: dict[str, Any], seed: int) -> nn.Module:
    """`cls(**config)` in fp32 eval mode with weights drawn from `seed`, the caller's RNG untouched;
    refused (ZooSkip) above MAX_PARAMETERS, before allocating anything where the meta device allows."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                meta = cls(**config)
        except PASS_THROUGH:
            raise
        except Exception:  # some constructors compute on real tensors: the count after the real build decides
            meta = None
        if meta is not None:
            _check_size(meta)
        torch.manual_seed(seed)
        with _uninitialised_as_nan():
            model = cls(**config)
        _check_size(model)
        _redraw_dead_weights(model)
    return model.float().eval()


@dataclass
class Ctx:
    """What the input rules (and INPUTS overrides) see: the built model and its config, and seeded tensors."""

    model: nn.Module
    config: dict[str, Any]
    layout: str
    seed: int
    frames: int = FRAMES
    side: int = SIDE  # latent height and width
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + 1)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def batched(self, *shape: int) -> torch.Tensor:
        """A seeded random batch: [BATCH, *shape]."""
        return self.randn(BATCH, *shape)

    def text(self, tokens: int = TEXT_TOKENS) -> torch.Tensor:
        """Prompt embeddings: [BATCH, tokens, WIDTH]."""
        return self.randn(BATCH, tokens, WIDTH)

    def steps(self) -> torch.Tensor:
        """Diffusion timesteps on the 0-1000 scale; overrides divide by 1000 for models that take 0-1."""
        return torch.tensor([300.0, 700.0])

    def mask(self) -> torch.Tensor:
        """A prompt mask without padding."""
        return torch.ones(BATCH, TEXT_TOKENS, dtype=torch.bool)

    @property
    def channels(self) -> int:
        return self.config.get("in_channels") or CHANNELS

    def latents(self, channels: int | None = None) -> torch.Tensor:
        """Noisy latents in the model's layout: image [B, C, H, W], video [B, C, F, H, W], frames
        [B, F, C, H, W], video_last [B, F, H, W, C], tokens (packed 2x2 patches) [B, H/2 * W/2, C] or
        sequence [B, C, 2H]."""
        c, f, s = channels or self.channels, self.frames, self.side
        shape = {
            "image": (BATCH, c, s, s),
            "video": (BATCH, c, f, s, s),
            "frames": (BATCH, f, c, s, s),
            "video_last": (BATCH, f, s, s, c),
            "tokens": (BATCH, s * s // 4, c),
            "sequence": (BATCH, c, 2 * s),
        }[self.layout]
        return self.randn(*shape)

    def control(self) -> torch.Tensor:
        """A controlnet's condition: an image that its conditioning encoder brings down to the latents'
        size (UNet controlnets, which say `conditioning_channels`), or control latents like the noisy ones."""
        prefix = "ctrl_" if "ctrl_conditioning_channels" in self.config else ""  # ControlNet-XS
        channels = self.config.get(f"{prefix}conditioning_channels")
        encoder = self.config.get(f"{prefix}conditioning_embedding_out_channels")
        if channels is None or encoder is None:
            return self.latents()
        side = self.side * 2 ** (len(encoder) - 1)
        frames = (self.frames,) if self.layout == "video" else ()
        return self.randn(BATCH, channels, *frames, side, side)

    def position_ids(self, axes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux-style rotary ids of the packed image tokens (a (s/2)^2 grid, axis 0 = 0) and the text tokens."""
        side = self.side // 2
        h, w = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        grid = [torch.zeros(side * side)] * (axes - 2) + [h.flatten(), w.flatten()]
        return torch.stack(grid, dim=-1).float(), torch.zeros(TEXT_TOKENS, axes)

    def generic_inputs(self) -> dict[str, Any]:
        """Inputs for the forward arguments the rules know by name: latents, prompt, timesteps, pooled
        prompt, a required prompt mask, a controlnet condition, Flux-style position ids, guidance."""
        params = inspect.signature(self.model.forward).parameters
        makers = {
            "hidden_states": self.latents,
            "sample": self.latents,
            "encoder_hidden_states": self.text,
            "timestep": self.steps,
            "timesteps": self.steps,
            "pooled_projections": lambda: self.randn(BATCH, self.config.get("pooled_projection_dim") or WIDTH),
        }
        inputs = {name: make() for name, make in makers.items() if name in params}
        mask = params.get("encoder_attention_mask")
        if mask is not None and mask.default is mask.empty:  # an optional mask keeps its default: no padding
            inputs["encoder_attention_mask"] = self.mask()
        if "controlnet_cond" in params:
            inputs["controlnet_cond"] = self.control()
        if "img_ids" in params and "txt_ids" in params:  # Flux-style: as many id columns as rotary axes
            axes = next((v for k, v in self.config.items() if k in ROPE_AXES), (0, 0, 0))
            inputs["img_ids"], inputs["txt_ids"] = self.position_ids(len(axes))
        if self.config.get("guidance_embeds") and "guidance" in params:
            inputs["guidance"] = torch.full((BATCH,), 3.5)
        return inputs


def default_layout(cls: type) -> str:
    """The latent layout a class most likely takes, from its name and forward arguments."""
    name = cls.__name__
    if "img_ids" in inspect.signature(cls.forward).parameters:
        return "tokens"
    if "1D" in name or "Audio" in name:  # before "3D": StableAudio3DiT is an audio model
        return "sequence"
    if "3D" in name or "Video" in name:
        return "video"
    return "image"


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a forward's output (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):  # diffusers' BaseOutput is an OrderedDict
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def _skip(stage: str, error: Exception) -> ZooSkip:
    """The skip reason for an error while building or running a model."""
    if isinstance(error, ImportError):  # an optional dependency, imported on first use
        return ZooSkip(f"needs {error.name or _first_line(error)}")
    return ZooSkip(f"does not {stage} at tiny size: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _forward(model: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    try:
        with torch.no_grad():
            return list(_tensors(model(**inputs)))
    except PASS_THROUGH:
        raise
    except Exception as error:
        raise _skip("run", error) from error


def _run(model: nn.Module, inputs: dict[str, Any]) -> str:
    """Run the forward twice; raise ZooSkip unless it returns the same finite tensors. Returns notes."""
    outputs = _forward(model, inputs)
    if not outputs:
        raise ZooSkip("forward returns no tensor")
    if not all(torch.isfinite(t).all() for t in outputs if t.is_floating_point()):
        raise ZooSkip("forward returns non-finite values at tiny size")
    # a sweep compares two forwards: one that changes by itself (noise drawn inside, inputs edited in
    # place) would fail it for no fault of the conversion
    if not all(torch.equal(a, b) for a, b in zip(outputs, _forward(model, inputs))):
        raise ZooSkip("forward is not deterministic at tiny size")
    return "output is all zeros" if not any(t.any() for t in outputs) else ""


def _build(name: str, seed: int) -> Built:
    import diffusers

    if name in NEEDS:
        raise ZooSkip(f"needs {NEEDS[name]}")
    if name in SKIPS:
        raise ZooSkip(SKIPS[name])
    cls = getattr(diffusers, name)
    try:
        model = _instantiate(cls, tiny_config(cls), seed)
    except PASS_THROUGH:
        raise
    except Exception as error:
        raise _skip("build", error) from error
    ctx = Ctx(model=model, config=dict(model.config), layout=LAYOUT.get(name) or default_layout(cls), seed=seed)
    inputs = ctx.generic_inputs()
    inputs.update(INPUTS[name](ctx) if name in INPUTS else {})
    notes = _run(model, inputs)
    return Built(name=name, model=model, inputs=inputs, notes=notes)


def build(class_name: str, seed: int = 0) -> Built:
    """`class_name` built tiny (weights from `seed`, fp32, eval) with inputs it ran on; ZooSkip otherwise."""
    try:
        return _build(class_name, seed)
    except PASS_THROUGH:
        raise
    except Exception as error:  # a bug in the rules or the overrides: still a reason, not a crash
        raise ZooSkip(f"zoo error: {type(error).__name__}: {_first_line(error)}") from error


def _exported(prefix: str) -> list[str]:
    """Model classes that the top level of diffusers exports and that are defined under `prefix`."""
    import diffusers
    import diffusers.models

    exported = set(dir(diffusers))  # the lazy module lists names without importing them
    names = []
    for name in dir(diffusers.models):  # resolves models only, never the pipelines
        obj = getattr(diffusers.models, name) if name in exported and name[0].isupper() else None
        if isinstance(obj, type) and issubclass(obj, diffusers.ModelMixin) and obj.__module__.startswith(prefix):
            names.append(name)
    return sorted(names)


def model_classes() -> list[str]:
    """The transformer and UNet classes of the installed diffusers, sorted."""
    return sorted(_exported("diffusers.models.transformers.") + _exported("diffusers.models.unets."))


def controlnet_classes() -> list[str]:
    """The controlnet classes of the installed diffusers, sorted."""
    return _exported("diffusers.models.controlnets.")


class _Timeout(BaseException):  # not an Exception: `build` must not turn it into a skip reason
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def sweep(names: list[str], timeout: int) -> list[dict[str, Any]]:
    """Build every class in `names` (each under a `timeout`-second alarm); one JSON row each."""
    signal.signal(signal.SIGALRM, _on_alarm)
    rows = []
    for name in names:
        start = time.perf_counter()
        row: dict[str, Any] = {"class_name": name, "status": "ok", "reason": "", "parameters": None}
        signal.alarm(timeout)
        try:
            built = build(name)
            row["parameters"] = sum(p.numel() for p in built.model.parameters())
            row["reason"] = built.notes
        except ZooSkip as skip:
            row.update(status="skip", reason=str(skip))
        except _Timeout:
            row.update(status="skip", reason=f"timed out after {timeout} s")
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{name:45s} {row['status']:4s} {row['seconds']:6.2f}s {row['parameters'] or '':>9} {row['reason']}")
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    ok = sum(row["status"] == "ok" for row in rows)
    reasons: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["status"] == "skip":
            reasons[row["reason"].split(":")[0]].append(row["class_name"])
    lines = [f"{ok}/{len(rows)} built and ran, in {sum(row['seconds'] for row in rows):.0f} s"]
    for reason, names in sorted(reasons.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {len(names):3d} {reason}: {', '.join(names)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these classes only")
    parser.add_argument("--controlnets", action="store_true", help="sweep the controlnet classes instead")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per class (default 120)")
    parser.add_argument("--output", type=Path, default=Path("/tmp/diffusers_zoo.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # deprecations and "flex attention without compile" from tiny models
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    names = args.only or (controlnet_classes() if args.controlnets else model_classes())
    import diffusers

    unknown = [name for name in names if not hasattr(diffusers, name)]  # also imports them: not timed below
    if unknown:
        parser.error(f"not in diffusers {diffusers.__version__}: {', '.join(unknown)}")
    rows = sweep(names, args.timeout)
    print(summarize(rows))
    args.output.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
