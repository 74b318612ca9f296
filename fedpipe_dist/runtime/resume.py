"""Resuming a run from its per-round checkpoints (io/checkpoint.py holds the files; this module what is in them).

    point = find_resume_point(cfg, comm, out_dir, ckpt, log)   # None: a fresh start
    ...
    apply_state(point.state, ...)                              # once the model and bases are built
    for t in range(point.round + 1, cfg.rounds + 1): ...

A resume happens when the job says resume=true, or on its own in a process that torchrun restarted
(TORCHELASTIC_RESTART_COUNT > 0, under --max-restarts). Every rank agrees on the newest round that all ranks
of one world size hold a checkpoint of, loads its own file (or, on another number of ranks, composes its
state from the files of the ranks that hosted its servers: elastic resume), and checks that it belongs to
this job (the same run and settings; only the keys in MAY_CHANGE may differ). Any problem is a
UserInputError on every rank (exit code 2) raised before anything on disk changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithm.cost import StepFit
from ..config import JobConfig
from ..errors import UserInputError
from ..io.checkpoint import CheckpointDir, complete, leftovers, scan, snapshots
from .agreement import raise_on_all_ranks
from .chain import chain_rounds, replay, resolve_base
from .heterogeneity import ServerProfile

_ROUND = re.compile(r"round(\d{6})\.")

# Settings a resumed run may change: they do not alter the rounds already done or the ones to come.
MAY_CHANGE = ("rounds", "resume", "output.", "comm.", "checkpoint.", "generation.", "eval.every")


def restarted_by_torchrun() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def settings_fingerprint(cfg: JobConfig) -> dict[str, str]:
    """Every setting that must stay the same across a resume, as dotted key -> JSON value."""
    flat: dict[str, str] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)

    walk(cfg.to_dict(), "")
    # a schedule over the rounds (train.lr_schedule=cosine) sets every round's lr from `rounds`: then it is fixed
    may_change = MAY_CHANGE if cfg.train.lr_schedule == "constant" else tuple(m for m in MAY_CHANGE if m != "rounds")
    return {k: v for k, v in flat.items() if not any(k == m or (m.endswith(".") and k.startswith(m))
                                                     for m in may_change)}


@dataclass
class ResumePoint:
    round: int
    state: dict  # this rank's checkpoint


def find_resume_point(cfg: JobConfig, comm, out_dir: Path, ckpt: CheckpointDir, log) -> ResumePoint | None:
    """The checkpoint this rank continues from, or None for a fresh start (the caller then replaces whatever
    an earlier attempt left in out_dir). Raises UserInputError on every rank when out_dir cannot be resumed.

    Elastic: the newest round whose checkpoint every rank of *some* world size wrote is taken, whatever the
    world size now; on another number of ranks each rank composes its state from the files of that round
    (compose_state)."""
    results = out_dir / "results.h5"
    # what each rank sees (node-local folders: each node its own ranks' files), joined
    seen = comm.all_gather_object((scan(ckpt.dir), snapshots(ckpt.dir), [p.name for p in leftovers(ckpt.dir)]))
    found: dict[int, dict[int, set[int]]] = {}
    snaps: set[int] = set()
    names: set[str] = set()
    for f, sn, nm in seen:
        for t, by_w in f.items():
            for w, ranks in by_w.items():
                found.setdefault(t, {}).setdefault(w, set()).update(ranks)
        snaps |= sn
        names |= set(nm)
    done = complete(found, snaps)
    # the run this folder holds: results.h5's run id (rank 0's node); a file of another run is never used
    run_id = comm.broadcast_object(_run_id_of(results) if comm.rank == 0 else None)
    if done and max(done) > cfg.rounds:
        raise UserInputError(f"resume: the newest checkpoint is of round {max(done)}, past rounds={cfg.rounds}; set "
                             f"rounds >= {max(done)} to continue this run")
    settings = settings_fingerprint(cfg)
    t0, w0, damaged = _newest_usable(comm, ckpt, done, run_id, log, settings)
    err, start_fresh = None, False
    if comm.rank == 0:
        if t0 is None and damaged and all(" was written with other settings " in d for d in damaged):
            # every round differs only in its settings: the job changed, not the files; say which keys
            newest = max(done)
            err = _mismatch(ckpt.load(newest, 0, sorted(done[newest])[-1]), settings)
        elif t0 is None and damaged:
            named = "; ".join(dict.fromkeys(damaged))
            err = (f"resume: no intact checkpoint of this run in {str(ckpt.dir)!r}: {named}. Nothing was changed; "
                   "start over with output.overwrite=true, or use a new output.dir")
        elif t0 is None:
            first = cfg.checkpoint.every if cfg.checkpoint.enabled else 1  # the first round a checkpoint holds
            err, start_fresh = _nothing_complete(first, results, ckpt.dir, names)
        else:
            err = _check_snapshot(ckpt.results_path(t0), t0)
    err, start_fresh = comm.broadcast_object((err, start_fresh))
    if err:
        raise UserInputError(err)
    if start_fresh:
        log(f"resume: nothing to resume in {out_dir} yet; starting the run from round 1")
        return None
    if w0 != comm.world_size:
        log(f"resume: round {t0}'s checkpoint was written by {w0} rank(s), this job has {comm.world_size}; each "
            "rank takes its servers' state from the files of the ranks that hosted them")
    err, state = None, None
    try:
        if w0 == comm.world_size:
            state = ckpt.load(t0)
            state["base"] = resolve_base(ckpt, t0, w0, [comm.rank])
        else:
            state = compose_state(ckpt, t0, w0, hosted=[c for c in range(cfg.clients.n)
                                                        if c % comm.world_size == comm.rank])
        err = _mismatch(state, settings)
    except UserInputError as e:
        err = str(e)
    raise_on_all_ranks(comm, err)
    ids = comm.all_gather_object(state["run_id"])
    raise_on_all_ranks(comm, None if len(set(ids)) == 1 else
                    f"resume: the ranks' checkpoints of round {t0} come from different runs ({sorted(set(ids))}); "
                    "start over with output.overwrite=true")
    return ResumePoint(t0, state)


def _newest_usable(comm, ckpt: CheckpointDir, done: dict[int, list[int]], run_id: str | None, log,
                   settings: dict | None = None):
    """The newest round (and its world size) whose files are intact (checksums) and all this run's (its run id
    and, inside every rank file and chain link, the `settings` fingerprint of this job), falling back round by
    round: (t0, w0, what was wrong with the newer ones); (None, None, ...) when none is."""
    damaged: list[str] = []
    for t in sorted(done, reverse=True):
        w = comm.world_size if comm.world_size in done[t] else done[t][-1]
        ranks = [comm.rank] if w == comm.world_size else list(range(w))
        bad = ckpt.verify(t, w, ranks)
        ids: dict[tuple[int, int], tuple] = {}  # (round, rank) -> (run id, settings), of every file the chains read
        for r in ranks if not bad else ():  # the files its base state is built from (runtime/chain.py)
            bad += _chain_problems(ckpt, t, w, r, ids)
        bad = sorted({b for part in comm.all_gather_object(bad) for b in part})
        what = "is damaged"
        if not bad:  # intact: are they all this run's? (files of another run carry valid checksums too)
            anchor = run_id or comm.broadcast_object(_file_run_id(ckpt, t, w) if comm.rank == 0 else None)
            bad = _foreign(ckpt, t, w, ids, anchor, settings)
            bad = sorted({b for part in comm.all_gather_object(bad) for b in part})
            what = "holds another run's files"
        if not bad:
            return t, w, damaged
        damaged += bad
        log(f"resume: round {t}'s checkpoint {what} ({'; '.join(bad)}); trying the one before")
    return None, None, damaged


def compose_state(ckpt: CheckpointDir, t0: int, w0: int, hosted: list[int]) -> dict:
    """This rank's state after round t0 from the files of the w0 ranks that wrote it: what every rank holds
    alike (the method's state, the planner's ranks, eval losses, profiles, RNG) from old rank 0; each hosted
    server's importance state from the rank that hosted it (server c ran on rank c mod w0); the base's fp32
    weights and merged residuals from a rank that kept them (every rank merged the same updates; resolve_base).
    Files are memory-mapped, so only the tensors taken are read."""
    files = {r: ckpt.load(t0, r, w0) for r in range(w0)}
    state = dict(files[0])
    state["importance"] = {c: files[c % w0]["importance"][c] for c in hosted}
    state["servers"] = {c: files[c % w0]["servers"][c] for c in hosted if c in files[c % w0].get("servers", {})}
    state["step_times"] = {c: files[c % w0]["step_times"][c] for c in hosted
                           if c in files[c % w0].get("step_times", {})}
    state["base"] = resolve_base(ckpt, t0, w0, list(range(w0)))
    return state


def _run_id_of(results: Path) -> str | None:
    """The run id in a results.h5 (None: no file, or none readable)."""
    import h5py

    try:
        with h5py.File(results, "r", locking=False) as f:
            rid = f.attrs.get("run_id")
    except Exception:  # h5py raises OSError, KeyError, ValueError for a damaged file
        return None
    return rid.decode() if isinstance(rid, bytes) else (str(rid) if rid is not None else None)


def _file_run_id(ckpt: CheckpointDir, t: int, w: int) -> str | None:
    """The run id inside rank 0's file of round t (of w ranks): the anchor when results.h5 names none."""
    try:
        return ckpt.load(t, 0, w).get("run_id")
    except UserInputError:
        return None


