"""The round engine: one process per rank, each hosting one or more edge servers; rank 0 is also central.

    torchrun --standalone --nproc_per_node=4 -m fedpipe_dist run jobs/quickstart.yaml
    python -m fedpipe_dist run jobs/quickstart.yaml          # world size 1: one process plays every server

`run_job` is the whole run as named phases: set-up (runtime/setup.py), then per round: sample servers ->
plan -> train each hosted server on its own shard -> report and screen the updates -> exchange (the method
picks the transport, runtime/exchange.py) -> fold (merge into every base, or keep a global adapter) ->
evaluate and record (rank 0 appends the round to results.h5) -> checkpoint; then finish (runtime/outputs.py).
Everything that differs between methods is asked of the method (fedpipe_dist/methods/); nothing here
branches on its name.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..algorithm.aggregation import ClientUpdate
from ..algorithm.planner import sample_clients
from ..algorithm.sanitize import screen
from ..comm.base import Communicator
from ..config import FaultsConfig, JobConfig
from ..errors import UserInputError
from ..io.checkpoint import CheckpointDir
from ..io.lock import RunLock
from ..io.space import DiskError, disk_errors, require_space, tensor_bytes
from ..methods import Exchanged, Report
from .agreement import agree, raise_on_all_ranks
from .chain import BaseChain
from .client import allocator_cap, peak_mem, reset_peak_mem
from .launch import idle_ranks_warning, raise_if_stopped
from .outputs import RunSummary, check_output_dir, check_shared_dir, finish, open_results
from .record import Laps, Log, RankRecord, client_arrays, own_losses, round_row
from .resume import (
    find_resume_point,
    new_run_id,
    rank_state,
    restarted_by_torchrun,
    settings_fingerprint,
)
from .setup import Run, set_up
from .trees import tree_to


def run_job(cfg: JobConfig, comm: Communicator, *, show_progress: bool = True) -> RunSummary | None:
    """Run the whole job on this rank. Returns the summary on rank 0, None elsewhere."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress display per job: ours, on rank 0
    log = Log(comm.rank == 0, show_bar=show_progress)
    lock = RunLock(cfg.output.dir)
    try:
        if cfg.central:  # the job's centralized limit: one process, the same samples (runtime/central.py)
            from .central import run_central

            return run_central(cfg, comm, log, lock)
        return _run(cfg, comm, log, lock)
    finally:
        lock.release()


