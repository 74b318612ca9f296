"""The bf16 wire format (aggregation.wire=bf16, issue 20): bytes saved, factor fidelity, effect on eval loss.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wire_bf16.py                  # about 4 minutes on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wire_bf16.py --seeds 0 1 --rounds 5 method=flora

Each seed runs jobs/quickstart.yaml twice, the same job but for aggregation.wire (fp32, then bf16), in this
process at world size 1 (rank 0 hosts all 4 servers and rounds their factors exactly as the wire would:
tests/test_wire_bf16.py checks that hosting does not change a result). Declared compute (clients.tflops) and
no slowdown waits, so both variants get the same plans. Read back from results.h5: bytes up and down per
round (rounds/bytes_up, bytes_down) and the final eval loss with its standard error.

The factors' fidelity is measured directly on the real uploads of every round of every run: the round's
`factored_exchange` is wrapped, and before it runs, the same uploads also go through the exchange with
wire=fp32 and with wire=bf16; reported are, per round,
- per server: ||B A - bf16(B) bf16(A)||_F / ||B A||_F over all its adapted weights (the uplink's rounding);
- merged: ||dW_fp32 - dW_bf16||_F / ||dW_fp32||_F of the update every rank merges (uplink and downlink
  rounding, after the weighted stacking).

Output: Markdown on stdout and JSON at --out (default benchmarks/out/wire_bf16.json).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fedpipe_dist.methods.lora as lora_methods  # noqa: E402
from benchmarks._jobs import write_json  # noqa: E402
from fedpipe_dist.algorithm.aggregation.base import to_dense  # noqa: E402
from fedpipe_dist.comm.local import LocalComm  # noqa: E402
from fedpipe_dist.comm.payload import to_wire  # noqa: E402
from fedpipe_dist.io.hdf5 import Results  # noqa: E402
from fedpipe_dist.job import load_job  # noqa: E402
from fedpipe_dist.runtime.engine import run_job  # noqa: E402
from fedpipe_dist.runtime.exchange import factored_exchange  # noqa: E402

# lora.carry=none: the merged update is the weighted stack the figures below were measured on (with the kept
# adapter the stack travels unweighted and methods/fedpipe.py calls the exchange, which Probe does not wrap)
COMMON = ["clients.slowdown=1", "clients.tflops=1.0", "lora.carry=none"]
WIRES = ("fp32", "bf16")


def factor_error(factors: dict) -> float:
    """||B A - bf16(B) bf16(A)||_F / ||B A||_F over every adapted weight of one upload (float64)."""
    err = ref = 0.0
    rounded = to_wire(factors, torch.bfloat16)
    for key, (b, a) in factors.items():
        exact = b.double() @ a.double()
        rb, ra = rounded[key]
        err += float((exact - rb.double() @ ra.double()).square().sum())
        ref += float(exact.square().sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0


def merged_error(exact: dict, rounded: dict) -> float:
    """||dW_fp32 - dW_bf16||_F / ||dW_fp32||_F over every weight of the merged update (or global adapter)."""
    err = ref = 0.0
    for key, d in exact.items():
        x = to_dense(d).double()
        err += float((x - to_dense(rounded[key]).double()).square().sum())
        ref += float(x.square().sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0


class Probe:
    """Wraps the factored exchange the LoRA methods call: measures each round's uploads both ways, then runs
    the round's own exchange unchanged (at world size 1 every upload is in `updates`)."""

    def __init__(self):
        self.rounds: list[dict] = []

    def __call__(self, comm, sites, plans, contributors, updates, owner, aggregator, shard_sizes, claims=None, *,
                 wire="fp32"):
        per_server = [factor_error(updates[c].factors) for c in contributors]
        both = {w: factored_exchange(comm, sites, plans, contributors, dict(updates), owner, aggregator, shard_sizes,
                                     None, wire=w)[0] for w in WIRES}
        self.rounds.append({"server_rel_err": per_server, "merged_rel_err": merged_error(both["fp32"], both["bf16"])})
        return factored_exchange(comm, sites, plans, contributors, updates, owner, aggregator, shard_sizes, claims,
                                 wire=wire)