def _foreign(ckpt: CheckpointDir, t: int, w: int, ids: dict[tuple[int, int], tuple], run_id: str | None,
             settings: dict | None = None) -> list[str]:
    """The files round t's state would be read from whose run id, inside the checksummed bytes, is not `run_id`,
    or whose settings fingerprint is not `settings`: `ids` holds (run id, settings) of this rank's share of the
    rank files and the chain links they continue (as _chain_problems read them), and rank 0 adds its results
    snapshot (its run id). Files of another run of the same job, which a checksum cannot tell apart."""
    out = []
    for (tt, r), (other, then) in sorted(ids.items()):
        path = str(ckpt.path(tt, r, w))
        if run_id is not None and other != run_id:
            out.append(f"{path!r} belongs to run {other}, not to this folder's run {run_id}")
        elif settings is not None and then is not None and then != settings:
            diff = _settings_diff(then, settings)
            out.append(f"{path!r} was written with other settings ({', '.join(diff[:3])}"
                       f"{' ...' if len(diff) > 3 else ''} differ)")
    if ckpt.rank == 0 and run_id is not None:
        other = _run_id_of(ckpt.results_path(t))
        if other is not None and other != run_id:
            out.append(f"{str(ckpt.results_path(t))!r} belongs to run {other}, not to this folder's run {run_id}")
    return out


