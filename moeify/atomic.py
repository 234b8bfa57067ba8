"""Crash-safe writes: at every instant a target path holds its old complete content or its new
complete content, never a mix, whatever fails (an exception, a full disk, SIGKILL, power loss).

- A directory (`staged_directory`) is written in a staging directory beside it, synced to disk,
  then swapped in. On Linux the swap is one `renameat2(RENAME_EXCHANGE)` call. Elsewhere, or where
  the filesystem refuses it, the target is renamed aside and the staging directory renamed in:
  a crash between those two renames leaves the old content beside the target, which `recover`
  (run by every save and load of that path) puts back.
- A file (`write_text`) is written beside itself, synced, and renamed over (`os.replace`).

Files in the old directory that the new content does not write (a model card, tokenizer files)
are carried over into the new one (hard links where the filesystem allows).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STAGING = ".moeify-staging-"
PREVIOUS = ".moeify-previous"


def as_directory(path: object, caller: str) -> Path:
    """A path argument as a Path, or a TypeError naming the call (not pathlib's)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(
            f"{caller}: the directory must be a path (str or os.PathLike), got {type(path).__name__} {path!r}"
        )
    return Path(path).expanduser()


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some platforms cannot open a directory to sync it
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem that does not sync directories: nothing more to do
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Every file and directory below `root`, and `root` itself, on disk."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EPERM):
        return False  # the filesystem or the kernel cannot exchange: rename instead
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}{PREVIOUS}"


def recover(target: Path) -> None:
    """Finish what a swap interrupted between its two renames: put the old content back if the
    target is missing, and remove what is left beside it (and staging directories of dead saves)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    aside = _aside(target)
    if aside.exists():
        if not target.exists():
            os.replace(aside, target)
            _fsync(target.parent)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for staging in target.parent.glob(f".{target.name}{STAGING}*"):
        pid = staging.name.rsplit(STAGING, 1)[-1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _carry_over(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    """Files of the old directory that the new one does not have, and that are not the writer's
    own (a stale shard of the previous save), linked (or copied) in."""
    for path in old.iterdir():
        if (new / path.name).exists() or owned(path.name):
            continue
        if path.is_dir():
            shutil.copytree(path, new / path.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, new / path.name)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def swap_in(staging: Path, target: Path, owned: Callable[[str], bool] = lambda name: False) -> None:
    """`staging` (complete and synced) takes `target`'s place; the old content is removed, except
    the files `owned` does not claim, which are carried over."""
    if not target.exists():
        os.replace(staging, target)
        _fsync(target.parent)
        return
    _carry_over(target, staging, owned)
    sync_tree(staging)
    if _exchange(staging, target):
        _fsync(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old content, now at the staging path
        return
    aside = _aside(target)
    os.replace(target, aside)
    _fsync(target.parent)
    os.replace(staging, target)  # a crash just before this line: `recover` restores `aside`
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(
    target: Path, *, owned: Callable[[str], bool] = lambda name: False, check: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Write into the yielded directory; on success it replaces `target` (`check` may refuse it
    first; the old files `owned` does not claim are kept), on any failure it is removed and
    `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING}{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        if check is not None:
            check(staging)
        sync_tree(staging)
        swap_in(staging, target, owned)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_for_ranks(
    target: Path,
    *,
    is_main: bool,
    barrier: Callable[[], None],
    tag: str,
    owned: Callable[[str], bool] = lambda name: False,
) -> Iterator[Path]:
    """`staged_directory` for a checkpoint that several processes write together (each its own
    files): every process writes into one staging directory beside `target` (named by `tag`, the
    same on every rank); once all are done the main process swaps it in. Call it on every process;
    `barrier` waits for all of them. A save that fails or is killed leaves what was at `target`."""
    target = Path(target)
    staging = target.parent / f".{target.name}{STAGING}{tag}"
    if is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        shutil.rmtree(staging, ignore_errors=True)  # a save that died before its swap
        staging.mkdir()
    barrier()
    try:
        yield staging
        barrier()
        if is_main:
            sync_tree(staging)
            swap_in(staging, target, owned)
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, crash-safe: written beside it, synced, renamed over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
