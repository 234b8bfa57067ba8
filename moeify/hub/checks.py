"""What a checkpoint directory must be before anything of it is loaded: its record (fields, types,
version, checksum), the checksums of its files, its weight files, and the files' headers (keys,
shapes, dtypes) against the model rebuilt from the record. Every failure is a `CheckpointError`
naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moeify.hub.save import FORMAT_VERSION, MOEIFY_CONFIG, file_checksum, record_checksum

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SHOWN = 10  # key names listed in an error


class CheckpointError(ValueError):
    """A directory cannot be loaded as a moeify checkpoint; the message says why and what to do."""


def shown_names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} holds only pickle weights ({shown_names(pickles)}); moeify reads safetensors only and never "
            "unpickles (loading a pickle can run arbitrary code). Load the dense model with its library, convert "
            "it with moeify(...), and save it with moeify.save_pretrained"
        )


def read_record(directory: Path) -> dict[str, Any]:
    """The parsed moeify_config.json of a directory, checked."""
    path = directory / MOEIFY_CONFIG
    if not path.is_file():
        _refuse_pickle(directory)
        hint = (
            f"; to convert a dense checkpoint run `moeify convert {directory} OUT`, or load it with its library "
            "and call moeify(model, ...)"
            if (directory / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"{directory} is not a moeify checkpoint: it has no {MOEIFY_CONFIG}{hint}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != "moeify":
        raise CheckpointError(f'{path} is not a moeify checkpoint record (no "format": "moeify")')
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{path}: format_version must be a positive integer, got {version!r}; the record is damaged"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by moeify {record.get('moeify_version')} in format {version}; this moeify reads "
            f"format {FORMAT_VERSION} and older: pip install -U moeify"
        )
    _check_fields(path, record)
    stored = record.get("record_checksum")
    if stored is not None and stored != record_checksum(record):
        raise CheckpointError(f"{path}: its content does not match its checksum; the record is damaged")
    return record


def verify_checksums(directory: Path, record: dict[str, Any]) -> None:
    """Every file the record has a checksum for is there and intact (records written before
    checksums have none to compare)."""
    for name, expected in (record.get("checksums") or {}).items():
        path = directory / str(name)
        if Path(str(name)).name != name:
            raise CheckpointError(f"{directory / MOEIFY_CONFIG}: a checksum names {name!r}, not a file beside it")
        if not path.is_file():
            _refuse_pickle(directory)
            raise CheckpointError(f"{directory}: {name} is missing; the checkpoint is incomplete")
        if file_checksum(path) != expected:
            raise CheckpointError(
                f"{path} does not match its checksum in {MOEIFY_CONFIG}: the file is damaged (a partial download or "
                "a flipped byte); fetch or save it again"
            )


# Fields of a record and the type each must have (the rest are checked where they are read).
_FIELDS = {
    "checksums": dict,
    "conversions": list,
    "base": dict,
    "weights": str,
    "tied": dict,
    "buffer_dtypes": dict,
    "captured": dict,
    "dtypes": dict,
}


def _check_fields(path: Path, record: dict[str, Any]) -> None:
    for field, kind in _FIELDS.items():
        if field in record and not isinstance(record[field], kind):
            raise CheckpointError(
                f"{path}: {field!r} must be a JSON {kind.__name__ if kind is not dict else 'object'}, got "
                f"{type(record[field]).__name__}; the record is damaged"
            )


def read_json(path: Path, what: str) -> Any:
    """A JSON file the record names, or a CheckpointError saying which and why."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} ({what}) is missing; the checkpoint is incomplete")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {error}") from None


def weight_files(directory: Path, record: dict[str, Any]) -> list[Path]:
    """The safetensors files of the checkpoint (the shards of its index, or its one file)."""
    name = record.get("weights")
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CheckpointError(f"{directory / MOEIFY_CONFIG}: weights={name!r} is not a safetensors file or index")
    path = directory / name
    if not path.is_file():
        _refuse_pickle(directory)
        raise CheckpointError(f"{directory}: the weights file {name} named in {MOEIFY_CONFIG} is missing")
    if not name.endswith(".index.json"):
        return [path]
    try:
        names = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a safetensors index ({type(error).__name__}: {error})") from None
    files = []
    for shard in names:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{path} names {shard!r}: shards must be .safetensors files beside the index")
        if not (directory / shard).is_file():
            raise CheckpointError(f"{directory}: the shard {shard} listed in {name} is missing")
        files.append(directory / shard)
    return files


def _retyped(dtypes: dict[str, str], recorded: dict[str, str]) -> list[str]:
    """Tensors stored in another dtype than the save wrote (the record's `dtypes`), or routers not in
    float32 (moeify keeps routers fp32 in every model: a float16 router fails at the first forward)."""
    found = []
    for key, dtype in sorted(dtypes.items()):
        want = recorded.get(key) or ("F32" if ".router." in f".{key}" else None)
        if want is not None and dtype != want:
            found.append(f"{key} {dtype} (saved as {want})")
    return found


def check_keys(
    model: nn.Module, files: list[Path], tied: dict[str, str], recorded: dict[str, str] | None = None
) -> None:
    """Compare the keys, shapes and dtypes of the files (their headers) with the model's and the
    record's before reading any tensor."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    shapes[key], dtypes[key] = view.get_shape(), view.get_dtype()
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    present = set(shapes)
    model_state = model.state_dict()
    expected = set(model_state)
    missing = sorted(expected - present - set(tied))
    unexpected = sorted((present | set(tied)) - expected)
    untied = sorted(name for name, source in tied.items() if source not in present)
    resized = [
        f"{key} {list(shapes[key])} (model {list(model_state[key].shape)})"
        for key in sorted(expected & present)
        if list(shapes[key]) != list(model_state[key].shape)
    ]
    problems = [f"{len(resized)} key(s) of another shape: {shown_names(resized)}"] if resized else []
    retyped = _retyped(dtypes, recorded or {})
    if retyped:
        problems.append(f"{len(retyped)} key(s) of another dtype: {shown_names(retyped)}")
    if missing:
        problems.append(f"missing {len(missing)} key(s): {shown_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {shown_names(unexpected)}")
    if untied:
        problems.append(f"tied key(s) whose source is absent: {shown_names(untied)}")
    if problems:
        raise CheckpointError(
            f"the weights in {files[0].parent} do not match the model rebuilt from {MOEIFY_CONFIG}: "
            + "; ".join(problems)
            + ". Nothing was loaded."
        )