def _chain_problems(ckpt: CheckpointDir, t: int, w: int, rank: int, run_ids: dict | None = None) -> list[str]:
    """What is damaged or missing among the earlier files round t's base state needs (rank `rank` of `w`);
    `run_ids` collects the run id of each file read (chain_rounds)."""
    try:
        return chain_rounds(ckpt, t, w, rank, run_ids)[1]
    except UserInputError as e:  # an earlier file of the chain that cannot be read
        return [str(e)]


def _nothing_complete(first: int, results: Path, ckpt_dir: Path, names: set[str]) -> tuple[str | None, bool]:
    """No round has every rank's checkpoint: (error, start fresh). Starting over is right only when nothing
    could be continued: what a run that died before its first checkpoint completed leaves (results.h5
    absent, or readable with no more rounds than that checkpoint's, and files of that round at most, such
    as a snapshot still named .tmp). Anything else may be recoverable by hand: refused, naming it, and
    nothing is deleted. `first`: the first round the job checkpoints."""
    n = _rounds_in(results)
    rounds = {int(m.group(1)) for name in names if (m := _ROUND.match(name))}
    if (n is None or 0 <= n <= first) and all(t <= first for t in rounds):
        return None, True
    shown = ", ".join(sorted(names)[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    what = "cannot be read" if n == -1 else "is missing" if n is None else f"holds {n} round(s)"
    return (f"resume: {str(results)!r} {what}, and {str(ckpt_dir)!r} has no round that every rank checkpointed "
            f"({shown or 'no files'}; checkpoint.enabled was false, a rank's files were removed, or they are "
            "damaged). Nothing was changed; start over with output.overwrite=true (it replaces them), or use a "
            "new output.dir"), False


def _rounds_in(results: Path) -> int | None:
    """Training rounds in a results.h5: None when there is no file, -1 when it cannot be read."""
    if not results.exists():
        return None
    import h5py

    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["rounds"]["round"][()] > 0).sum())
    except Exception:  # h5py raises OSError, KeyError, ValueError for a damaged file
        return -1


def _check_snapshot(path: Path, t0: int) -> str | None:
    """The results.h5 copy a resume will put back must be readable, of this schema, and end at round t0."""
    import h5py

    from ..io.schema import SCHEMA_VERSION

    fix = (f"delete {str(path.parent)!r}/round{t0:06d}.* to resume from the round before, or start over with "
           "output.overwrite=true")
    try:
        with h5py.File(path, "r", locking=False) as f:
            version = int(f.attrs.get("schema_version", -1))
            rounds = f["rounds"]["round"][()].tolist()
    except Exception as e:  # h5py raises OSError, KeyError, ValueError for a damaged file
        return f"resume: the results.h5 snapshot {str(path)!r} cannot be read ({type(e).__name__}); {fix}"
    if version != SCHEMA_VERSION:
        return (f"resume: {str(path)!r} has schema version {version}, this code writes {SCHEMA_VERSION}; finish the "
                "run with the version that started it, or start over with output.overwrite=true")
    if rounds != list(range(t0 + 1)):
        return f"resume: the results.h5 snapshot {str(path)!r} does not end at round {t0} (rounds {rounds[-3:]}); {fix}"
    return None


