"""Campaigns: one sweep file names every run a study needs; one command runs the points still to do.

    fedpipe sweep jobs/paper_small.yaml                # every point here, one after another
    fedpipe sweep jobs/paper_small.yaml --list         # the points and what state each is in
    fedpipe sweep jobs/paper_small.yaml --jobs 2 --only method=fedpipe   # 2 points at a time, a subset
    fedpipe sweep jobs/paper_small.yaml --slurm        # one Slurm array task per point still to do
                                                       # (slurm/fedpipe_sweep.sh runs `--point I --args`)

A sweep file:

    base: jobs/e2e_stories260k.yaml       # the job every point starts from (a path relative to the working dir)
    out: runs/paper_small                 # point p writes <out>/<p.name>/ (results.h5, final/, checkpoint/)
    overrides: [rounds=20]                # dotted.key=value for every point
    sweeps:                               # each: the cross product of its axes (later axes vary fastest)
      - axes:
          method: [fedpipe, lora]         # a list: values of the config key `method`
          setting:                        # a mapping: named variants, each a list of overrides
            ideal: [clients.slowdown=1, clients.memory_gb=24]
            heterogeneous: []
          seed: [0, 1, 2]

A point's name is its labels joined (`method-fedpipe_setting-ideal_seed-0`). Its state comes from its folder:
done (results.h5 finished with the campaign's rounds), partial (a checkpoint to continue from: the run goes on
with resume=true, also when the sweep's `rounds` grew), or todo (nothing usable: it starts fresh, replacing
what an attempt that died before its first checkpoint left). So the same command can be repeated, on a
laptop or as a job array, until every point is done.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError, UserInputError
from .job import load_job

_NAME_OK = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass
class Point:
    index: int
    name: str
    labels: dict[str, str]  # axis -> the value's label
    overrides: list[str]  # the campaign's, then each axis value's, then output.dir
    out_dir: Path


@dataclass
class Campaign:
    path: Path
    base: str
    out: Path
    points: list[Point]

    def job_args(self, p: Point, st: str | None = None) -> list[str]:
        """`fedpipe run` arguments of point p in its state `st` (default: read now): resume=true when it has a
        checkpoint, output.overwrite=true for a point to do. A done point has none: it is never run again."""
        st = state(self, p) if st is None else st
        if st == "done":
            raise ValueError(f"point {p.name} is done; it has no run arguments")
        return [self.base, *p.overrides, *(["resume=true"] if st == "partial" else ["output.overwrite=true"])]


def load_campaign(path: str | Path) -> Campaign:
    """Read and check a sweep file; every point's job is validated (a bad point fails before any runs)."""
    path = Path(path)
    where = f"sweep file {str(path)!r}"
    if not path.is_file():
        raise UserInputError(f"{where} does not exist; give a YAML sweep file such as jobs/paper_small.yaml")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserInputError(f"{where} is not valid YAML ({e})") from None
    unknown = set(spec) - {"base", "out", "overrides", "sweeps"} if isinstance(spec, dict) else {"(not a mapping)"}
    if unknown or "base" not in spec or "out" not in spec or not spec.get("sweeps"):
        raise UserInputError(f"{where}: needs `base` (a job file), `out` (a folder) and `sweeps` (a list of "
                             f"{{axes: ...}}), and nothing else (got unknown keys {sorted(unknown)})")
    common = _overrides(spec.get("overrides") or [], f"{where}: overrides")
    out = Path(spec["out"])
    points: list[Point] = []
    for i, sweep in enumerate(spec["sweeps"]):
        axes = sweep.get("axes") if isinstance(sweep, dict) else None
        if not isinstance(axes, dict) or not axes or set(sweep) != {"axes"}:
            raise UserInputError(f"{where}: sweeps[{i}] must be {{axes: {{name: values, ...}}}}")
        for combo in itertools.product(*(_axis_values(name, vals, f"{where}: sweeps[{i}].axes.{name}")
                                         for name, vals in axes.items())):
            labels = {name: label for name, (label, _) in zip(axes, combo)}
            name = "_".join(_NAME_OK.sub("-", f"{k}-{v}") for k, v in labels.items())
            if any(p.name == name for p in points):
                continue  # the same point in two sweeps: run once
            overrides = [*common, *(o for _, ovs in combo for o in ovs), f"output.dir={out / name}"]
            points.append(Point(len(points), name, labels, overrides, out / name))
    campaign = Campaign(path, str(spec["base"]), out, points)
    for p in points:
        try:
            load_job(campaign.base, p.overrides)
        except (ConfigError, UserInputError) as e:
            raise UserInputError(f"{where}: point {p.name}: {e}") from None
    return campaign