def _run(cfg: JobConfig, comm: Communicator, log: Log, lock: RunLock) -> RunSummary | None:
    t_start = time.perf_counter()
    ckpt, point, run_id = _fresh_or_resumed(cfg, comm, log, lock)
    run = set_up(cfg, comm, log, point)
    idle = idle_ranks_warning(comm.world_size, cfg.clients.n)
    if idle:
        log(idle)
    method, start = run.method, point.round if point else 0
    writer, eval_losses = open_results(run, ckpt, point, run_id)
    if run.rank0:  # set-up: everything before round 1 (row 0's evaluation of the base included)
        writer.add_setup(time.perf_counter() - t_start, run.setup_phases, run.provenance)
    log.open_bar(cfg.rounds, done=start)
    trained_rounds, ckpt_s = 0, 0.0
    chain = BaseChain(cfg.checkpoint.full_every, resumed=point is not None)  # what checkpoints keep of the base
    for t in range(start + 1, cfg.rounds + 1):
        t_round, lap = _round_start()  # rank 0's seconds per phase (results.h5 rounds/<phase>)
        # ---- plan: who trains this round, at which batch size, ranks and precision (Algorithm 1) ----
        selected = sample_clients(cfg.clients.n, cfg.clients.fraction, seed=cfg.seed, round_idx=t)
        method.begin_round(t, selected)
        plans, infos, scores = run.planner.plan(comm, t)
        runnable = [c for c in selected if infos[c].fits]  # a plan that does not fit is not run: under-training
        if not runnable:
            _warn(run, writer, f"round {t}: none of the {len(selected)} selected servers has a plan that fits its "
                  "budgets, so none trains and the model stays as it is (raise clients.memory_gb or "
                  "plan.step_time_s, or lower lora.rank or train.batch_min; fedpipe plan shows the plans)")
        lap("plan_s")
        # ---- train: each rank its own servers, on their private shards ----
        updates, stats = _train(run, t, plans, runnable)
        lap("train_s")
        reports, waited = _report(run, updates, stats)  # every rank waits here for the slowest one
        lap("sync_s")
        contributors, rejected = _screen(run, t, runnable, reports)
        # ---- exchange and fold: combine the updates, then every base merges the same change ----
        agg_mem = reset_peak_mem(comm.device) if run.rank0 else False  # rank 0's peak from here to the merge
        ex = _exchange(run, t, plans, contributors, updates, reports)
        lap("exchange_s")
        for c in ex.late:
            rejected[c] = "not the norm it reported"
            log(f"round {t}: server {c}'s update left out (its norm differs from the one it reported)")
        trained_rounds += bool(contributors)
        method.end_round(t, contributors, reports)
        absorbed = run.bases.merge(ex.deltas, run.site_by_key, measure=cfg.quant.measure_absorbed)
        if cfg.checkpoint.enabled and method.checkpoints_base:
            chain.record(t, ex.deltas)
        lap("merge_s")
        agg_peak = peak_mem(comm.device, agg_mem) if run.rank0 else 0
        for c in stats:
            stats[c].bytes_up = ex.traffic["client_bytes_up"].get(c, 0)
        gathered = comm.gather_object(RankRecord(list(stats.values()), absorbed,
                                                 {p: run.bases.extra_bytes(p) for p in run.bases.views}, waited))
        # ---- evaluate and record ----
        lap("record_s")  # the gather of every rank's statistics (the row is built below)
        ev = run.evaluate() if (t % cfg.eval.every == 0 or t == cfg.rounds) else None
        lap("eval_s")
        if ev is not None:
            eval_losses.append(ev["loss"])
        err = None  # a disk that cannot take the round stops every rank with one message (exit 2)
        try:
            ckpt.wait()  # the last checkpoint, written while this round trained: whole, or its error raised
            lap("_checkpoint")
            ckpt_s += lap.seconds.pop("_checkpoint")
            if run.rank0:
                row, arrays = _round_record(run, t, selected, plans, infos, scores, ex, rejected, gathered, ev)
                lap("record_s")
                row.update(agg_peak_bytes=agg_peak, wall_s=time.perf_counter() - t_round, **lap.seconds)
                _append(writer, t, row, arrays)
                log.step(row)
        except DiskError as e:
            err = str(e)
        raise_on_all_ranks(comm, err)  # from here every rank holds each earlier checkpoint whole
        # ---- checkpoint: after rank 0's row of round t, so a checkpoint every rank holds has its row ----
        if cfg.checkpoint.enabled and (t % cfg.checkpoint.every == 0 or t == cfg.rounds):
            ckpt_s += _checkpoint(run, ckpt, chain, t, run_id, eval_losses, writer)
    log.close()
    final_dir = finish(run, writer, eval_losses, checkpoint_s=ckpt_s, flush_s=_last_checkpoint_written(run, ckpt))
    comm.barrier()
    if trained_rounds == 0 and cfg.rounds > start:
        raise UserInputError(f"no server trained in any of rounds {start + 1}..{cfg.rounds}: {NONE_TRAINED}")
    return RunSummary(run.out_dir / "results.h5", final_dir, eval_losses) if run.rank0 else None


def _round_start() -> tuple[float, Laps]:
    """A round's clock and laps; first, a SIGTERM or Ctrl-C whose exception was lost on the way (Python drops one
    raised inside a __del__ or a C callback) ends the run here, before the round starts."""
    raise_if_stopped()
    return time.perf_counter(), Laps()


def _fresh_or_resumed(cfg: JobConfig, comm: Communicator, log, lock: RunLock):
    """A fresh run, or the continuation of one (resume=true, or restarted by torchrun --max-restarts):
    the checkpoint folder, the checkpoint to continue from (None: fresh) and the run's id. Rank 0 holds the
    folder's lock from here to the end (one writer per output.dir)."""
    out_dir = Path(cfg.output.dir)
    ckpt = CheckpointDir(out_dir, comm.rank, comm.world_size)
    resuming = cfg.resume or restarted_by_torchrun()
    # before the lock: a folder that is refused is not touched at all (resuming: its results.h5 is the point)
    agree(comm, lambda: check_output_dir(out_dir, cfg.output.overwrite or resuming, cfg.output.foreign_files))
    agree(comm, lambda: lock.acquire(log))
    check_shared_dir(out_dir, comm)  # a multi-node job whose output.dir is node-local stops here
    point = find_resume_point(cfg, comm, out_dir, ckpt, log) if resuming else None
    return ckpt, point, point.state["run_id"] if point else new_run_id(comm)


