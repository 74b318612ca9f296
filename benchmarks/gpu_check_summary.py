"""The summary lines of benchmarks/gpu_check.sh, read from the files its parts wrote to OUT_DIR.

    python benchmarks/gpu_check_summary.py OUT_DIR            # parts 1-5: losses, memory, timings
    python benchmarks/gpu_check_summary.py OUT_DIR --clock    # part 6: time_to_quality on the device's clock

A part that did not run (its files absent) prints nothing here; gpu_check.sh says why it skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedpipe_dist.io.hdf5 import Results  # noqa: E402

# tuned+measured is the tuned default on GPUs (step cost measured; the kept adapter refactored by orth since
# 2026-12-05); tuned+carry=adapter is the kept adapter with t0 given and lora.rebalance=none (the earlier default)
CLOCK_ROWS = {"lora": "LoRA", "lora_hb": "lora_hb", "tuned+carry=adapter": "kept adapter",
              "tuned+measured": "GPU default"}


def checks(out: Path) -> None:
    for name in ("quickstart", "nf4"):
        if not (out / name / "results.h5").exists():
            continue
        r = Results(out / name / "results.h5")
        pred, meas = r.clients["pred_mem_bytes"][1:], r.clients["peak_mem_bytes"][1:]
        print(f"{name}: final eval loss {r.last_eval_loss():.4f}; peak memory measured / predicted per server: "
              + ", ".join(f"{m / 2**20:.0f}/{p / 2**20:.0f} MiB" for m, p in zip(meas[-1], pred[-1])))
    if (out / "step_ops.json").exists():
        d = json.loads((out / "step_ops.json").read_text())
        for m, v in d["models"].items():
            e, p = v["engine"], v["peft"]
            kernels = (f", CUDA kernels {e['cuda_kernels']:.0f} vs {p['cuda_kernels']:.0f}"
                       if e.get("cuda_kernels") is not None and p.get("cuda_kernels") is not None else "")
            print(f"step_ops {m}: engine {e['aten_ops']:.0f} ops per step vs peft {p['aten_ops']:.0f}{kernels}")
    for f in sorted(out.glob("step_vs_peft*.json")):
        d = json.loads(f.read_text())
        for m, v in d["models"].items():
            mem = f", peak {v['peak_mem_bytes'] / 2**30:.1f} GiB" if v.get("peak_mem_bytes") else ""
            print(f"{f.stem} {m}: engine {v['median_tokens_per_s']['engine']:.0f} tok/s vs peft "
                  f"{v['median_tokens_per_s']['peft']:.0f} ({v['engine_vs_peft']:.3f}x), engine "
                  f"{v['share_of_peak']['engine']:.0%} of the matmul peak{mem}")
    if (out / "scale_7b_micro.json").exists():
        m = json.loads((out / "scale_7b_micro.json").read_text())
        print(f"scale_7b micro ({m['device']}, {m['hidden']} wide, stacked rank {m['stack_rank']}): merge "
              f"{m['merge_s']:.4f} s per layer, sampled check {m['check_s']:.4f} s, exact check "
              f"{m['exact_check_s']:.4f} s, importance {m['importance_s']:.4f} s, copy bandwidth "
              f"{m['copy_bw'] / 1e9:.0f} GB/s")


def step_seconds(h5: Path) -> dict:
    """The fastest server's median seconds per local step (its charged seconds / slowdown / steps) and batch."""
    r = Results(h5)
    c, slow = r.clients, np.asarray(r.profile["slowdown"], dtype=float)
    k = int(np.argmin(slow))
    steps, local = c["local_steps"][1:, k].astype(float), c["local_s"][1:, k] / slow[k]
    ok = steps > 0
    return {"batch": int(c["batch_size"][1, k]), "step_s": float(np.median(local[ok] / steps[ok]))}


def clock(out: Path) -> dict:
    """Per profile and seed: each row's speedup over LoRA on the measured clock (and work units, flat steps),
    the measured row's fitted step cost, the fastest server's step seconds; mean and sd over the seeds."""
    summary = {}
    for f in sorted(out.glob("clock.json")):
        for prof, p in json.loads(f.read_text())["profiles"].items():
            seeds = p["seeds"]
            print(f"clock {prof}: {len(seeds)} seed(s) finished")
            per = {row: {k: [] for k in ("speedup", "speedup_work", "speedup_flat")} for row in CLOCK_ROWS}
            fits = []
            for seed, s in sorted(seeds.items()):
                base = out / "clock" / prof / f"seed{seed}"
                cells = []
                for row, label in CLOCK_ROWS.items():
                    v = s["methods"].get(row)
                    if v is None:
                        continue
                    for k in per[row]:
                        per[row][k].append(v[k])
                    cells.append(f"{label} {v['speedup']:.3f} ({v['rounds']} r)")
                lora = step_seconds(base / "lora" / "results.h5")
                fit_h5 = base / "tuned+measured" / "results.h5"
                fit = json.loads(Results(fit_h5).attrs.get("step_fit_json") or "null") if fit_h5.exists() else None
                if fit:
                    fits.append(fit)
                    cells.append(f"fit t0 {fit['t0_s'] * 1e3:.2f} ms + {fit['per_token_s'] * 1e6:.3f} us/token "
                                 f"(o = {fit['overhead_samples']:.1f} samples)")
                print(f"  seed {seed}: " + "; ".join(cells) + f"; LoRA step {lora['step_s'] * 1e3:.1f} ms at "
                      f"batch {lora['batch']}")
            rows = {}
            for row, label in CLOCK_ROWS.items():
                vals = {k: [x for x in v if x is not None and math.isfinite(x)] for k, v in per[row].items()}
                rows[label] = {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))
                               for k, v in vals.items() if v}
                if "speedup" in rows[label]:
                    m, sd, n = rows[label]["speedup"]
                    spread = f" +- {sd:.3f}" if n > 1 else ""
                    print(f"  {label:9s} measured clock {m:.3f}{spread}x LoRA (n={n})" + "".join(
                        f"; {k[8:]} {rows[label][k][0]:.3f}" for k in ("speedup_work", "speedup_flat")
                        if k in rows[label]))
            summary[prof] = {"rows": rows, "fits": fits}
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--clock", action="store_true", help="part 6's table (time_to_quality on the device's clock)")
    a = ap.parse_args(argv)
    if a.clock:
        s = clock(a.out)
        (a.out / "clock_summary.json").write_text(json.dumps(s, indent=1, default=float) + "\n")
    else:
        checks(a.out)


if __name__ == "__main__":
    main()