def _overrides(values, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) and "=" in v for v in values):
        raise UserInputError(f"{where} must be a list of dotted.key=value strings (got {values!r})")
    return list(values)


def _axis_values(name: str, values, where: str) -> list[tuple[str, list[str]]]:
    """[(label, overrides)] of one axis: a list of values of the config key `name`, or named variants."""
    if isinstance(values, dict) and values:
        return [(str(label), _overrides(ovs or [], f"{where}.{label}")) for label, ovs in values.items()]
    if isinstance(values, list) and values:
        return [("-".join(map(str, v)) if isinstance(v, list) else str(v), [f"{name}={_yaml_value(v)}"])
                for v in values]
    raise UserInputError(f"{where} must be a non-empty list of values or a mapping of named variants")


def _yaml_value(v) -> str:
    """v as the right-hand side of a dotted override (YAML flow style: 0, fedpipe, [8, 4, 4, 2])."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def state(campaign: Campaign, p: Point) -> str:
    """done | partial | todo, from the point's folder (see the module docstring)."""
    from .io.checkpoint import complete_rounds
    from .io.hdf5 import Results

    rounds = load_job(campaign.base, p.overrides).rounds
    results = p.out_dir / "results.h5"
    if results.is_file():
        try:
            r = Results(results)
            if r.attrs.get("finished") and r.n_rounds >= rounds:
                return "done"
        except Exception:  # a file cut short: whatever the checkpoints say decides
            pass
    held = complete_rounds(p.out_dir)
    return "partial" if held and max(held) <= rounds else "todo"


def table(campaign: Campaign) -> str:
    states = [state(campaign, p) for p in campaign.points]
    lines = [f"{campaign.path}: {len(states)} points, {states.count('done')} done, {states.count('partial')} "
             f"partial, {states.count('todo')} to do -> {campaign.out}"]
    lines += [f"  [{p.index:3d}] {s:7s} {p.name}" for p, s in zip(campaign.points, states)]
    return "\n".join(lines)