def _append(writer, t: int, row, arrays) -> None:
    """Round t's row into results.h5, once the disk has room for it (HDF5 does not fail cleanly when the disk
    fills in the middle of an append): twice the file's mean growth per round, free."""
    grown = writer.path.stat().st_size // max(1, t)
    require_space(writer.path.parent, 2 * grown, f"round {t}'s row of results.h5")
    with disk_errors(writer.path.parent, f"round {t}'s row of results.h5"):
        writer.append_round(row, arrays)


NONE_TRAINED = ("no plan fitted its server's budgets, train.deadline_s cut every server short, or every update "
                "was left out (results.h5 records the rounds: the model is unchanged); see the warnings above")


def _checkpoint(run: Run, ckpt: CheckpointDir, chain: BaseChain, t: int, run_id: str, eval_losses: list[float],
                writer) -> float:
    """Start this rank's checkpoint of round t (rank 0: with the results.h5 snapshot): in the background while
    the next round trains when its state can be copied cheaply (the base's part is then the rounds' merged
    updates, already private copies), else written now. Its errors (a full disk) come from the next
    ckpt.wait(), where every rank stops alike. Returns the seconds this rank spent here."""
    t0 = time.perf_counter()
    state = rank_state(settings=settings_fingerprint(run.cfg), t=t, world_size=run.comm.world_size, run_id=run_id,
                       bases=run.bases, chain=chain, method=run.method, planner=run.planner, eval_losses=eval_losses,
                       profiles=run.profiles)
    private = _private(state)
    ckpt.save(t, state, results=writer.path if run.rank0 else None)
    if not private:  # it shares tensors the next round changes (the base's weights, a big global adapter)
        ckpt.wait_quietly()
    return time.perf_counter() - t0


def _last_checkpoint_written(run: Run, ckpt: CheckpointDir) -> float:
    """Wait for the last checkpoint's background write (part of finishing, not of a round); a write that failed
    stops every rank alike. Returns the seconds waited."""
    err, t0 = None, time.perf_counter()
    try:
        ckpt.wait()
    except DiskError as e:
        err = str(e)
    raise_on_all_ranks(run.comm, err)
    return time.perf_counter() - t0


PRIVATE_MAX = 256 * 2**20  # bytes of a checkpoint's state (besides the merged updates) copied for a background save


def _private(state: dict) -> bool:
    """Make `state` share no tensor with the running job, when that is cheap: the merged updates in its base
    part are copies already (runtime/chain.py); everything else is copied here unless it is a full base
    snapshot or over PRIVATE_MAX. Returns whether the state is now private."""
    base = state.get("base")
    rest = {k: v for k, v in state.items() if k != "base"}
    if (base is not None and base["full"] is not None) or tensor_bytes(rest) > PRIVATE_MAX:
        return False
    state.update(tree_to(rest, "cpu", copy=True))
    return True


def _warn(run: Run, writer, message: str) -> None:
    """A warning in the log and in results.h5 (root attribute `warnings`)."""
    run.log(f"warning: {message}")
    if run.rank0:
        writer.warn(message)


def _train(run: Run, t: int, plans, runnable: list[int]):
    """Local training of this rank's runnable servers, one after another, each at its base's precision."""
    cfg, updates, stats = run.cfg, {}, {}
    for c in runnable:
        if run.owner(c) != run.comm.rank:
            continue
        run.bases.use(plans[c].precision)
        updates[c], stats[c] = run.method.train(
            c, plans[c], run.shards[c], round_idx=t, pad_id=run.pad_id, device=run.comm.device,
            slowdown=run.profiles[c].slowdown, deadline_s=cfg.train.deadline_s,
            mem_budget_bytes=allocator_cap(run.comm.device, len(run.my_clients), run.profiles[c].mem_budget_bytes))
    return updates, stats


def _report(run: Run, updates: dict[int, ClientUpdate], stats: dict) -> tuple[dict[int, Report], float]:
    """Each server reports whether it finished and its update's norm (rank 0 re-checks what it receives);
    the reports are all-gathered, so every rank judges alike. Also returns how long this rank waited there
    for the slowest one."""
    faults = run.cfg.faults
    for c in updates:
        _inject_faults(faults, c, updates[c])
        stats[c].update_norm = run.method.update_norm(c, updates[c])
        if c in faults.misreport_clients:
            stats[c].update_norm /= faults.scale
    reports: dict[int, Report] = {}
    t0 = time.perf_counter()  # this rank now waits for the slowest one: the round's straggler wait, measured
    for part in run.comm.all_gather_object({c: Report(st.completed, st.prune_norm, st.update_norm)
                                            for c, st in stats.items()}):
        reports.update(part)
    return reports, time.perf_counter() - t0


