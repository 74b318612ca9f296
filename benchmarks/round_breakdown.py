"""Where a run's time goes: set-up, each round's phases (planning, local training, straggler wait, exchange,
merge, evaluation, record), checkpoints and the finish (final eval, final/), from results.h5 and the timers
the engine records (docs/hdf5_schema.md: rounds/plan_s ... record_s, eval_s; setup_s, setup_phases_json,
checkpoint_s, finish_s).

    # a run you already have
    .venv/bin/python benchmarks/round_breakdown.py runs/e2e_stories260k/results.h5
    # or run a job first (4 gloo ranks under torchrun), then break it down
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/round_breakdown.py --run jobs/e2e_stories260k.yaml \\
        --nproc 4 --out-dir runs/breakdown

Output: a Markdown table on stdout and JSON at --out (default benchmarks/out/round_breakdown.json): seconds
and shares of the run (set-up, rounds, checkpoints, finish) and of the rounds' wall-clock (each phase).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._jobs import torchrun_job, write_json  # noqa: E402
from fedpipe_dist.io.hdf5 import Results  # noqa: E402

PHASES = ("plan_s", "train_s", "sync_s", "exchange_s", "merge_s", "eval_s", "record_s")


def breakdown(results: Path) -> dict:
    import h5py

    r = Results(results)
    rows = r.rounds
    trained = rows["round"] > 0
    wall = float(rows["wall_s"][trained].sum())
    with h5py.File(results, "r", locking=False) as f:
        setup = [float(x) for x in f.attrs.get("setup_s", [])]
        setup_phases = [json.loads(x) for x in f.attrs.get("setup_phases_json", [])]
        checkpoint_s = float(f.attrs.get("checkpoint_s", 0.0))
        finish_s = float(f.attrs.get("finish_s", 0.0))
        full = {k: float(v) for k, v in f["eval"].attrs.items() if k.startswith("full_")}
    run_s = sum(setup) + wall + checkpoint_s + finish_s
    phases = {p: float(rows[p][trained].sum()) for p in PHASES if p in rows}
    phases["other_s"] = wall - sum(phases.values())  # the row's own append, and rounding
    evaluated = trained & (rows["eval_tokens"] > 0) if "eval_tokens" in rows else trained
    return {
        "results": str(results), "rounds": int(trained.sum()), "world_size": int(r.attrs["world_size"]),
        "run_s": run_s,
        "run": {"setup_s": sum(setup), "rounds_s": wall, "checkpoint_s": checkpoint_s, "finish_s": finish_s},
        "run_share": {k: v / run_s for k, v in {"setup_s": sum(setup), "rounds_s": wall,
                                                 "checkpoint_s": checkpoint_s, "finish_s": finish_s}.items()},
        "setup_phases": setup_phases,
        "round_phases_s": phases,
        "round_share": {k: v / wall for k, v in phases.items()} if wall else {},
        "eval": {"rounds_evaluated": int(evaluated.sum()),
                 "sample_loss_last": float(rows["eval_loss"][-1]),
                 "sample_loss_se_last": float(rows["eval_loss_se"][-1]) if "eval_loss_se" in rows else None,
                 "sample_tokens": int(rows["eval_tokens"][-1]) if "eval_tokens" in rows else None, **full},
    }


def table(d: dict) -> str:
    lines = [f"{d['results']}: {d['rounds']} rounds on {d['world_size']} rank(s), {d['run_s']:.1f} s in all", "",
             "| part of the run | s | share |", "|---|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} | {d['run_share'][k]:.1%} |" for k, v in d["run"].items()]
    lines += ["", "| phase of the rounds | s | share of round wall-clock |", "|---|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} | {d['round_share'].get(k, 0):.1%} |"
              for k, v in d["round_phases_s"].items()]
    if d["setup_phases"]:
        last = d["setup_phases"][-1]
        lines += ["", "set-up on rank 0 (last attempt): " + ", ".join(f"{k} {v:.1f} s" for k, v in last.items())]
    e = d["eval"]
    lines += ["", f"eval: {e['rounds_evaluated']} rounds on a sample of {e['sample_tokens']} tokens, last loss "
              f"{e['sample_loss_last']:.4f} (se {e['sample_loss_se_last']:.4f})"
              + (f"; final model on the whole eval set: {e['full_loss']:.4f} (se {e['full_loss_se']:.4f}, "
                 f"{int(e['full_tokens'])} tokens)" if "full_loss" in e else "")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", help="a run's results.h5 (or use --run)")
    ap.add_argument("--run", metavar="JOB", help="run this job first (torchrun, --nproc ranks)")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--out-dir", default="runs/breakdown", help="output.dir of the --run job")
    ap.add_argument("overrides", nargs="*", default=[], help="dotted.key=value overrides for --run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "round_breakdown.json"))
    args = ap.parse_args()
    if args.run:
        overrides = [*([args.results] if args.results else []), *args.overrides]  # with --run, all are overrides
        job_s = torchrun_job(args.nproc, [args.run, *overrides, f"output.dir={args.out_dir}",
                                          "output.overwrite=true"], args.run)
        results = Path(args.out_dir) / "results.h5"
    elif args.results:
        results, job_s = Path(args.results), None
    else:
        ap.error("give a results.h5, or --run JOB")
    d = breakdown(results)
    d["job_wall_s"] = job_s  # the launcher's whole wall-clock (interpreter start, imports, torchrun included)
    print(table(d))
    if job_s is not None:
        print(f"\nthe job's wall-clock under torchrun: {job_s:.1f} s (run_s above excludes interpreter start-up "
              f"and imports: {job_s - d['run_s']:.1f} s)")
    write_json(args.out, d)


if __name__ == "__main__":
    main()
