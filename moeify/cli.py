"""The `moeify` command.

    moeify inspect PATH [recipe options] [--json]   the dry run: sites, layouts, sizes, skipped
                                                     sites with reasons, parameter counts after
    moeify convert PATH OUT [recipe options]         load, convert (each layer checked), save
    moeify export SRC OUT --format FORMAT            a moeify checkpoint as a native transformers MoE
    moeify card RUN_DIR --model SAVED_DIR [-o FILE]   a Hub model card from a monitor run + a checkpoint
    moeify push SAVED_DIR REPO_ID [--run RUN_DIR]     upload a checkpoint (+ card, diagnostics) in one commit

PATH is a local transformers or diffusers model directory (told apart by its config.json:
transformers writes `model_type`, diffusers `_class_name`) or, for inspect, a moeify checkpoint.
Recipe options: --experts N --top-k K --shared N --router KIND --layers 0,1,... --seed S.
convert and export carry the tokenizer, chat template and processor files found beside the
source (moeify.hub.companions), so OUT works with AutoTokenizer and transformers.pipeline.
Errors are one line on stderr; the exit code is 2 for bad usage, 1 for anything else that failed
(MOEIFY_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from moeify.config import MoeifyConfig
from moeify.hub.formats import export_format_names
from moeify.hub.local import detect, load_dense
from moeify.layers.inventory import human, parameter_counts
from moeify.layers.routers import router_kinds


class CliError(Exception):
    """A failure the user can act on: printed as one line."""


class UsageError(CliError):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage; one line instead
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"--layers takes block indices like 0,1,5, got {text!r}")
    return layers


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    defaults = MoeifyConfig()
    group = parser.add_argument_group("recipe")
    group.add_argument("--experts", type=int, default=defaults.num_experts, help="routed experts per FFN")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token")
    group.add_argument("--shared", type=int, default=defaults.num_shared_experts, help="shared experts per FFN")
    group.add_argument("--router", choices=router_kinds(), default=defaults.router)  # registered kinds too
    group.add_argument(
        "--layers", type=_layers, default=None, help="block indices to convert, e.g. 0,1,5 (default: all)"
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed of the routers and shared experts")


def _recipe(args: argparse.Namespace) -> MoeifyConfig:
    try:
        return MoeifyConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            num_shared_experts=args.shared,
            router=args.router,
            layers=args.layers,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# Reporting


def _site_lines(report) -> list[str]:  # an FFNReport
    lines = [f"{len(report.sites)} FFN site(s) to convert, {len(report.skipped)} skipped"]
    for s in report.sites:
        kind = s.layout.kind if s.layout is not None else "generic"
        sizes = (
            f"{s.in_features}->{s.intermediate_size}->{s.out_features}" if s.in_features else "sizes read at conversion"
        )
        where = f", MoE at {s.install_path}" if s.install_path != s.name else ""
        lines.append(f"  + {s.name} [{s.class_name}] {kind} ({s.source}) {sizes}{where}")
    lines += [f"  - {s.name} [{s.class_name}]: {s.reason}" for s in report.skipped]
    return lines


def _describe(config: MoeifyConfig) -> str:
    layers = "all layers" if config.layers is None else f"layers {','.join(map(str, config.layers))}"
    departs = ""  # recipes whose experts are not clones of the dense FFN (moeify.recipes)
    if config.experts_from is not None:
        departs += f", experts from {', '.join(config.experts_from)} (rest: {config.experts_from_rest})"
    if config.reinit_fraction:
        departs += f", {config.reinit_fraction:g} of each expert's neurons re-initialised"
    return (
        f"{config.num_experts} experts, top-{config.top_k}, {config.num_shared_experts} shared, "
        f"{config.router} router, {layers}, seed {config.seed}{departs}"
    )


# ---------------------------------------------------------------------------------------------
# Commands


def _inspect_moeify(path: Path) -> tuple[nn.Module, list[MoeifyConfig], int | None]:
    from moeify.hub.load import build_base, read_record, reapply

    record = read_record(path)
    model = build_base(path, record, None)
    return model, reapply(model, record), None


def cmd_inspect(args: argparse.Namespace) -> int:
    from moeify.convert import moeify
    from moeify.surgery import ConversionError

    path = Path(args.path)
    config = _recipe(args)
    library, class_name = detect(path)
    if library == "moeify":
        model, recipes, dense = _inspect_moeify(path)
        header = f"{path}: moeify checkpoint of {type(model).__name__}, {len(recipes)} conversion(s)"
    else:
        model = load_dense(path, library, class_name, empty=True)
        dense = parameter_counts(model)["total"]
        try:
            moeify(model, config.replace(verify=False))  # on the meta device: sizes only
        except ConversionError as error:
            raise CliError(str(error)) from None
        recipes = [config]
        header = f"{path}: {library} {type(model).__name__}"
    counts = parameter_counts(model)
    total, active = counts["total"], counts["active_per_token"]
    report = model.moeify_state.report
    if args.json:
        data = {
            "path": str(path),
            "library": library,
            "class_name": type(model).__name__,
            "recipes": [r.to_dict() for r in recipes],
            **report.as_dict(),
            "parameters": {"dense": dense, "total": total, "active_per_token": active},
        }
        print(json.dumps(data, indent=2))
        return 0
    print(header)
    print("recipe: " + "; then ".join(_describe(r) for r in recipes))
    print("\n".join(_site_lines(report)))
    before = f"dense {human(dense)} -> " if dense is not None else ""
    print(f"parameters: {before}{human(total)} total, {human(active)} active per token (embeddings included)")
    return 0


def _step(message: str) -> float:
    print(message, flush=True)
    return time.perf_counter()


def _companions_line(model: nn.Module, out: Path) -> str:
    """Which tokenizer / processor files went into `out`, and from where."""
    from moeify.hub.companions import companion_files, source_directory

    carried, source = companion_files(out), source_directory(model)
    if source is not None:
        return f"carried {len(carried)} tokenizer / processor file(s) from {source}: {', '.join(carried)}"
    if carried:
        return f"kept the {len(carried)} tokenizer / processor file(s) already in {out}: {', '.join(carried)}"
    return "no tokenizer or processor files beside the source model: none carried"


def cmd_convert(args: argparse.Namespace) -> int:
    from moeify.convert import moeify
    from moeify.hub.save import save_pretrained

    path, out = Path(args.path), Path(args.out)
    config = _recipe(args)
    library, class_name = detect(path)
    if library == "moeify":
        raise CliError(f"{path} is already a moeify checkpoint; convert the dense model it came from")
    if out.resolve() == path.resolve():
        raise CliError("OUT must differ from PATH: the dense checkpoint is kept")
    started = _step(f"loading {path} ({library} {class_name or 'AutoModel'}) ...")
    model = load_dense(path, library, class_name, empty=False)
    dense = parameter_counts(model)["total"]
    step = _step(
        f"loaded {human(dense)} parameters in {time.perf_counter() - started:.1f}s; converting: {_describe(config)} ..."
    )
    moeify(model, config)
    report = model.moeify_state.report
    counts = parameter_counts(model)
    total, active = counts["total"], counts["active_per_token"]
    step = _step(
        f"converted {len(report.sites)} FFN site(s) ({len(report.skipped)} skipped), each checked against its dense "
        f"FFN, in {time.perf_counter() - step:.1f}s: {human(total)} parameters, {human(active)} active per token; "
        f"saving to {out} ..."
    )
    save_pretrained(model, out, max_shard_size=args.max_shard_size)
    print(f"saved in {time.perf_counter() - step:.1f}s; load it with moeify.from_pretrained({str(out)!r})")
    print(_companions_line(model, out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moeify.hub.load import from_pretrained

    started = _step(f"loading {args.src} ...")
    model = from_pretrained(args.src)
    step = _step(f"loaded in {time.perf_counter() - started:.1f}s; exporting as {args.format} to {args.out} ...")
    from moeify.hub.export import export  # lazily: the export module is optional to the rest of the CLI

    options = {"overwrite": True} if args.overwrite else {}
    export(model, args.out, format=args.format, **options)
    print(
        f"exported in {time.perf_counter() - step:.1f}s; it loads with transformers.AutoModelForCausalLM.from_pretrained"
    )
    print(_companions_line(model, Path(args.out)))
    return 0


def _moeify_checkpoint(path: Path, hint: str) -> Path:
    if detect(path)[0] != "moeify":
        raise CliError(f"{path} is not a moeify checkpoint (no moeify_config.json): {hint}")
    return path


def cmd_card(args: argparse.Namespace) -> int:
    from moeify.hub.card import model_card
    from moeify.hub.push import write_card
    from moeify.sinks.jsonl import read_run

    run = read_run(args.run_dir)
    path = _moeify_checkpoint(Path(args.model), "give the directory moeify.save_pretrained wrote")
    model, _, _ = _inspect_moeify(path)  # on the meta device: the card needs shapes, not weights
    options = {"base_model": args.base_model, "repo_id": args.repo_id}
    if args.output is None:
        print(model_card(model, run=run, **options))
        print("(plots not written: pass -o FILE to write them into diagnostics/ beside it)", file=sys.stderr)
        return 0
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists: pass --overwrite to replace it")
    plots = write_card(model, args.run_dir, out, **options)
    print(f"wrote {out}, and the run files and {len(plots)} plot(s) it links to in {out.parent / 'diagnostics'}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from moeify.hub.load import from_pretrained
    from moeify.hub.push import PushError, push_to_hub

    path = _moeify_checkpoint(Path(args.saved_dir), "convert a model with `moeify convert` first")
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        raise CliError(f"--run {args.run_dir}: no such run directory")
    started = _step(f"loading {path} ...")
    model = from_pretrained(path)
    _step(f"loaded in {time.perf_counter() - started:.1f}s; pushing to {args.repo_id} ...")
    options = {"private": args.private, "commit_message": args.message, "base_model": args.base_model}
    try:
        info = push_to_hub(model, args.repo_id, monitors=args.run_dir, **options)
    except PushError as error:
        raise CliError(str(error)) from None
    print(f"pushed in one commit: {info}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeify", description="Turn dense transformers / diffusers models into sparse MoE models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser(
        "inspect", help="dry run: the FFN sites a conversion would touch, and the sizes after"
    )
    inspect.add_argument("path", help="a transformers / diffusers model directory, or a moeify checkpoint")
    _add_recipe(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=cmd_inspect)

    convert = commands.add_parser("convert", help="load a dense checkpoint, convert it, check it, save it")
    convert.add_argument("path", help="a transformers / diffusers model directory (safetensors weights)")
    convert.add_argument("out", help="the directory to write (moeify.from_pretrained reads it)")
    _add_recipe(convert)
    convert.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser("export", help="write a moeify checkpoint as a native transformers MoE checkpoint")
    export.add_argument("src", help="a moeify checkpoint directory or Hub repo id")
    export.add_argument("out", help="the directory to write")
    export.add_argument("--format", required=True, choices=export_format_names(), help="the native MoE family")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=cmd_export)

    card = commands.add_parser("card", help="render a Hub model card from a monitor run and a moeify checkpoint")
    card.add_argument("run_dir", help="a run directory written by moeify.sinks.JsonlSink")
    card.add_argument("--model", required=True, help="the moeify checkpoint directory (save_pretrained)")
    card.add_argument("-o", "--output", help="write the card here (plots go to diagnostics/ beside it); default: print")
    card.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    push = commands.add_parser("push", help="upload a moeify checkpoint, its card and diagnostics in one commit")
    push.add_argument("saved_dir", help="the moeify checkpoint directory (save_pretrained)")
    push.add_argument("repo_id", help="user/name, created if needed (token: HF_TOKEN or `hf auth login`)")
    push.add_argument("--run", dest="run_dir", help="a monitor run directory (JsonlSink) to publish as diagnostics/")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", help="the commit message")
    for sub in (card, push):
        sub.add_argument("--base-model", help="the base model's Hub repo id, for the card's metadata")
    card.add_argument("--repo-id", help="the Hub repo the card is for (shown in the loading snippet)")
    card.set_defaults(run=cmd_card)
    push.set_defaults(run=cmd_push)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, (CliError, ValueError, OSError)) else f"{type(error).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    command = "moeify"
    try:
        args = parser.parse_args(argv)
        command = f"moeify {args.command}"
        return args.run(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except BrokenPipeError:  # `moeify inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("MOEIFY_DEBUG"):
            raise
        print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
