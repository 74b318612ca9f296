"""Long runs: does memory stay flat and does results.h5 grow linearly with the number of rounds?

Tiny GPT-2, 2 gloo ranks (2 servers), 1 local step per round, evaluation every 10 rounds; one torchrun job
per length (50, 100, 200 rounds by default). Reported from results.h5: each rank's resident peak during
local training (HDF5 clients/peak_mem_bytes, VmHWM after a reset: the whole rank process) at round 10 and at
the last round, and the file's size per length (bytes per round from the differences).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_run.py                 # about 5 minutes on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_run.py --rounds 20 40

Output: Markdown on stdout and JSON at --out (default benchmarks/out/long_run.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _jobs import torchrun_job, write_json  # noqa: E402

from fedpipe_dist.io.hdf5 import Results  # noqa: E402


def run(args, rounds: int) -> dict:
    out = Path(args.runs) / f"r{rounds}"
    elapsed = torchrun_job(args.ranks, [
        "jobs/quickstart.yaml", f"clients.n={args.ranks}", "clients.slowdown=1", "clients.memory_gb=24",
        f"rounds={rounds}", "train.local_steps=1", "train.batch_max=4", "data.synthetic_train_size=200",
        "data.synthetic_eval_size=16", "eval.max_samples=16", "eval.every=10", "output.save_final=false",
        f"output.dir={out}", "output.overwrite=true", *args.overrides], f"{rounds} rounds")
    r = Results(out / "results.h5")
    peak = r.clients["peak_mem_bytes"]  # [row, server]
    at = min(10, rounds)
    return dict(rounds=rounds, job_s=elapsed, file_bytes=(out / "results.h5").stat().st_size,
                rss_mib_round10=[float(x) / 2**20 for x in peak[at]],
                rss_mib_last=[float(x) / 2**20 for x in peak[rounds]], finished=bool(r.attrs["finished"]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--runs", default=str(REPO / "benchmarks" / "out" / "long_run"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "long_run.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    res = [run(args, n) for n in args.rounds]
    per_round = [(b["file_bytes"] - a["file_bytes"]) / (b["rounds"] - a["rounds"]) for a, b in zip(res, res[1:])]
    doc = dict(command=" ".join(sys.argv), results=res, file_bytes_per_round=per_round)
    write_json(args.out, doc)
    print("| rounds | results.h5 bytes | RSS MiB per rank at round 10 | RSS MiB per rank at the last round | job s |")
    print("|---|---|---|---|---|")
    for x in res:
        print(f"| {x['rounds']} | {x['file_bytes']:,} | {', '.join(f'{v:.1f}' for v in x['rss_mib_round10'])} | "
              f"{', '.join(f'{v:.1f}' for v in x['rss_mib_last'])} | {x['job_s']:.0f} |")
    print("\nresults.h5 bytes per round between lengths: " + ", ".join(f"{b:,.0f}" for b in per_round))
    return doc


if __name__ == "__main__":
    main()
