"""More edge servers than ranks: how a round scales with the number of virtual servers on 4 ranks.

For N = 8, 16, 32, 64 virtual servers (tiny GPT-2, synthetic E2E, every server sampled), one `torchrun` job
of 4 gloo ranks each; read back from results.h5: the round's wall-clock (rank 0), rank 0's aggregation
compute (agg_s: folding the streamed updates in, packing the downlink) and time blocked on receives (recv_wait_s),
and rank 0's peak memory from the end of local training to the merge (agg_peak_bytes, VmHWM on CPU: the
whole process, mostly the Python/torch runtime), and the update bytes rank 0 held at once while folding
updates in (agg_held_bytes; holding every update would be the round's bytes up). Means over rounds 2..R
(round 1 includes warm-up).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/virtual_clients.py            # about 6 minutes on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/virtual_clients.py --clients 8 16 --rounds 3

Output: Markdown on stdout and JSON at --out (default benchmarks/out/virtual_clients.json).
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


def run(args, n: int) -> dict:
    out = Path(args.runs) / f"n{n}"
    elapsed = torchrun_job(args.ranks, [
        "jobs/quickstart.yaml", f"clients.n={n}", "clients.slowdown=1", "clients.memory_gb=24",
        "clients.precision=fp32", f"rounds={args.rounds}", f"train.local_steps={args.steps}", "train.batch_max=4",
        f"data.synthetic_train_size={max(400, 8 * n)}", "data.synthetic_eval_size=32", "eval.max_samples=32",
        f"eval.every={args.rounds}", "output.save_final=false", f"output.dir={out}", "output.overwrite=true",
        *args.overrides], f"n={n}")
    r = Results(out / "results.h5")
    rows = slice(2, None)  # rounds 2..R
    done = r.clients["completed"][1:]
    return dict(clients=n, ranks=args.ranks, job_s=elapsed, completed_per_round=float(done.sum(axis=1).mean()),
                round_s=float(r.rounds["wall_s"][rows].mean()), agg_s=float(r.rounds["agg_s"][rows].mean()),
                wait_s=float(r.rounds["recv_wait_s"][rows].mean()),
                agg_peak_mib=float(r.rounds["agg_peak_bytes"][rows].max()) / 2**20,
                agg_held_mib=float(r.rounds["agg_held_bytes"][rows].max()) / 2**20,
                bytes_up_per_round=float(r.rounds["bytes_up"][rows].mean()),
                columns=int(r.clients["selected"].shape[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="local steps per server and round")
    ap.add_argument("--runs", default=str(REPO / "benchmarks" / "out" / "virtual_clients"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "virtual_clients.json"))
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every job")
    args = ap.parse_args(argv)
    doc = dict(command=" ".join(sys.argv), results=[run(args, n) for n in args.clients])
    write_json(args.out, doc)
    base = doc["results"][0]
    print("| virtual servers | ranks | round s | agg s (rank 0) | agg s / server | wait s | rank 0 peak RSS MiB "
          "(exchange to merge) | update MiB held by rank 0 at once | MiB up / round (all updates) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in doc["results"]:
        print(f"| {x['clients']} | {x['ranks']} | {x['round_s']:.2f} | {x['agg_s']:.4f} | "
              f"{1e3 * x['agg_s'] / x['clients']:.3f} ms | {x['wait_s']:.2f} | {x['agg_peak_mib']:.1f} | "
              f"{x['agg_held_mib']:.3f} | {x['bytes_up_per_round'] / 2**20:.2f} |")
    growth = doc["results"][-1]["agg_s"] / base["agg_s"], doc["results"][-1]["clients"] / base["clients"]
    print(f"\naggregation time x{growth[0]:.1f} for x{growth[1]:.0f} servers; rank 0 peak "
          f"{base['agg_peak_mib']:.1f} -> {doc['results'][-1]['agg_peak_mib']:.1f} MiB", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