def _screen(run: Run, t: int, runnable: list[int], reports: dict[int, Report]):
    """The servers whose updates are combined: those that finished, less what sanitization leaves out (the
    same verdicts on every rank, from the reports). Returns them and {server: why it was left out}."""
    contributors = [c for c in runnable if reports[c].completed]
    rejected: dict[int, str] = {}
    if run.cfg.aggregation.sanitize and contributors:
        verdicts = screen([reports[c].update_norm for c in contributors], max_ratio=run.cfg.aggregation.max_norm_ratio)
        rejected = {c: v for c, v in zip(contributors, verdicts) if v != "ok"}
        contributors = [c for c in contributors if c not in rejected]
        for c, why in rejected.items():
            run.log(f"round {t}: server {c}'s update left out ({why}: norm {reports[c].update_norm:.4g})")
    return contributors, rejected


def _exchange(run: Run, t: int, plans, contributors: list[int], updates, reports) -> Exchanged:
    """The method's exchange of the contributors' updates; nobody finished: the base stays as it is."""
    if not contributors:
        return Exchanged({}, {"client_bytes_up": {}, "bytes_down_payload": 0, "wait_s": 0.0, "agg_s": 0.0})
    claims = {c: reports[c].update_norm for c in contributors} if run.cfg.aggregation.sanitize else None
    return run.method.exchange(t, plans, contributors, updates, claims)


def _round_record(run: Run, t: int, selected, plans, infos, scores, ex: Exchanged, rejected,
                  gathered: list[RankRecord], ev):
    """Rank 0: round t's row and per-server arrays for results.h5 (docs/hdf5_schema.md), from every rank's
    record and the round's evaluation `ev` (None: not evaluated)."""
    n, precisions = run.cfg.clients.n, run.precisions
    all_stats = {s.client: s for part in gathered for s in part.stats}
    absorbed_by, extra_by = {}, {}
    for part in gathered:
        absorbed_by.update(part.absorbed)
        extra_by.update(part.extra_bytes)
    row = round_row(t, eval=ev, n_selected=len(selected), n_clients=n, stats=all_stats, traffic=ex.traffic)
    row["wait_s"] = max(part.waited_s for part in gathered)  # the rank that waited longest for the slowest one
    row["recv_wait_s"] = ex.traffic["wait_s"]  # rank 0 blocked on receives inside the exchange
    in_use = set(precisions) | {run.eval_precision}
    # NaN when nothing was merged or quant.measure_absorbed is off (np.min keeps the NaN)
    row["absorbed_min"] = float(np.min([absorbed_by[p] for p in in_use])) if ex.deltas else math.nan
    row["n_rejected"] = len(rejected)
    arrays = client_arrays(n, run.L, run.sites, plans, selected, all_stats)
    arrays["absorbed"] = np.array([absorbed_by[p] if ex.deltas else math.nan for p in precisions])
    arrays["extra_bytes_per_param"] = np.array([extra_by[p] / run.bases.base_params for p in precisions])
    arrays["importance"] = scores
    arrays["pred_step_s"] = np.array([i.predicted_step_s for i in infos])
    arrays["pred_mem_bytes"] = np.array([i.predicted_mem_bytes for i in infos], dtype=np.int64)
    arrays.update(own_losses(ev, n))
    arrays["rejected"] = np.array([int(c in rejected) for c in range(n)], dtype=np.int8)
    run.method.record(arrays)
    return row, arrays


def _inject_faults(f: FaultsConfig, c: int, update: ClientUpdate) -> None:
    """faults.*: turn a server's update into NaN or scale it (drills and tests of the sanitization)."""
    factor = math.nan if c in f.nan_clients else f.scale if c in f.scale_clients else None
    if factor is None:
        return
    for key, v in update.factors.items():
        if isinstance(v, dict):
            update.factors[key] = {part: t * factor for part, t in v.items()}
        elif torch.is_tensor(v):
            update.factors[key] = v * factor
        else:
            update.factors[key] = (v[0] * factor, v[1])  # scaling B scales the product
