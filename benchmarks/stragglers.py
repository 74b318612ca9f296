"""Straggler benchmark: FedPipe's per-server plans vs fixed-rank LoRA with equal batches, real slowdowns.

Run on demand from the repository root (about 5 minutes on 2 cores):

    .venv/bin/python benchmarks/stragglers.py                        # 4 ranks, slowdowns 1, 1.5, 2, 3
    .venv/bin/python benchmarks/stragglers.py --rounds 6 --nproc 4 --out /tmp/s.json

Both runs are the same job (jobs/quickstart.yaml with the overrides below) under torchrun with 4 gloo
ranks, one edge server per rank; each server really runs slower by its slowdown (it waits out the extra
time after every step). The only difference is the plan: `plan.mode=fedpipe` (batch from the compute
ratio, weights and ranks by importance under the FLOPs budget of fixed-rank LoRA on the fastest server)
vs `plan.mode=uniform` (every server: rank lora.rank on q, k, v, o and batch train.batch_max).

Reported per round, from results.h5 alone: the straggler idle fraction sum_i (t_max - t_i) / (N t_max)
over the servers' local training times t_i, and the round wall-clock; and the wall-clock each run needs
to reach the same eval loss (the worse of the two final losses), as a ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _jobs import torchrun_job, write_json  # noqa: E402

from fedpipe_dist.io.hdf5 import Results  # noqa: E402

COMMON = ["clients.slowdown=[1,1.5,2,3]", "clients.n=4", "train.local_steps=20", "train.batch_max=8",
          "lora.rank=8", "eval.every=1", "eval.max_samples=96"]


def idle_fraction(local_s: np.ndarray) -> float:
    """sum_i (t_max - t_i) / (N t_max) over the servers that trained this round."""
    t = local_s[np.isfinite(local_s)]
    return float(np.sum(t.max() - t) / (len(t) * t.max())) if len(t) else float("nan")


def run(mode: str, out: Path, rounds: int, nproc: int, extra: list[str]) -> float:
    return torchrun_job(nproc, ["jobs/quickstart.yaml", *COMMON, f"rounds={rounds}", f"plan.mode={mode}",
                                f"output.dir={out}", "output.overwrite=true", *extra], f"{mode} run")


def summarize(path: Path) -> dict:
    r = Results(path)
    rows = r.rounds["round"] > 0
    local = r.clients["local_s"][rows]
    return {
        "batch_size": r.clients["batch_size"][rows][0].tolist(),
        "ranks_round1": r.clients["ranks"][rows][0].max(axis=1).tolist(),  # [client, q/k/v/o] max over layers
        "idle_fraction": [idle_fraction(x) for x in local],
        "round_wall_s": r.rounds["wall_s"][rows].tolist(),
        "local_s": local.tolist(),
        "eval_loss": r.rounds["eval_loss"].tolist(),  # includes row 0 (the base model)
        "trainable_params_round1": r.clients["trainable_params"][rows][0].tolist(),
    }


def time_to_loss(s: dict, target: float) -> float:
    """Cumulative round wall-clock until eval loss first reaches `target` (NaN if never)."""
    losses = s["eval_loss"][1:]
    wall = np.cumsum(s["round_wall_s"])
    hit = [i for i, loss in enumerate(losses) if loss <= target + 1e-12]
    return float(wall[hit[0]]) if hit else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "stragglers"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "stragglers.json"))
    ap.add_argument("extra", nargs="*", help="more dotted overrides for both runs")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    res = {}
    for mode in ("fedpipe", "uniform"):
        total = run(mode, work / mode, args.rounds, args.nproc, args.extra)
        res[mode] = summarize(work / mode / "results.h5")
        res[mode]["process_wall_s"] = total
    target = max(res["fedpipe"]["eval_loss"][-1], res["uniform"]["eval_loss"][-1])
    for mode in res:
        res[mode]["mean_idle_fraction"] = float(np.mean(res[mode]["idle_fraction"]))
        res[mode]["time_to_target_s"] = time_to_loss(res[mode], target)
    doc = {"benchmark": "stragglers", "common_overrides": COMMON + args.extra, "rounds": args.rounds,
           "nproc": args.nproc, "target_eval_loss": target, "runs": res,
           "idle_ratio_fedpipe_over_uniform":
               res["fedpipe"]["mean_idle_fraction"] / res["uniform"]["mean_idle_fraction"],
           "time_to_target_ratio_uniform_over_fedpipe":
               res["uniform"]["time_to_target_s"] / res["fedpipe"]["time_to_target_s"]}
    print(f"batches: fedpipe {res['fedpipe']['batch_size']}, uniform {res['uniform']['batch_size']}")
    print("| round | idle FedPipe | idle LoRA | wall s FedPipe | wall s LoRA | eval loss FedPipe | eval loss LoRA |")
    print("|---|---|---|---|---|---|---|")
    f, u = res["fedpipe"], res["uniform"]
    for i in range(args.rounds):
        print(f"| {i + 1} | {f['idle_fraction'][i]:.3f} | {u['idle_fraction'][i]:.3f} | {f['round_wall_s'][i]:.2f} | "
              f"{u['round_wall_s'][i]:.2f} | {f['eval_loss'][i + 1]:.4f} | {u['eval_loss'][i + 1]:.4f} |")
    print(f"| mean | {f['mean_idle_fraction']:.3f} | {u['mean_idle_fraction']:.3f} | "
          f"{np.mean(f['round_wall_s']):.2f} | {np.mean(u['round_wall_s']):.2f} | | |")
    print(f"\nsame eval loss {target:.4f}: FedPipe after {f['time_to_target_s']:.1f} s, LoRA after "
          f"{u['time_to_target_s']:.1f} s (LoRA / FedPipe = {doc['time_to_target_ratio_uniform_over_fedpipe']:.2f}x); "
          f"idle fraction FedPipe / LoRA = {doc['idle_ratio_fedpipe_over_uniform']:.2f}")
    out = write_json(args.out, doc, indent=2)
    print(f"JSON: {out}")
    return doc


if __name__ == "__main__":
    main()