def run(seed: int, wire: str, rounds: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"seed{seed}_{wire}"
    cfg = load_job("jobs/quickstart.yaml", [*COMMON, f"rounds={rounds}", f"seed={seed}", f"aggregation.wire={wire}",
                                            f"output.dir={out}", "output.overwrite=true", *extra])
    probe, real = Probe(), lora_methods.factored_exchange
    lora_methods.factored_exchange = probe
    t0 = time.perf_counter()
    try:
        run_job(cfg, LocalComm(), show_progress=False)
    finally:
        lora_methods.factored_exchange = real
    r = Results(out / "results.h5")
    rows = slice(1, None)  # row 0 is the untrained base
    return {"seed": seed, "wire": wire, "wall_s": time.perf_counter() - t0,
            "bytes_up": r.rounds["bytes_up"][rows].tolist(), "bytes_down": r.rounds["bytes_down"][rows].tolist(),
            "eval_loss": r.rounds["eval_loss"].tolist(), "final_eval_loss": float(r.rounds["eval_loss"][-1]),
            "final_eval_loss_se": float(r.rounds["eval_loss_se"][-1]), "n_rejected": int(r.rounds["n_rejected"].sum()),
            "probe": probe.rounds}


def summarize(runs: list[dict]) -> dict:
    by = {w: [x for x in runs if x["wire"] == w] for w in WIRES}
    out = {}
    for w, rs in by.items():
        server = [e for x in rs for p in x["probe"] for e in p["server_rel_err"]]
        merged = [p["merged_rel_err"] for x in rs for p in x["probe"]]
        out[w] = {"bytes_up_per_round": statistics.mean(v for x in rs for v in x["bytes_up"]),
                  "bytes_down_per_round": statistics.mean(v for x in rs for v in x["bytes_down"]),
                  "final_eval_loss_mean": statistics.mean(x["final_eval_loss"] for x in rs),
                  "server_rel_err_median": statistics.median(server) if server else float("nan"),
                  "server_rel_err_max": max(server, default=float("nan")),
                  "merged_rel_err_mean": statistics.mean(merged) if merged else float("nan"),
                  "merged_rel_err_max": max(merged, default=float("nan"))}
    deltas = [b["final_eval_loss"] - f["final_eval_loss"] for f, b in zip(by["fp32"], by["bf16"])]
    out["final_loss_delta_bf16_minus_fp32"] = {"per_seed": deltas, "mean": statistics.mean(deltas),
                                               "max_abs": max(abs(d) for d in deltas)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "wire_bf16"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "wire_bf16.json"))
    ap.add_argument("extra", nargs="*", help="more dotted overrides for every run")
    args = ap.parse_args(argv)
    runs = [run(seed, w, args.rounds, Path(args.workdir), args.extra) for seed in args.seeds for w in WIRES]
    summary = summarize(runs)
    doc = {"benchmark": "wire_bf16", "job": "jobs/quickstart.yaml", "overrides": COMMON + args.extra,
           "rounds": args.rounds, "seeds": args.seeds, "torch": torch.__version__, "summary": summary, "runs": runs}
    f, b = summary["fp32"], summary["bf16"]
    print("| seed | final eval loss fp32 | final eval loss bf16 | bf16 - fp32 | ± se (fp32) |")
    print("|---|---|---|---|---|")
    for rf, rb in zip(runs[0::2], runs[1::2]):
        print(f"| {rf['seed']} | {rf['final_eval_loss']:.4f} | {rb['final_eval_loss']:.4f} | "
              f"{rb['final_eval_loss'] - rf['final_eval_loss']:+.4f} | {rf['final_eval_loss_se']:.4f} |")
    print("\n| wire | bytes up / round | bytes down / round | server factor rel. error (median / max) | "
          "merged update rel. error (mean / max) |")
    print("|---|---|---|---|---|")
    for w, s in (("fp32", f), ("bf16", b)):
        print(f"| {w} | {s['bytes_up_per_round']:,.0f} | {s['bytes_down_per_round']:,.0f} | "
              f"{s['server_rel_err_median']:.2e} / {s['server_rel_err_max']:.2e} | "
              f"{s['merged_rel_err_mean']:.2e} / {s['merged_rel_err_max']:.2e} |")
    print(f"\nbf16 / fp32 bytes: up {b['bytes_up_per_round'] / f['bytes_up_per_round']:.3f}, down "
          f"{b['bytes_down_per_round'] / f['bytes_down_per_round']:.3f}; final eval loss bf16 - fp32: mean "
          f"{summary['final_loss_delta_bf16_minus_fp32']['mean']:+.4f}, max |.| "
          f"{summary['final_loss_delta_bf16_minus_fp32']['max_abs']:.4f} over {len(args.seeds)} seeds")
    out = write_json(args.out, doc, indent=2)
    print(f"JSON: {out}")
    return doc


if __name__ == "__main__":
    main()
