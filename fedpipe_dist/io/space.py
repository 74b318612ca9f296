"""Disk space and write errors in output.dir: one clear message (exit 2) instead of a traceback, a segfault
inside HDF5, or a checkpoint cut short.

    require_space(path, need_bytes, what)     # before a write: DiskError when the filesystem has less free
    with disk_errors(path, what): ...          # during a write: a full disk or a refused write -> DiskError

Every write of a run checks first that the space it needs is free (HDF5 does not fail cleanly when the disk
fills in the middle of an append), and a write that fails anyway for lack of space or permission is turned
into the same message, naming the path, the space needed and free, and how to continue: the run's last
checkpoint is intact, so the same command with resume=true goes on once there is room.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserInputError

MARGIN = 256 << 10  # filesystem blocks, HDF5 metadata, checksum files


class DiskError(UserInputError):
    """output.dir cannot take a write (full, read-only, not permitted); exit code 2 like any user error."""


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where a run would create its folders)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fix() -> str:
    return ("free space there (or move the folder to a larger disk), then run the same command with resume=true: it "
            "continues from the newest checkpoint (or starts the run when there is none yet)")


def require_space(path: Path, need: int, what: str) -> None:
    free = free_bytes(path)
    if free < need + MARGIN:
        raise DiskError(f"output.dir: {what} needs about {_mb(need + MARGIN)} free in {str(path)!r}, and {_mb(free)} "
                        f"is free; {_fix()}")


def as_disk_error(e: BaseException, path: Path, what: str) -> DiskError | None:
    """The DiskError a failed write amounts to (None: not a space or permission problem). Call it before
    removing what the write left, which frees the space that tells a full disk."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or \
            isinstance(e, RuntimeError) and free_bytes(path) < MARGIN:  # torch.save: "unexpected pos ..."
        return DiskError(f"output.dir: no space left writing {what} to {str(path)!r} ({_mb(free_bytes(path))} "
                         f"free); {_fix()}")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(f"output.dir: {str(path)!r} refused {what} ({e.strerror}); make it writable or choose "
                         "another output.dir, then run the same command with resume=true")
    return None


@contextmanager
def disk_errors(path: Path, what: str):
    """Turn a write that failed for lack of space or permission into a DiskError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        err = as_disk_error(e, path, what)
        if err is None:
            raise
        raise err from None


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a tree of dicts, lists and tuples (what torch.save will write, about)."""
    import torch

    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0
