"""Per-round checkpoints beside results.h5, so that a run continues after a crash, on any number of ranks.

    <output.dir>/checkpoint/round000012.rank0003of0004.pt   one per rank: what that rank needs to go on
    <output.dir>/checkpoint/round000012.results.h5          rank 0: results.h5 as it was after round 12

A rank's file holds its base's merged state, the method's kept global adapter, the importance state of the
servers it hosts (keyed by server), the planner's per-server state, the eval losses so far, the measured
profiles (plans are a function of them) and the RNG states (runtime/resume.py builds, composes and applies
it). The name says which rank of how many wrote it, so a round is complete when all W files of one world
size W are there (and rank 0's results snapshot): a resume on another number of ranks composes each new
rank's state from them (runtime/resume.py, elastic resume).

Every file is written under a temporary name, flushed to disk and renamed, so it is whole or absent. Each
rank keeps its two newest checkpoints: between two checkpoints every rank passes a collective, so when a job
dies no rank is more than one checkpoint ahead of another, and the newest round that *every* rank holds is
still on disk. Rank 0 also removes what earlier attempts (another world size) left of rounds before that.

Rank 0 writes results.h5's row of a round before its checkpoint of that round, and snapshots results.h5
with it; a resume puts the snapshot back, so results.h5 ends exactly at the checkpoint's round (rows of
rounds that are redone are dropped) even if the crash hit in the middle of an append.

Files are read with torch.load(weights_only=True): a checkpoint is data, and a tampered one cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import UserInputError

FORMAT = 2  # 2: files named by rank and world size (elastic resume)
KEEP = 2
_NAME = re.compile(r"round(\d{6})\.rank(\d{4})of(\d{4})\.pt$")
_SNAPSHOT = re.compile(r"round(\d{6})\.results\.h5$")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def scan(ckpt_dir: Path) -> dict[int, dict[int, set[int]]]:
    """{round: {world size: ranks whose checkpoint file of that round and world size is here}}."""
    found: dict[int, dict[int, set[int]]] = {}
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.setdefault(int(m.group(1)), {}).setdefault(int(m.group(3)), set()).add(int(m.group(2)))
    return found


def snapshots(ckpt_dir: Path) -> set[int]:
    """Rounds with a results.h5 snapshot here."""
    if not ckpt_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _SNAPSHOT.match(p.name))}


def complete(found: dict[int, dict[int, set[int]]], snaps: set[int]) -> dict[int, list[int]]:
    """{round: world sizes W with all W ranks' files} for the rounds that also have their results snapshot."""
    out = {t: sorted(w for w, ranks in by_w.items() if ranks >= set(range(w))) for t, by_w in found.items()
           if t in snaps}
    return {t: ws for t, ws in out.items() if ws}


def complete_rounds(out_dir: str | Path) -> list[int]:
    """Rounds a resume of `out_dir` could continue from (every rank's file and the snapshot are there)."""
    d = Path(out_dir) / "checkpoint"
    return sorted(complete(scan(d), snapshots(d)))


class CheckpointDir:
    """One rank's view of <output.dir>/checkpoint/: this rank of a job of `world_size` ranks."""

    def __init__(self, out_dir: str | Path, rank: int, world_size: int):
        self.dir = Path(out_dir) / "checkpoint"
        self.rank = rank
        self.world_size = world_size

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
        """Write this rank's checkpoint of `round_idx` (rank 0: and a snapshot of `results`), then drop all
        but the KEEP newest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if results is not None:  # the snapshot first: rounds() counts rank 0's checkpoint only with it
            tmp = self.results_path(round_idx).with_suffix(".h5.tmp")
            shutil.copyfile(results, tmp)
            _fsync_replace(tmp, self.results_path(round_idx))
        final = self.path(round_idx)
        tmp = final.with_suffix(".pt.tmp")
        torch.save({"format": FORMAT, "round": round_idx, "rank": self.rank, "world_size": self.world_size,
                    **state}, tmp)
        _fsync_replace(tmp, final)
        kept = self.rounds()[-KEEP:]
        for t in self.rounds()[:-KEEP]:
            self.path(t).unlink(missing_ok=True)
        if self.rank == 0 and kept:
            # earlier attempts' files (another world size, or rounds this attempt redid) older than what this
            # attempt keeps: every rank of this attempt holds a newer checkpoint now
            for t, by_w in scan(self.dir).items():
                if t < kept[0]:
                    for w, ranks in by_w.items():
                        for r in ranks:
                            self.path(t, r, w).unlink(missing_ok=True)
            for t in snapshots(self.dir):
                if t < kept[0]:
                    self.results_path(t).unlink(missing_ok=True)

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

    def restore_results(self, round_idx: int, results: Path) -> None:
        """Put results.h5 back as it was right after `round_idx` (rank 0)."""
        tmp = results.with_suffix(".h5.tmp")
        shutil.copyfile(self.results_path(round_idx), tmp)
        _fsync_replace(tmp, results)

    def clear(self) -> None:
        """A fresh start: forget every checkpoint of an earlier run in this folder (rank 0, all ranks' files)."""
        shutil.rmtree(self.dir, ignore_errors=True)
