"""Per-round checkpoints beside results.h5, so that a run continues after a crash.

    <output.dir>/checkpoint/round000012.rank0003.pt     one per rank: what that rank needs to go on
    <output.dir>/checkpoint/round000012.results.h5      rank 0: results.h5 as it was after round 12

A rank's file holds its base's merged state, the method's kept global adapter, its hosted servers'
importance state, the planner's per-server state, the eval losses so far, the measured profiles (plans are
a function of them) and the RNG states (runtime/resume.py builds and applies it). Every file is written
under a temporary name, flushed to disk and renamed, so it is whole or absent. Each rank keeps its two
newest checkpoints: between two checkpoints every rank passes a collective, so when a job dies no rank is
more than one checkpoint ahead of another, and the newest round that *every* rank holds is still on disk.

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

FORMAT = 1
KEEP = 2
_NAME = re.compile(r"round(\d{6})\.rank(\d{4})\.pt$")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class CheckpointDir:
    """One rank's view of <output.dir>/checkpoint/."""

    def __init__(self, out_dir: str | Path, rank: int):
        self.dir = Path(out_dir) / "checkpoint"
        self.rank = rank

    def path(self, round_idx: int) -> Path:
        return self.dir / f"round{round_idx:06d}.rank{self.rank:04d}.pt"

    def results_path(self, round_idx: int) -> Path:
        return self.dir / f"round{round_idx:06d}.results.h5"

    def rounds(self) -> list[int]:
        """Rounds this rank holds a complete checkpoint of (rank 0: with its results.h5 snapshot)."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m and int(m.group(2)) == self.rank:
                t = int(m.group(1))
                if self.rank != 0 or self.results_path(t).exists():
                    out.append(t)
        return sorted(out)

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
        torch.save({"format": FORMAT, "round": round_idx, "rank": self.rank, **state}, tmp)
        _fsync_replace(tmp, final)
        for t in self.rounds()[:-KEEP]:
            self.path(t).unlink(missing_ok=True)
            if self.rank == 0:
                self.results_path(t).unlink(missing_ok=True)

    def load(self, round_idx: int) -> dict[str, Any]:
        path = self.path(round_idx)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types; every one means the same here
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            raise UserInputError(f"resume: checkpoint {str(path)!r} cannot be read ({why}); delete it to resume from "
                                 "the round before, or start over with output.overwrite=true") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("round") != round_idx \
                or state.get("rank") != self.rank:
            raise UserInputError(f"resume: {str(path)!r} is not a fedpipe checkpoint of round {round_idx} for rank "
                                 f"{self.rank} (format {FORMAT}); delete it, or start over with output.overwrite=true")
        return state

    def restore_results(self, round_idx: int, results: Path) -> None:
        """Put results.h5 back as it was right after `round_idx` (rank 0)."""
        tmp = results.with_suffix(".h5.tmp")
        shutil.copyfile(self.results_path(round_idx), tmp)
        _fsync_replace(tmp, results)

    def clear(self) -> None:
        """A fresh start: forget every checkpoint of an earlier run in this folder (rank 0, all ranks' files)."""
        shutil.rmtree(self.dir, ignore_errors=True)