def _settings_diff(then: dict, now: dict) -> list[str]:
    """The settings keys whose values differ between two fingerprints (settings_fingerprint), sorted."""
    return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))


def _mismatch(state: dict, now: dict[str, str]) -> str | None:
    """An error naming the settings that differ between a checkpoint and this job's fingerprint `now`."""
    then = state["settings"]
    diff = _settings_diff(then, now)
    if diff:
        shown = "; ".join(f"{k}: {then.get(k, '(unset)')} then, {now.get(k, '(unset)')} now" for k in diff[:5])
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        why = (" (train.lr_schedule decays the lr over `rounds`, so a scheduled run keeps its rounds)"
               if "rounds" in diff else "")
        return (f"resume: this job's settings differ from the run's ({shown}{more}){why}; resume with the same job "
                f"(only {', '.join(m.rstrip('.') + ('.*' if m.endswith('.') else '') for m in MAY_CHANGE)} may "
                "change) or start a new output.dir")
    return None


def new_run_id(comm) -> str:
    return comm.broadcast_object(uuid.uuid4().hex[:16] if comm.rank == 0 else None)


# ---- what a rank's checkpoint holds --------------------------------------------------------------------------


def rank_state(*, settings: dict[str, str], t: int, world_size: int, run_id: str, bases, chain, method, planner,
               eval_losses: list[float], profiles) -> dict:
    """Everything this rank needs to continue after round t (the base's part from `chain`, runtime/chain.py)."""
    np_state = np.random.get_state()
    return {
        "run_id": run_id,
        "world_size": world_size,
        "settings": settings,  # settings_fingerprint of the job
        "profiles": [dataclasses.asdict(p) for p in profiles],
        "base": chain.entry(t, bases) if method.checkpoints_base else None,
        "method": method.state_dict(),  # the method's own state (its global adapter, ft's parameters, ...)
        "servers": method.server_states(),  # what each hosted server keeps itself (its AdamW moments, ...)
        "importance": {c: {"ibar": torch.from_numpy(st.ibar), "ubar": torch.from_numpy(st.ubar),
                           "sv": torch.from_numpy(st.sv)} for c, st in planner.states.items()},
        "client_ranks": list(planner.client_ranks),
        # plan.step_cost=measured: the step-cost fits so far, whether fitting has closed (plan.step_fit=round1), and
        # each hosted server's timed steps not yet fitted
        "step_fits": [dataclasses.asdict(f) for f in planner.fits],
        "step_fits_closed": planner.fits_closed,
        "step_times": dict(planner.timed),
        "eval_losses": list(eval_losses),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                "python": random.getstate()},
    }


def saved_profiles(state: dict) -> list[ServerProfile]:
    """The profiles measured when the run started: a resumed run plans with them, not with new measurements."""
    return [ServerProfile(**p) for p in state["profiles"]]


def apply_state(state: dict, *, bases, method, planner) -> list[float]:
    """Put this rank's checkpoint back into the bases, the method and the planner, and the random generators.
    Returns the eval losses recorded so far."""
    if state["base"] is not None:
        replay(bases, state["base"])
    method.load_state_dict(state["method"])
    method.load_server_states(state.get("servers", {}))
    if set(state["importance"]) != set(planner.states):
        raise UserInputError("resume: the checkpoint's servers are not the ones this rank hosts; resume with the same "
                             "clients.n")
    for c, st in state["importance"].items():
        planner.states[c].ibar, planner.states[c].ubar = st["ibar"].numpy().copy(), st["ubar"].numpy().copy()
        planner.states[c].sv = st["sv"].numpy().copy()
    planner.client_ranks = list(state["client_ranks"])
    planner.fits = [StepFit(**f) for f in state["step_fits"]]
    planner.fits_closed = bool(state["step_fits_closed"])
    planner.timed = {c: list(v) for c, v in state.get("step_times", {}).items()}
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(rng["python"])
    return [float(x) if x is not None else math.nan for x in state["eval_losses"]]
