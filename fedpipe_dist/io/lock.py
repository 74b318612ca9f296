"""One writer per output.dir: rank 0 holds <output.dir>/.fedpipe.lock for the job's life.

    lock = RunLock(out_dir)
    lock.acquire(log)        # UserInputError naming the holder when another live job has it
    ...
    lock.release()

The lock is an flock(2) on the file, which the kernel drops when its holder dies however it dies (kill -9
included), so a lock left by a dead job is simply free: it is taken over, and the log says whose it was
(the file holds the holder's host, pid, job id and start time). A job that ends, well or not, removes the
file; only a killed one leaves it. While the holder lives, a second job
exits 2 naming it. flock works across the nodes of a cluster on NFSv4 and Lustre (mounted with flock);
where a filesystem does not support it, the lock is not enforced and the log says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserInputError

NAME = ".fedpipe.lock"


def _holder() -> dict:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        if not isinstance(h, dict):  # valid JSON but not our note (a number, a list): garbage all the same
            raise TypeError(type(h).__name__)
        job = f", job {h['job']}" if h.get("job") else ""
        return f"host {h['host']}, pid {h['pid']}{job}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that left no readable note"


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.path = self.dir / NAME
        self.fd: int | None = None

    def acquire(self, log) -> None:
        for _ in range(100):  # a holder that just released it unlinked the file under us: lock the new one
            fd = self._lock_once(log)
            if fd is not None:
                break
        else:
            raise UserInputError(f"output.dir: {str(self.path)!r} keeps being replaced while this job tries to lock "
                                 "it; is another job starting and stopping in this output.dir?")
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if previous:
            log(f"output.dir: taking over the lock of a job that is gone ({_describe(previous)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def _lock_once(self, log) -> int | None:
        """The locked descriptor of the file now at self.path; None when the file was unlinked (a holder's
        release) between our open and our lock, so that two jobs never hold locks on two files of one name."""
        import fcntl

        try:  # (runtime/outputs.check_output_dir has refused an output.dir that is a file)
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserInputError(f"output.dir: cannot write into {str(self.dir)!r} ({e.strerror}); choose an "
                                 "output.dir you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise UserInputError(f"output.dir: {str(self.dir)!r} is being written by another job ({holder}); wait "
                                 "for it to end or stop it, or choose another output.dir") from None
        except OSError as e:  # a filesystem without flock
            log(f"output.dir: cannot lock {str(self.path)!r} ({e.strerror}); nothing stops a second job from "
                "writing into this folder")
            return fd
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """The lock file goes, whether the job ended well or not: unlinked while still locked, so a job waiting
        on the old file finds it replaced and locks the new one (_lock_once)."""
        if self.fd is None:
            return
        import fcntl

        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
