"""What a run reports: the rank-0 progress log and the rows it appends to results.h5 (docs/hdf5_schema.md).

    log = Log(rank0)              # rank 0: a tqdm bar on a terminal, one line per round in a log file
    writer.append_round(round_row(t, ...), client_arrays(...))
"""

from __future__ import annotations

import math
import sys
import time
from typing import NamedTuple

import numpy as np

from ..adapters.sites import Site
from ..algorithm.planner import ClientPlan
from ..io.schema import PRECISION_BITS
from .client import ClientStats


class RankRecord(NamedTuple):
    """What one rank sends rank 0 for a round's row of results.h5 (gathered after the merge)."""

    stats: list[ClientStats]  # its hosted servers' local training this round
    absorbed: dict[str, float]  # per base precision it holds: the share of the merged update its base took up
    extra_bytes: dict[str, int]  # per base precision: bytes of the merged-update residual kept beside the base
    waited_s: float  # how long it waited for the slowest rank after training its servers


class Log:
    """The single rank-0 sink for human-readable progress: a tqdm bar with lines printed above it on a
    terminal; elsewhere (a Slurm log, a file, a pipe, --no-progress) one flushed line per round instead, so
    a long job's log shows how far it is:

        round 12/50  eval loss 2.8431  round 41.2 s  elapsed 8m14s  ETA 26m05s  up 3.1 MB  down 12.4 MB
    """

    def __init__(self, enabled: bool, show_bar: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.show_bar = show_bar and _is_terminal(self.stream)
        self.bar = None
        self.total = self.done = self.first = 0
        self.t0 = time.monotonic()

    def open_bar(self, total: int, done: int = 0) -> None:
        self.total, self.done, self.first = total, done, done
        self.t0 = time.monotonic()
        if self.enabled and self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round", file=self.stream,
                            dynamic_ncols=True)

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def step(self, row: dict) -> None:
        """Round `row` (results.h5's row of the round just recorded) is done."""
        self.done += 1
        loss = row.get("eval_loss", math.nan)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss == loss else "-", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.t0
        rounds_here = self.done - self.first
        eta = elapsed / rounds_here * (self.total - self.done) if rounds_here else math.nan
        self(f"round {row['round']}/{self.total}  eval loss {_num(loss, '.4f')}"
             f"  round {_num(row.get('wall_s'), '.1f')} s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
             f"  up {_mb(row.get('bytes_up', 0))}  down {_mb(row.get('bytes_down', 0))}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Laps:
    """Seconds per named phase: lap(name) adds the time since the previous lap (or since creation)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.clock
        self.clock = now


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _num(x, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def _clock(s: float) -> str:
    if s != s:
        return "-"
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def round_row(t: int, *, eval: dict | None, n_selected: int, n_clients: int = 0, stats: dict | None = None,
               traffic: dict | None = None, wall_s: float = 0.0) -> dict:
    stats = stats or {}
    done = [s for s in stats.values() if s.completed]
    row = {
        "round": t,
        "absorbed_min": math.nan,
        "agg_peak_bytes": 0,
        "agg_held_bytes": traffic.get("agg_held_bytes", 0) if traffic else 0,
        "n_rejected": 0,
        "wall_s": wall_s,
        "eval_s": 0.0,
        **{k: 0.0 for k in ("plan_s", "train_s", "sync_s", "exchange_s", "merge_s", "record_s")},
        "agg_s": traffic["agg_s"] if traffic else 0.0,
        "wait_s": 0.0,  # the round's straggler wait (runtime/engine.py sets it)
        "recv_wait_s": traffic["wait_s"] if traffic else 0.0,
        "train_loss": float(np.mean([s.train_loss for s in done])) if done else math.nan,
        "eval_loss": eval["loss"] if eval else math.nan,
        "eval_ppl": eval["ppl"] if eval else math.nan,
        "eval_loss_se": eval.get("se", math.nan) if eval else math.nan,
        "eval_tokens": int(eval.get("tokens", 0)) if eval else 0,
        "bytes_up": int(sum(traffic["client_bytes_up"].values())) if traffic else 0,
        "bytes_down": 0,
        "n_selected": n_selected,
        "under_training_rate": (1.0 - len(done) / n_selected) if n_selected else math.nan,
    }
    if traffic:
        # Every server (selected or not) must receive the merged update to stay in sync.
        row["bytes_down"] = int(traffic["bytes_down_payload"]) * n_clients
    return row


def own_losses(ev: dict | None, n: int) -> dict[str, np.ndarray]:
    """clients/eval_loss_own, eval_own_coverage and eval_loss_heldout of a round: each server's own-mix eval loss,
    the share of its data it covers, and its loss on its held-out own examples (Run.evaluate); NaN when not
    evaluated (eval_loss_heldout: also when data.own_eval_samples is 0)."""
    nan = np.full(n, np.nan)
    ev = ev or {}
    return {"eval_loss_own": np.asarray(ev.get("own", nan), dtype=float),
            "eval_own_coverage": np.asarray(ev.get("own_coverage", nan), dtype=float),
            "eval_loss_heldout": np.asarray(ev.get("heldout", nan), dtype=float)}


def client_arrays(n: int, L: int, sites: list[Site], plans: list[ClientPlan], selected: list[int],
                   stats: dict[int, ClientStats]) -> dict[str, np.ndarray]:
    a = {name: np.zeros(n, dtype=np.int64) for name in
         ("selected", "completed", "batch_size", "local_steps", "samples", "peak_mem_bytes", "trainable_params",
          "quant_bits", "bytes_up", "adapter_depth", "adapter_width")}
    a["local_s"] = np.full(n, np.nan)
    a["wait_s"] = np.full(n, np.nan)
    a["train_loss"] = np.full(n, np.nan)
    a["update_norm"] = np.full(n, np.nan)
    a["ranks"] = np.zeros((n, L, 4), dtype=np.int32)
    a["importance"] = np.full((n, L, 4), np.nan)
    for c in range(n):
        a["quant_bits"][c] = PRECISION_BITS.get(plans[c].precision, 32)
        a["batch_size"][c] = plans[c].batch_size
        a["ranks"][c] = plans[c].rank_matrix(sites) if c in selected else 0
    for c in selected:
        a["selected"][c] = 1
        s = stats.get(c)
        if s is None:
            continue
        a["completed"][c] = int(s.completed)
        a["local_steps"][c] = s.local_steps
        a["samples"][c] = s.samples
        a["local_s"][c] = s.local_s
        a["peak_mem_bytes"][c] = s.peak_mem_bytes
        a["trainable_params"][c] = s.trainable_params
        a["bytes_up"][c] = s.bytes_up
        a["train_loss"][c] = s.train_loss
        a["update_norm"][c] = s.update_norm
    # Straggler wait: how long each server idles until the slowest selected one has finished.
    t_max = max((s.local_s for s in stats.values()), default=0.0)
    for c, s in stats.items():
        a["wait_s"][c] = t_max - s.local_s
    return a
