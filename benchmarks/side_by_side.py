"""Two jobs' measured step times at the same moment: each pair runs both at once, one per core (issue 27).

Run on demand from the repository root, with nothing else of ours running (it takes both cores):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/side_by_side.py --stories-path ../shared/data \\
        --profile h4 --a lora_hb --b fedpipe --pairs 4 --rounds 6

Why: on a shared VM a core's speed drifts by 10-50 % over tens of seconds, so two runs made one after the other
(time_to_quality's measured clock) differ by the drift as much as by the methods. Here the two runs of a pair
start together, each pinned to its own core (taskset) with one thread, and the pair's cores swap on every
other pair: a drift of the machine lands on both at once, and a core that is slower than the other lands on
each method equally often. Two jobs with the same plans (lora_hb and FedPipe's default on these profiles) have
the same work, so the ratio of their step times is the cost of what differs between them.

Each run is time_to_quality's job for the profile (the same overrides, clients.throttle=clock) for --rounds
rounds, evaluated after the last only (pass eval.every=1 to evaluate every round as time_to_quality does). Per
pair: B's / A's seconds per sample trained on each server (local time over samples x slowdown, rounds 1 on,
averaged over rounds) and B's / A's measured clock (the summed round times, time_to_quality's time_s; B's over
its first --b-rounds rounds where it reaches the target sooner than A).
Reported: those ratios per pair, their geometric mean and range, each job's eval loss after the last round, and,
for scale, how far apart the two cores were (A's clock on the second core over A's clock on the first, mean over
the pairs). With --rounds set to the round at which both jobs first reach a target loss (time_to_quality's
rounds to LoRA's loss, the same for A and B when their plans are the same), A's clock over B's is B's
time-to-quality speedup over A on the measured clock, both taken under the same load.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _jobs import job_command, job_env, write_json  # noqa: E402
from time_to_quality import ABLATION, METHODS, PROFILES, job_args  # noqa: E402

from fedpipe_dist.analysis.runs import round_train_s  # noqa: E402
from fedpipe_dist.io.hdf5 import Results  # noqa: E402

ROWS = {**METHODS, **ABLATION}


def start(job: list[str], core: int, log: Path) -> subprocess.Popen:
    """The job (fedpipe run's arguments) started pinned to `core`, its stderr into `log`."""
    with log.open("w") as err:  # the child keeps its own copy of the file
        return subprocess.Popen(["taskset", "-c", str(core), *job_command(job)], cwd=REPO, env=job_env(),
                                stdout=subprocess.DEVNULL, stderr=err)


def per_sample_s(r: Results) -> np.ndarray:
    """[server] seconds per sample trained, slowdown taken out, averaged over rounds 1 on."""
    c = r.clients
    local = np.asarray(c["local_s"][1:], dtype=float)
    slow = np.asarray(r.profile["slowdown"], dtype=float)
    return np.nanmean(local / (np.asarray(c["samples"][1:], dtype=float) * slow[None, :]), axis=0)


def clock_s(r: Results, rounds: int | None = None) -> float:
    """The measured clock: the summed round times (time_to_quality's time_s), over the first `rounds` rounds
    (all when None)."""
    t = np.asarray(round_train_s(r), dtype=float)  # row 0 is the base (no training)
    return float(np.sum(t if rounds is None else t[:rounds + 1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"),
                    help="folder holding models/stories260K-hf and e2e/ (default $FEDPIPE_SHARED_DATA)")
    ap.add_argument("--profile", default="h4", choices=list(PROFILES))
    ap.add_argument("--a", default="lora_hb", choices=list(ROWS), help="the reference job (a method or ablation row)")
    ap.add_argument("--b", default="fedpipe", choices=list(ROWS), help="the job measured against it")
    ap.add_argument("--pairs", type=int, default=4, help="pairs run (cores swap every pair; use an even number)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--b-rounds", type=int, default=None,
                    help="B's clock over its first N rounds only (default --rounds): where B reaches the target "
                         "sooner than A, the round it reaches it, so that A's clock over B's is its speedup")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cores", nargs=2, type=int, default=[0, 1])
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "side_by_side"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "side_by_side.json"))
    ap.add_argument("extra", nargs="*", help="more dotted overrides for both jobs")
    a = ap.parse_args(argv)
    if a.b_rounds is not None and not 1 <= a.b_rounds <= a.rounds:
        raise SystemExit(f"side_by_side: --b-rounds {a.b_rounds} must lie in 1..--rounds ({a.rounds})")
    if not a.stories_path or not (Path(a.stories_path) / "models" / "stories260K-hf").is_dir():
        raise SystemExit("side_by_side: needs the pretrained stories260K and E2E data; pass --stories-path DIR "
                         "(the folder holding models/stories260K-hf and e2e/) or set FEDPIPE_SHARED_DATA")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("side_by_side: needs two cores (one per job of a pair)")
    data = Path(a.stories_path).resolve()
    common = [*job_args(data, a.profile), f"seed={a.seed}", f"rounds={a.rounds}", f"eval.every={a.rounds}",
              "output.overwrite=true", *a.extra]  # the extra overrides last: they win
    work = Path(a.workdir) / a.profile
    pairs = []
    for k in range(a.pairs):
        cores = a.cores if k % 2 == 0 else a.cores[::-1]
        outs, procs = {}, {}
        t0 = time.perf_counter()
        for name, core in zip((a.a, a.b), cores):
            outs[name] = work / f"pair{k}" / name
            outs[name].mkdir(parents=True, exist_ok=True)
            procs[name] = start([*common, *ROWS[name], f"output.dir={outs[name]}"], core, outs[name] / "stderr.log")
        for name, p in procs.items():
            if p.wait() != 0:
                raise SystemExit(f"side_by_side: {name} failed (exit {p.returncode}); see {outs[name] / 'stderr.log'}")
        ra, rb = (Results(outs[n] / "results.h5") for n in (a.a, a.b))
        sa, sb, ca, cb = per_sample_s(ra), per_sample_s(rb), clock_s(ra), clock_s(rb, a.b_rounds)
        pair = {"cores": {a.a: cores[0], a.b: cores[1]}, "per_sample_s": {a.a: sa.tolist(), a.b: sb.tolist()},
                "clock_s": {a.a: ca, a.b: cb}, "eval_loss": {a.a: ra.last_eval_loss(), a.b: rb.last_eval_loss()},
                "step_ratio": (sb / sa).tolist(),
                "step_ratio_mean": float(np.exp(np.mean(np.log(sb / sa)))), "clock_ratio": cb / ca,
                "wall_s": time.perf_counter() - t0}
        pairs.append(pair)
        print(f"pair {k} (cores {a.a} {cores[0]}, {a.b} {cores[1]}): {a.b}/{a.a} seconds per sample "
              f"{pair['step_ratio_mean']:.3f} (servers {' '.join(f'{x:.3f}' for x in pair['step_ratio'])}), "
              f"clock {pair['clock_ratio']:.3f}; eval loss {pair['eval_loss'][a.a]:.4f} / "
              f"{pair['eval_loss'][a.b]:.4f}; {pair['wall_s']:.0f} s", file=sys.stderr, flush=True)

    def gm(xs):
        lx = np.log(np.asarray(xs, dtype=float))
        return {"geomean": float(np.exp(lx.mean())), "sd_log": float(lx.std(ddof=1)) if len(lx) > 1 else math.nan,
                "min": float(np.exp(lx.min())), "max": float(np.exp(lx.max()))}

    summary = {"step_ratio": gm([p["step_ratio_mean"] for p in pairs]),
               "clock_ratio": gm([p["clock_ratio"] for p in pairs])}
    a_by_core = {}
    for p in pairs:  # the same job on the two cores, across pairs: how far apart the cores were
        a_by_core.setdefault(p["cores"][a.a], []).append(p["clock_s"][a.a])
    if len(a_by_core) == 2:
        c0, c1 = (float(np.mean(v)) for _, v in sorted(a_by_core.items()))
        summary["core_ratio_of_a"] = c1 / c0
    doc = {"args": vars(a), "pairs": pairs, "summary": summary}
    write_json(a.out, doc)
    st = summary["step_ratio"]
    print(f"{a.b} / {a.a} on {a.profile}, {len(pairs)} pairs: seconds per sample {st['geomean']:.3f} "
          f"(range {st['min']:.3f}-{st['max']:.3f}), measured clock "
          f"{summary['clock_ratio']['geomean']:.3f} (range {summary['clock_ratio']['min']:.3f}-"
          f"{summary['clock_ratio']['max']:.3f})")
    return doc


if __name__ == "__main__":
    main()
