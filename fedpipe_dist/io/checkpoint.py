"""Per-round checkpoints beside results.h5, so that a run continues after a crash, on any number of ranks.

    <output.dir>/checkpoint/round000012.rank0003of0004.pt   one per rank: what that rank needs to go on
    <output.dir>/checkpoint/round000012.results.h5          rank 0: results.h5 as it was after round 12
    <output.dir>/checkpoint/<either>.sha256                  its SHA-256, written last

A rank's file holds its base's merged state, the method's kept global adapter, the importance state of the
servers it hosts (keyed by server), the planner's per-server state, the eval losses so far, the measured
profiles (plans are a function of them) and the RNG states (runtime/resume.py builds, composes and applies
it). The name says which rank of how many wrote it, so a round is complete when all W files of one world
size W are there (and rank 0's results snapshot): a resume on another number of ranks composes each new
rank's state from them (runtime/resume.py, elastic resume).

Every file is written under a temporary name, flushed to disk and renamed, so it is whole or absent; its
SHA-256 is written last beside it (`<file>.sha256`): a file without one does not count, and a resume
verifies every file it will use against it first (a damaged newest checkpoint falls back to the one before,
runtime/resume.py). A full disk or a signal during a save leaves no .tmp file behind. Each
rank keeps its two newest checkpoints and the earlier files their base state continues from (runtime/chain.py:
a full snapshot every checkpoint.full_every rounds, merged updates between): between two checkpoints every
rank passes a collective, so when a job dies no rank is more than one checkpoint ahead of another, and the
newest round that *every* rank holds is still on disk. Rank 0 also removes what earlier attempts (another
world size) left of rounds before that.

Rank 0 writes results.h5's row of a round before its checkpoint of that round, and snapshots results.h5
with it; a resume puts the snapshot back, so results.h5 ends exactly at the checkpoint's round (rows of
rounds that are redone are dropped) even if the crash hit in the middle of an append.

Files are read with torch.load(weights_only=True): a checkpoint is data, and a tampered one cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import UserInputError
from .space import as_disk_error, disk_errors, require_space, tensor_bytes

FORMAT = 3  # 2: files named by rank and world size (elastic resume); 3: the base as a chain (runtime/chain.py)
KEEP = 2
_NAME = re.compile(r"round(\d{6})\.rank(\d{4})of(\d{4})\.pt$")
_SNAPSHOT = re.compile(r"round(\d{6})\.results\.h5$")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _publish(tmp: Path, final: Path) -> None:
    """Make tmp the file `final`, then write its SHA-256 beside it, last: a file counts as written only once
    its checksum is there (scan, snapshots), and a damaged one is found before it is used (verify)."""
    digest = sha256_of(tmp)
    _fsync_replace(tmp, final)
    side = checksum_path(final)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(f"{digest}  {final.name}\n")
    _fsync_replace(side_tmp, side)


def verify(path: Path) -> str | None:
    """None when `path` matches the checksum written with it; else what is wrong, for a message."""
    side = checksum_path(path)
    try:
        expected = side.read_text().split()[0]
    except (OSError, IndexError):
        return f"{side.name} is missing or unreadable"
    try:
        actual = sha256_of(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None if actual == expected else f"its SHA-256 differs from the one written with it ({side.name})"


def _written(ckpt_dir: Path):
    """The names of the files here whose checksum was written (the files a crash did not cut short)."""
    if not ckpt_dir.is_dir():
        return []
    names = {p.name for p in ckpt_dir.iterdir()}
    return [n for n in names if n + ".sha256" in names]


def scan(ckpt_dir: Path) -> dict[int, dict[int, set[int]]]:
    """{round: {world size: ranks whose checkpoint file of that round and world size is here}}."""
    found: dict[int, dict[int, set[int]]] = {}
    for name in _written(ckpt_dir):
        m = _NAME.match(name)
        if m:
            found.setdefault(int(m.group(1)), {}).setdefault(int(m.group(3)), set()).add(int(m.group(2)))
    return found


def snapshots(ckpt_dir: Path) -> set[int]:
    """Rounds with a results.h5 snapshot here."""
    return {int(m.group(1)) for name in _written(ckpt_dir) if (m := _SNAPSHOT.match(name))}


def leftovers(ckpt_dir: Path) -> list[Path]:
    """Every file in the folder (checkpoints, snapshots, checksums, .tmp files of an interrupted write)."""
    return sorted(p for p in ckpt_dir.iterdir() if p.is_file()) if ckpt_dir.is_dir() else []


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def complete(found: dict[int, dict[int, set[int]]], snaps: set[int]) -> dict[int, list[int]]:
    """{round: world sizes W with all W ranks' files} for the rounds that also have their results snapshot."""
    out = {t: sorted(w for w, ranks in by_w.items() if ranks >= set(range(w))) for t, by_w in found.items()
           if t in snaps}
    return {t: ws for t, ws in out.items() if ws}


def complete_rounds(out_dir: str | Path) -> list[int]:
    """Rounds a resume of `out_dir` could continue from (every rank's file and the snapshot are there)."""
    d = Path(out_dir) / "checkpoint"
    return sorted(complete(scan(d), snapshots(d)))


def _drill_stall() -> None:
    """FEDPIPE_DRILL_SNAPSHOT_STALL_S: hold rank 0 between writing the results snapshot and publishing it, so
    that a crash drill (tests/test_resume.py) can kill it while the snapshot is still a .tmp file."""
    stall = float(os.environ.get("FEDPIPE_DRILL_SNAPSHOT_STALL_S", "0") or 0)
    if stall > 0:
        import time

        time.sleep(stall)


class CheckpointDir:
    """One rank's view of <output.dir>/checkpoint/: this rank of a job of `world_size` ranks."""

    def __init__(self, out_dir: str | Path, rank: int, world_size: int):
        self.dir = Path(out_dir) / "checkpoint"
        self.rank = rank
        self.world_size = world_size
        self._start: dict[int, int] = {}  # round -> its chain's start, for the checkpoints this attempt wrote
        self._thread: threading.Thread | None = None  # the write save() started
        self._error: BaseException | None = None

    def path(self, round_idx: int, rank: int | None = None, world_size: int | None = None) -> Path:
        """This rank's file of `round_idx` (or another rank's, of another world size)."""
        r = self.rank if rank is None else rank
        w = self.world_size if world_size is None else world_size
        return self.dir / f"round{round_idx:06d}.rank{r:04d}of{w:04d}.pt"

    def results_path(self, round_idx: int) -> Path:
        return self.dir / f"round{round_idx:06d}.results.h5"

    def rounds(self) -> list[int]:
        """Rounds this rank (of this world size) holds a checkpoint of (rank 0: with its results.h5 snapshot)."""
        snaps = snapshots(self.dir) if self.rank == 0 else None
        return sorted(t for t, by_w in scan(self.dir).items() if self.rank in by_w.get(self.world_size, ())
                      and (snaps is None or t in snaps))

    def save(self, round_idx: int, state: dict[str, Any], results: Path | None = None) -> None:
        """Start this rank's checkpoint of `round_idx`: rank 0's snapshot of `results` is taken now, the state is
        written in a thread (so the next round trains meanwhile), then what only older checkpoints needed is
        dropped (_rotate). Errors (a full disk) are raised by wait(), not here; wait_quietly() makes the write
        synchronous. The caller must keep `state` unchanged until the write ends (runtime/engine.py copies it
        first) and must have made sure, before this call, that every rank holds its previous checkpoint whole
        (a collective after wait()): the rotation may then drop what only older checkpoints needed, whatever
        the other ranks' writes do."""
        self.wait_quietly()
        self._error = None
        try:
            self._prepare(round_idx, state, results)
            if results is not None:  # the snapshot first: rounds() counts rank 0's checkpoint only with it
                self._snapshot(round_idx, results)
        except BaseException as e:  # raised again by wait(), where every rank stops alike
            self._error = e
            return

        def write() -> None:
            try:
                self._write_state(round_idx, state)
            except BaseException as e:
                self._error = e

        # not a daemon: an interpreter exit (a SIGTERM) lets the write finish, so no half-written file stays
        self._thread = threading.Thread(target=write, name=f"checkpoint-{round_idx}", daemon=False)
        self._thread.start()

    def wait_quietly(self) -> None:
        """Let a background write finish; its error, if any, stays for wait()."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Let a background write finish, and raise what it raised (DiskError for a full disk)."""
        self.wait_quietly()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _prepare(self, round_idx: int, state: dict[str, Any], results: Path | None) -> None:
        with disk_errors(self.dir, f"round {round_idx}'s checkpoint"):
            self.dir.mkdir(parents=True, exist_ok=True)
        need = tensor_bytes(state) + (results.stat().st_size if results is not None else 0)
        require_space(self.dir, need, f"round {round_idx}'s checkpoint")

    def _snapshot(self, round_idx: int, results: Path) -> None:
        tmp = self.results_path(round_idx).with_suffix(".h5.tmp")
        with self._cleaned(round_idx, tmp):
            shutil.copyfile(results, tmp)
            _drill_stall()
            _publish(tmp, self.results_path(round_idx))

    def _write_state(self, round_idx: int, state: dict[str, Any]) -> None:
        final = self.path(round_idx)
        tmp = final.with_suffix(".pt.tmp")
        with self._cleaned(round_idx, tmp):
            torch.save({"format": FORMAT, "round": round_idx, "rank": self.rank, "world_size": self.world_size,
                        **state}, tmp)
            _publish(tmp, final)
        base = state.get("base")
        self._start[round_idx] = base["start"] if base else round_idx
        self._rotate()

    @contextlib.contextmanager
    def _cleaned(self, round_idx: int, tmp: Path):
        """A full disk or a signal while `tmp` is written: no half-written file stays behind; disk errors
        become DiskError."""
        try:
            yield
        except BaseException as e:
            err = as_disk_error(e, self.dir, f"round {round_idx}'s checkpoint")
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name.removesuffix(".tmp") + ".sha256.tmp").unlink(missing_ok=True)
            if err is not None:
                raise err from None
            raise

    def _rotate(self) -> None:
        """Drop what no resume can use any more: files before the chains (runtime/chain.py) of the KEEP newest
        checkpoints, and results snapshots before the older of those two, except the snapshot of a kept chain's
        full snapshot: with it, that round stays a checkpoint to fall back to when a link after it is damaged."""
        held = self.rounds()
        if len(held) < KEEP:  # this attempt's first checkpoint: other ranks may not hold it yet, keep the older
            return
        oldest_kept = held[-KEEP]
        # a checkpoint another attempt wrote: its chain's start is not known here, so nothing is dropped
        keep_from = min(self._start.get(t, 0) for t in held[-KEEP:])
        if self.rank != 0:
            for t in held:
                if t < keep_from:
                    _unlink(self.path(t))
            return
        # rank 0: every file older than that, its own and earlier attempts' (another world size, or rounds this
        # attempt redid): every rank of this attempt holds a newer checkpoint and its chain now
        for t, by_w in scan(self.dir).items():
            if t < keep_from:
                for w, ranks in by_w.items():
                    for r in ranks:
                        _unlink(self.path(t, r, w))
        starts = {self._start.get(t, 0) for t in held[-KEEP:]}
        for t in snapshots(self.dir):
            if t < oldest_kept and t not in starts:
                _unlink(self.results_path(t))

    def load(self, round_idx: int, rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
        """A checkpoint file (this rank's, or rank `rank` of `world_size`'s), memory-mapped: tensors are read
        from disk only when used, so composing a state from several ranks' files reads only what it takes."""
        r = self.rank if rank is None else rank
        w = self.world_size if world_size is None else world_size
        path = self.path(round_idx, r, w)
        if not path.is_file():
            raise UserInputError(f"resume: checkpoint {str(path)!r} is not visible on this node; a resume on another "
                                 "number of ranks reads every rank's file, so output.dir must be on a filesystem "
                                 "all nodes share (or resume with the same number of ranks)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # unpickling errors come in many types; every one means the same here
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            raise UserInputError(f"resume: checkpoint {str(path)!r} cannot be read ({why}); delete it to resume from "
                                 "the round before, or start over with output.overwrite=true") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("round") != round_idx \
                or state.get("rank") != r or state.get("world_size") != w:
            raise UserInputError(f"resume: {str(path)!r} is not a fedpipe checkpoint of round {round_idx} for rank "
                                 f"{r} of {w} (format {FORMAT}); delete it, or start over with output.overwrite=true")
        return state

    def verify(self, round_idx: int, world_size: int, ranks) -> list[str]:
        """What is damaged among round `round_idx`'s files of `ranks` (of `world_size`) and, on rank 0, its
        results snapshot: one 'path: why' per damaged file (empty: all intact)."""
        paths = [self.path(round_idx, r, world_size) for r in ranks]
        if self.rank == 0:
            paths.append(self.results_path(round_idx))
        return [f"{str(p)!r}: {why}" for p in paths if (why := verify(p)) is not None]

    def restore_results(self, round_idx: int, results: Path) -> None:
        """Put results.h5 back as it was right after `round_idx` (rank 0)."""
        tmp = results.with_suffix(".h5.tmp")
        shutil.copyfile(self.results_path(round_idx), tmp)
        _fsync_replace(tmp, results)
