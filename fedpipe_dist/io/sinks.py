"""Live views of results.h5's rounds beside it, for tools that do not read HDF5: <output.dir>/rounds.csv (one
line per round: `tail -f`, spreadsheets, pandas) and, with output.tensorboard=true, TensorBoard event files
in <output.dir>/tensorboard/ (`tensorboard --logdir runs/`). Both follow results.h5: a fresh run starts them
from its row 0, a resumed run rewrites the CSV from the restored file and has TensorBoard drop the steps after
the round it resumed from (purge_step), so neither ever holds a round results.h5 does not.

    for sink in open_sinks(cfg.output, out_dir, resumed_from):   # rank 0, once results.h5 is open
        writer.attach(sink)                                       # then every append_round reaches it
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .schema import ROUND_FIELDS

CSV_NAME = "rounds.csv"
TB_DIR = "tensorboard"
# what TensorBoard plots per round (every column stays in the CSV and results.h5)
TB_SCALARS = ("eval_loss", "eval_ppl", "train_loss", "wall_s", "train_s", "wait_s", "bytes_up", "bytes_down",
              "under_training_rate", "n_selected")


class RoundsCsv:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / CSV_NAME

    def start(self, rows: dict) -> None:
        """Write the rows results.h5 holds now (a fresh run: row 0; a resumed one: every restored row)."""
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(ROUND_FIELDS)
            for i in range(len(rows["round"])):
                w.writerow([_cell(rows[k][i]) for k in ROUND_FIELDS])
        os.replace(tmp, self.path)

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(row[k]) for k in ROUND_FIELDS])


class TensorBoard:
    def __init__(self, out_dir: Path, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (config checks it)

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TB_DIR), purge_step=resumed_from + 1)
        self.fresh = resumed_from == 0

    def start(self, rows: dict) -> None:
        if self.fresh:
            for i in range(len(rows["round"])):
                self.add({k: rows[k][i] for k in rows})

    def add(self, row: dict) -> None:
        step = int(row["round"])
        for k in TB_SCALARS:
            v = float(row.get(k, math.nan))
            if math.isfinite(v):
                self.writer.add_scalar(f"round/{k}", v, step)
        self.writer.flush()


def open_sinks(output, out_dir: Path, resumed_from: int) -> list:
    sinks: list = [RoundsCsv(out_dir)] if output.csv else []
    if output.tensorboard:
        sinks.append(TensorBoard(out_dir, resumed_from))
    return sinks


def _cell(v):
    v = v.item() if hasattr(v, "item") else v
    return "" if isinstance(v, float) and not math.isfinite(v) else v
