"""Command line: `fedpipe run JOB.yaml [dotted.key=value ...]` (also `python -m fedpipe_dist ...`), and
`fedpipe plan`, `fedpipe check` (same arguments), `fedpipe eval FINAL_DIR` (E2E generation scores),
`fedpipe export RUN_DIR --adapter` (the run's update as a peft LoRA adapter), `fedpipe report RUNS_DIR` (the
paper's figures and tables from results.h5 files), `fedpipe notebooks RUNS_DIR` (the analysis notebooks executed
headless), `fedpipe sweep SWEEP.yaml` (a campaign: every point of a sweep file, locally or as a Slurm job array;
fedpipe_dist/campaign.py).

Exit codes: 0 success, 2 bad input (job file, override, data, model path), 130 Ctrl-C and 143 SIGTERM (one line
says where the run stopped and how to resume it), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError, UserInputError
from .job import load_job

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("\n\n")  # the whole first paragraph, not its first line
    p = argparse.ArgumentParser(prog="fedpipe", description=" ".join(intro.split()),
                                epilog=" ".join(rest.split()))
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated fine-tuning job (under torchrun/srun/mpirun or alone)")
    run.add_argument("job", help="YAML job file, e.g. jobs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rounds=3 train.lr=1e-3")
    run.add_argument("--no-progress", action="store_true", help="no progress bar: one log line per round (the "
                     "default when stderr is not a terminal, as in a Slurm log)")
    run.add_argument("--nproc", type=int, default=None, help="start N ranks on this machine with torchrun's agent "
                     "in this process (errors in one line, with the job's exit code)")
    plan = sub.add_parser("plan", help="print round 1's plan for every server (no weights, no training)")
    plan.add_argument("job")
    plan.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="E2E generation and scoring (BLEU, NIST, METEOR, ROUGE-L, CIDEr) of a final/ "
                        "model folder")
    ev.add_argument("job", metavar="model_dir", help="a run's final/ folder (or any HF causal LM folder)")
    ev.add_argument("overrides", nargs="*", help="generation.key=value overrides, e.g. generation.num_beams=4")
    ev.add_argument("--data", help="E2E CSV with columns mr,ref (default: the run's generation.data_path or eval "
                    "split)")
    ev.add_argument("--max-mrs", type=int, help="score only the first N distinct MRs")
    ev.add_argument("--out", help="where generations.txt goes when no results.h5 sits beside the folder")
    ev.add_argument("--no-meteor", action="store_true", help="leave METEOR out (it needs java)")
    ex = sub.add_parser("export", help="write a finished run's total update as a peft LoRA adapter (exact for "
                        "lora/lora_hb; a truncated SVD otherwise, its retained share printed)")
    ex.add_argument("job", metavar="run_dir", help="a finished run's output.dir (results.h5 and final/)")
    ex.add_argument("--adapter", action="store_true", required=True, help="export a peft LoRA adapter")
    ex.add_argument("--rank", type=int, default=None, help="the adapter's rank (default: the job's lora.rank)")
    ex.add_argument("--out", default=None, help="where to write it (default: RUN/adapter)")
    ex.set_defaults(overrides=[])
    rep = sub.add_parser("report", help="rebuild the paper's figures (PNG) and tables (Markdown) from the "
                         "results.h5 files below a folder")
    rep.add_argument("job", metavar="runs", help="folder holding runs (any depth), e.g. runs/, or one results.h5")
    rep.add_argument("--out", help="where the PNGs and tables.md go (default: RUNS_DIR/report)")
    rep.set_defaults(overrides=[])
    nb = sub.add_parser("notebooks", help="execute the analysis notebooks headless on a folder of runs")
    nb.add_argument("job", metavar="runs", help="folder holding runs (any depth), or one results.h5")
    nb.add_argument("--out", help="where the figures, tables.md and executed notebooks go (default: "
                    "RUNS/notebooks)")
    nb.add_argument("--only", nargs="+", metavar="NAME", help="these notebooks only (default: every one in "
                    "analysis/), e.g. --only fig13_quality tables")
    nb.set_defaults(overrides=[])
    sw = sub.add_parser("sweep", help="run a campaign: every point of a sweep file not done yet (skips finished "
                        "points, resumes interrupted ones)")
    sw.add_argument("job", metavar="sweep_file", help="YAML sweep file, e.g. jobs/paper_small.yaml")
    sw.add_argument("--list", action="store_true", help="list the points and their states; run nothing")
    sw.add_argument("--nproc", type=int, default=1, help="ranks per point when run here (torchrun when > 1)")
    sw.add_argument("--jobs", type=int, default=1, help="points run side by side here (each with --nproc ranks)")
    sw.add_argument("--only", nargs="+", default=[], metavar="AXIS=LABEL", help="only the points with these "
                    "labels, e.g. --only method=fedpipe seed=0 (the labels: --list)")
    sw.add_argument("--slurm", nargs=argparse.REMAINDER, metavar="SBATCH_OPTION",
                    help="submit one Slurm array task per point not done (slurm/fedpipe_sweep.sh); options after "
                         "it go to sbatch, e.g. --slurm --partition=gpu")
    sw.add_argument("--point", type=int, help="(slurm/fedpipe_sweep.sh) the point to print arguments for")
    sw.add_argument("--args", action="store_true", help="print point --point's `fedpipe run` arguments, one per "
                    "line (nothing when it is done)")
    sw.set_defaults(overrides=[])
    check = sub.add_parser("check", help="validate a job file and overrides before queueing it: the model folder, "
                           "the data files (columns, enough rows), output.dir; print the resolved config")
    check.add_argument("job")
    check.add_argument("overrides", nargs="*")
    check.add_argument("--nproc", type=int, help="the ranks the job will run on (warns about ranks that would host "
                       "no server)")
    return p


def _sweep(args) -> int:
    from pathlib import Path

    from . import campaign as cp

    c = cp.load_campaign(args.job)
    if args.point is not None:
        if not 0 <= args.point < len(c.points):
            raise UserInputError(f"--point {args.point}: the sweep has points 0..{len(c.points) - 1}")
        p = c.points[args.point]
        st = cp.state(c, p)
        if args.args and st != "done":
            print("\n".join(c.job_args(p, st)))
        return 0
    if args.jobs < 1 or args.nproc < 1:
        raise UserInputError(f"--jobs and --nproc must be >= 1 (got {args.jobs} and {args.nproc})")
    if args.only:
        c.points = cp.select(c, args.only)
    if args.list:
        print(cp.table(c))
        return 0
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.slurm is not None:
        script = Path(__file__).resolve().parents[1] / "slurm" / "fedpipe_sweep.sh"
        cp.submit_slurm(c, args.slurm, script, log=log)
        return 0
    failed = cp.run_local(c, nproc=args.nproc, log=log, jobs=args.jobs)
    print(cp.table(c))
    return 1 if failed else 0


def _rank_prefix() -> str:
    r = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK")
    return f"[rank {r}] " if r not in (None, "0") else ""


QUIET_RANK_WAIT_S = 3.0


def report_user_error(msg: str) -> None:
    """Say a user error once per job, as the last thing the user reads.

    A user error (bad job file, override, data, model path; ConfigError/UserInputError) is raised on every
    rank alike (load_job runs everywhere; the engine raises them through agree/raise_on_all_ranks), so only
    rank 0 says it and the other ranks exit quietly with the same code. Under torchrun, rank 0 writes it into
    torchrun's error file instead of stderr: torchrun then prints it once, at the end of its failure summary
    ("Root Cause ... traceback : fedpipe: error: ..."), below its own traceback. torchrun stops the other
    workers at the first failure it sees and names that one the root cause, so under torchrun the quiet
    ranks wait QUIET_RANK_WAIT_S before exiting: rank 0's failure, with the message, comes first (on a loaded
    machine a quiet rank did once exit first, and torchrun's SIGTERM cut rank 0 short of its error file).
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if _rank_prefix():
        if error_file:
            import time

            time.sleep(QUIET_RANK_WAIT_S)
        return
    if error_file:
        import json
        import time

        try:
            with open(error_file, "w") as f:  # the format torch.distributed.elastic reads (a str message)
                json.dump({"message": msg, "timestamp": int(time.time())}, f)
            return
        except OSError:
            pass  # no error file to write: stderr below
    print(msg, file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, allowing options anywhere: `run JOB --no-progress k=v` as well as `run --no-progress JOB k=v`.

    argparse stops filling a nargs='*' positional at the first option, so overrides after an option come
    back as extras; they are appended in order. Anything else left over is still an error (exit 2).
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (overrides are written dotted.key=value)")
    args.overrides = [*args.overrides, *extra]
    return args


def _rounds_done(cfg) -> int | None:
    """Training rounds results.h5 holds; None when it is not written yet or cannot be read (another rank may be
    writing it this instant): a stop message must still come out."""
    from pathlib import Path

    from .io.hdf5 import Results

    try:
        return Results(Path(cfg.output.dir) / "results.h5").n_rounds
    except Exception:
        return None


def _rounds_kept(cfg) -> str:
    """Where a run stopped by a failed collective stands: the rounds results.h5 holds, and how to go on."""
    n = _rounds_done(cfg)
    return (f"results.h5 holds rounds 1-{n} (every round finished before it); rerun with resume=true to continue "
            "from the newest checkpoint" if n else "no round had finished")


def stopped_line(cfg, job: str, overrides: list[str], how: str) -> str:
    """One line for a run stopped from outside: the rounds results.h5 holds, the checkpoint a resume continues
    from, and the command that resumes it."""
    import shlex
    from pathlib import Path

    from .io.checkpoint import complete_rounds

    out = Path(cfg.output.dir)
    n = _rounds_done(cfg)
    done = f"after round {n} of {cfg.rounds}" if n is not None else "before its first round"
    kept = complete_rounds(out) if cfg.checkpoint.enabled else []
    since = (f"a resume continues from round {kept[-1]}'s checkpoint" if kept else
             "no checkpoint to resume from yet, a rerun starts over" if cfg.checkpoint.enabled else
             "checkpoint.enabled=false, a rerun starts over")
    local = os.environ.get("FEDPIPE_LOCAL_NPROC")  # started by `fedpipe run --nproc N`
    nproc = ["--nproc", local] if local else []
    cmd = shlex.join(["fedpipe", "run", job, *nproc, *[o for o in overrides if not o.startswith("resume=")],
                      "resume=true"])
    return (f"fedpipe: stopped by {how} {done} ({since}); resume with: {cmd} (under torchrun or sbatch: the same "
            "launch with resume=true)")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "eval":
            from .runtime.evaluate import eval_command

            if args.max_mrs is not None and args.max_mrs < 1:
                raise UserInputError(f"--max-mrs must be >= 1 (got {args.max_mrs})")
            eval_command(args.job, args.data, args.max_mrs, args.out, args.overrides, meteor=not args.no_meteor)
            return 0
        if args.command == "report":
            from pathlib import Path

            from .analysis import figures, load_runs

            src = Path(args.job)
            if not src.is_dir() and not (src.is_file() and src.suffix == ".h5"):
                raise UserInputError(f"fedpipe report: {args.job!r} is neither a folder nor a results.h5 file; give "
                                     "the folder your runs are in, or one run's results.h5")
            skipped: list = []
            runs = load_runs(src, skipped)
            if not runs and skipped:
                raise UserInputError(f"fedpipe report: none of the {len(skipped)} results.h5 below {args.job!r} can "
                                     "be read (" + "; ".join(f"{p}: {why}" for p, why in skipped[:5]) + "); rerun "
                                     "those jobs, or resume them with resume=true")
            if not runs:
                raise UserInputError(f"fedpipe report: no results.h5 below {args.job!r}; run a job first "
                                     "(fedpipe run JOB output.dir=...)")
            out = Path(args.out or (src.parent if src.is_file() else src) / "report")
            written = figures.write_report(runs, out, log=lambda m: print(m, file=sys.stderr))
            print(f"report: {len(runs)} run(s) -> " + ", ".join(str(p) for p in written.values()))
            if skipped:
                print(f"report: left out {len(skipped)} run(s) that cannot be read: "
                      + "; ".join(f"{p} ({why})" for p, why in skipped), file=sys.stderr)
            return 0
        if args.command == "export":
            from .runtime.export import export_adapter

            export_adapter(args.job, args.rank, args.out, log=lambda m: print(m, file=sys.stderr))
            return 0
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "notebooks":
            from pathlib import Path

            from .analysis.notebooks import run_notebooks

            src = Path(args.job)
            if not src.exists():
                raise UserInputError(f"fedpipe notebooks: {args.job!r} does not exist; give a folder of runs")
            out = Path(args.out or (src.parent if src.is_file() else src) / "notebooks")
            written = run_notebooks(src, out, args.only, log=lambda m: print(m, file=sys.stderr))
            print(f"notebooks: {len(written)} executed -> {out}")
            return 0
        if args.command == "run" and args.nproc is not None and "RANK" not in os.environ:
            if args.nproc < 1:
                raise UserInputError(f"--nproc must be >= 1 (got {args.nproc})")
            load_job(args.job, args.overrides)  # a bad job file or override: said once, before any rank starts
            from .runtime.local_launch import run_local

            return run_local(args.job, args.overrides, args.nproc, no_progress=args.no_progress)
        cfg = load_job(args.job, args.overrides)
        if args.command == "check":
            import yaml

            from .preflight import preflight, world_size_from_env

            notes = preflight(cfg, world_size=args.nproc or world_size_from_env())
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for n in notes:
                print(f"fedpipe check: {n}", file=sys.stderr)
            print("fedpipe check: OK (job file, model, data and output.dir)", file=sys.stderr)
            return 0
        if args.command == "plan":
            from .runtime.planning import plan_table

            table, _, infos = plan_table(cfg, log=lambda m: print(m, file=sys.stderr))
            print(table)
            bad = [i for i, info in enumerate(infos) if not info.fits]
            if bad:
                print(f"fedpipe: servers {bad} have no plan that fits their budgets; they would under-train "
                      "(raise clients.memory_gb or plan.step_time_s, or lower train.batch_min)", file=sys.stderr)
            return 0
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from .preflight import before_run
        from .runtime.resume import restarted_by_torchrun

        before_run(cfg, resuming=cfg.resume or restarted_by_torchrun())  # every such mistake at once
        from .runtime.launch import die_with_launcher, make_comm

        die_with_launcher()
        from .runtime.engine import run_job

        comm = make_comm(cfg.comm)
        if cfg.comm.audit:
            from pathlib import Path

            from .comm.audit import AuditedComm

            comm = AuditedComm(comm, Path(cfg.output.dir) / "wire_audit")
        from .comm.base import CollectiveTimeout
        from .runtime.launch import Stopped, stop_on_sigterm

        try:
            with stop_on_sigterm():
                run_job(cfg, comm, show_progress=not args.no_progress)
        except (Stopped, KeyboardInterrupt) as e:
            if not _rank_prefix():  # rank 0 says it once; every rank got the signal
                print(stopped_line(cfg, args.job, args.overrides, "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C"),
                      file=sys.stderr, flush=True)
            return 143 if isinstance(e, Stopped) else 130
        except CollectiveTimeout as e:
            print(f"{_rank_prefix()}fedpipe: error: {e}; {_rounds_kept(cfg)}", file=sys.stderr, flush=True)
            comm.abort()  # MPI: ends every rank of the job, a stopped one too (torchrun does that itself)
            return 1
        finally:
            comm.close()
        return 0
    except (ConfigError, UserInputError) as e:
        report_user_error(f"fedpipe: error: {e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}fedpipe: interrupted; results.h5 holds every round finished so far",
              file=sys.stderr)
        return 130
