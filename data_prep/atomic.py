"""Outputs appear only when complete: build everything in a hidden temp directory next to the target,
then rename into place. A killed run leaves only a `.NAME.sift-tmp-PID` directory, which the next run for
the same target removes, so an interrupted command can simply be re-run."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from sift_megatron.errors import fault_point

_TAG = ".sift-tmp-"


def _temp_name(final: Path, pid: int) -> Path:
    return final.parent / f".{final.name}{_TAG}{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temp directories left for `final` by runs whose process no longer exists."""
    removed = []
    for path in final.parent.glob(f".{final.name}{_TAG}*"):
        pid_text = path.name.rsplit(_TAG, 1)[-1].split("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def temp_dir_for(final: Path) -> Iterator[Path]:
    """A fresh temp directory beside `final` (same filesystem, so renames are atomic); always removed."""
    remove_stale_temps(final)
    tmp = _temp_name(final, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an older `final` in one rename."""
    fault_point("publish_dir")
    if final.exists():
        old = _temp_name(final, os.getpid()).with_name(_temp_name(final, os.getpid()).name + "-old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def publish_files(moves: list[tuple[Path, Path]]) -> None:
    """Rename finished files into place; if interrupted part-way, undo so no partial set is left.

    Callers list every `.bin` before any `.idx`: megatron needs both, so a dataset counts as present only
    once its index exists.
    """
    fault_point("publish_files")
    # An older output's index goes first: a kill part-way must never pair a new .bin with an old .idx.
    for _, dst in moves:
        if dst.suffix == ".idx" and dst.is_file():
            dst.unlink()
    done: list[Path] = []
    try:
        for src, dst in moves:
            os.replace(src, dst)
            done.append(dst)
    except BaseException:
        for dst in done:
            with contextlib.suppress(OSError):
                dst.unlink()
        raise