@contextlib.contextmanager
def point_lock(p: Point):
    """Hold point p's lock (<out>/.<name>.sweep.lock, flock) for as long as this sweep works on it; yields
    False, holding nothing, when another sweep process holds it. The kernel drops it when its holder dies."""
    import fcntl

    p.out_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p.out_dir.parent / f".{p.name}.sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def run_local(campaign: Campaign, nproc: int = 1, log=print, todo: list[Point] | None = None, jobs: int = 1) -> int:
    """Run every point not done (or those of `todo`), `jobs` at a time (each with torchrun and `nproc` ranks when
    nproc > 1), saying each point's time and the campaign's ETA as points finish. Each point's state is read
    again under its lock right before it runs, so a point another sweep process is running is skipped, and one
    that finished since the list was made is never run again. Returns the number of points that failed; a failed
    point does not stop the others (rerun to retry)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from .runtime.record import _clock  # the run log's h/m/s format

    if todo is None:
        todo = [p for p in campaign.points if state(campaign, p) != "done"]
        log(f"sweep: {len(campaign.points) - len(todo)} of {len(campaign.points)} points done; running {len(todo)}"
            + (f", {jobs} at a time" if jobs > 1 else ""))
    if todo and nproc == 1:
        note = serial_wait_note(campaign, todo[0])
        if note:
            log(note)
    t0, took, lock = time.monotonic(), [], threading.Lock()

    def one(k: int, p: Point) -> int:
        started = time.monotonic()
        rc = _run_point(campaign, p, f"[{k}/{len(todo)}]", nproc, log)
        if rc is None:  # skipped
            return 0
        with lock:
            took.append(time.monotonic() - started)
            left = len(todo) - len(took)
            eta = sum(took) / len(took) * left / max(1, jobs)
            log(f"sweep [{k}/{len(todo)}] {p.name}: {'done' if rc == 0 else f'failed (exit {rc})'} in "
                f"{_clock(took[-1])}; {len(took)} of {len(todo)} run in {_clock(time.monotonic() - t0)}"
                + (f", ETA {_clock(eta)}" if left else ""))
            if rc != 0:
                log(f"sweep: {p.name}'s log: {p.out_dir.parent / f'{p.name}.log'}")
        return int(rc != 0)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return sum(pool.map(lambda kp: one(*kp), enumerate(todo, 1)))


def _run_point(campaign: Campaign, p: Point, tag: str, nproc: int, log) -> int | None:
    """Point p run to its end under its lock: the exit code, or None when it was skipped."""
    with point_lock(p) as mine:
        if not mine:
            log(f"sweep {tag} {p.name}: another sweep process is running it; skipped")
            return None
        st = state(campaign, p)
        if st == "done":
            log(f"sweep {tag} {p.name}: finished meanwhile; skipped")
            return None
        args = campaign.job_args(p, st)
        log(f"sweep {tag} {p.name}" + (" (resuming)" if st == "partial" else ""))
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        p.out_dir.mkdir(parents=True, exist_ok=True)
        with open(p.out_dir.parent / f"{p.name}.log", "a") as out:
            return subprocess.run([*launcher, "-m", "fedpipe_dist", "run", *args, "--no-progress"], stdout=out,
                                  stderr=subprocess.STDOUT).returncode


def serial_wait_note(campaign: Campaign, p: Point) -> str | None:
    """A note when points run on one process while their servers have slowdowns that are waited out
    (clients.throttle=sleep): one process trains its servers one after another, so each round takes the sum
    of their times, not the slowest one's."""
    from .config import per_client_values

    cfg = load_job(campaign.base, p.overrides)
    slow = per_client_values(cfg.clients.slowdown, cfg.clients.n, "clients.slowdown", seed=cfg.seed)
    if cfg.clients.n < 2 or cfg.clients.throttle != "sleep" or max(slow) <= 1:
        return None
    return (f"sweep: points run on 1 process, so each round trains the {cfg.clients.n} servers one after another "
            f"and waits out every slowdown ({', '.join(f'{x:g}' for x in slow)}) in turn; --nproc "
            f"{cfg.clients.n} runs them side by side, or clients.throttle=clock charges the slowdowns without "
            "waiting")


def select(campaign: Campaign, only: list[str]) -> list[Point]:
    """The points whose labels match every `axis=label` of `only` (e.g. method=fedpipe seed=0)."""
    axes = sorted({a for p in campaign.points for a in p.labels})
    points = campaign.points
    for cond in only:
        axis, sep, label = cond.partition("=")
        if not sep or axis not in axes:
            raise UserInputError(f"--only {cond!r}: write axis=label with an axis of {campaign.path} ({axes})")
        labels = sorted({p.labels[axis] for p in campaign.points if axis in p.labels})
        if label not in labels:
            raise UserInputError(f"--only {cond!r}: axis {axis!r} has labels {labels}")
        points = [p for p in points if p.labels.get(axis) == label]
    return points


def submit_slurm(campaign: Campaign, sbatch_args: list[str], script: Path, log=print) -> str | None:
    """One `sbatch --array` over the points not done, each task running slurm/fedpipe_sweep.sh on its index.
    Returns the array job's id (None when everything is done)."""
    todo = [p.index for p in campaign.points if state(campaign, p) != "done"]
    if not todo:
        log(f"sweep: all {len(campaign.points)} points are done")
        return None
    cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, todo))}", *sbatch_args, str(script),
           str(campaign.path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserInputError(f"sweep: sbatch failed ({r.stderr.strip()}); command: {' '.join(cmd)}")
    job = r.stdout.strip().split(";")[0]
    log(f"sweep: submitted array job {job} with {len(todo)} task(s) (points {todo})")
    return job
