"""Per-round costs at LLaMA-2-7B width, measured on the real engine with the model cut to a few decoder layers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_7b.py            # layers 1 and 2, about 15 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_7b.py --layers 1 --rounds 2 --out benchmarks/out/s.json
    .venv/bin/python benchmarks/scale_7b.py --micro-only --device cuda     # one layer's merge etc. on a GPU

What runs: a LlamaForCausalLM with LLaMA-2-7B's shape (hidden 4096, 32 heads, MLP 11008, vocab 32000; random
init, built here and saved to a temporary folder, no download) and `--layers` decoder layers, trained by
`fedpipe run` under torchrun on 2 gloo ranks (CPU) with the alpaca_llama2_7b.yaml servers' setting (16
servers, 15 sampled, LoRA on q, k, v, o at ranks 2-16, FedPipe's planner), batch 1, `--seq` tokens, one local
step, fp32 bases, for `--rounds` rounds, twice: with every checkpoint full (checkpoint.full_every=1, what
every checkpoint was before) and with the default chain (full_every=50: the rounds' merged updates).

Per phase, from results.h5 (rounds/plan_s ... record_s, wait_s, bytes; checkpoint_s) and from the checkpoint
files, at each layer count; then a least-squares line cost = fixed + per_layer * L through them, read at
L = 32. Two phases inside the merge and the training are also timed in this process on one 7B layer's
four 4096 x 4096 weights with the plan's stacked rank: the merge's fidelity check (sampled, as the engine
does it, and exact, as it did) and the importance measurement (PLATON's singular values of each B A).

Shares: of a round of the alpaca_llama2_7b.yaml plan on an A100-class GPU, whose training time is the cost
model's (50 local steps x the slowest server's predicted step; clients.tflops set to --a100-tflops), and,
for the phases that move memory, the CPU seconds scaled by (this CPU's measured copy bandwidth / the A100's
1.55 TB/s): an estimate, stated as such, never a GPU measurement (benchmarks/gpu_check.sh runs it there).

Output: a Markdown table on stdout, JSON at --out (default benchmarks/out/scale_7b.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._jobs import torchrun_job, write_json  # noqa: E402

SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
             vocab_size=32000, max_position_embeddings=4096)
FULL_LAYERS = 32
A100_BW = 1.555e12  # bytes/s, A100 40 GB HBM2
LLAMA2_7B_PARAMS = 6.74e9
PHASES = ("plan_s", "train_s", "sync_s", "wait_s", "exchange_s", "merge_s", "record_s", "eval_s")
MEMORY_BOUND = ("merge_s", "check_s", "exact_check_s", "importance_s")  # scaled to the GPU by bandwidth


def build_model(folder: Path, layers: int) -> None:
    """A LLaMA-2-7B-shaped model with `layers` decoder layers (random init, seeded) and our byte-level
    tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpipe_dist.models import byte_level_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0))
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)


def job_args(model: Path, out: Path, args, full_every: int) -> list[str]:
    return ["jobs/alpaca_llama2_7b.yaml", f"model.name_or_path={model}", f"model.max_length={args.seq}",
            "model.dtype=float32", "data.name=synthetic-e2e", "data.synthetic_train_size=64",
            "data.synthetic_eval_size=8", "clients.memory_gb=64", "clients.slowdown=1", "clients.tflops=1",
            "clients.precision=fp32", "train.local_steps=1", "train.batch_max=1", f"rounds={args.rounds}",
            "eval.max_samples=8", "eval.batch_size=8", "eval.final_full=false", "output.save_final=false",
            f"checkpoint.full_every={full_every}", f"output.dir={out}", "output.overwrite=true"]


def measure_run(out: Path, rounds: int) -> dict:
    """Mean per round of each phase and byte count, checkpoint bytes per rank, rank 0's peak memory."""
    import h5py

    from fedpipe_dist.io.hdf5 import Results

    r = Results(out / "results.h5")
    rows, trained = r.rounds, r.rounds["round"] > 0
    m = {p: float(np.mean(rows[p][trained])) for p in PHASES}
    with h5py.File(out / "results.h5", "r", locking=False) as f:
        m["checkpoint_s"] = float(f.attrs["checkpoint_s"]) / rounds
    m["bytes_up"] = float(np.mean(rows["bytes_up"][trained]))
    m["bytes_down"] = float(np.mean(rows["bytes_down"][trained]))
    files = sorted((out / "checkpoint").glob("round*.rank*of0002.pt"))
    m["checkpoint_bytes_per_rank"] = float(np.mean([p.stat().st_size for p in files]))
    hosted0 = [c for c in range(r.clients["peak_mem_bytes"].shape[1]) if c % 2 == 0]
    m["rank0_peak_bytes"] = float(max(np.nanmax(r.clients["peak_mem_bytes"][1:, hosted0]),
                                      np.max(rows["agg_peak_bytes"][trained])))
    stack = r.clients["ranks"][1:].sum(axis=1)  # [round, layer, kind] summed over servers
    m["stack_rank_mean"] = float(stack[stack > 0].mean())
    return m


def micro(stack_rank: int, *, device: str = "cpu", hidden: int = 4096, reps: int = 5) -> dict:
    """One 7B layer's four attention weights (hidden x hidden) on `device`: the merge without and with its
    fidelity check (sampled, and the exact check it replaced), the importance measurement of 15 servers'
    rank-4 factors (per rank of 2), and the device's copy bandwidth (for the GPU estimate)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.importance import mean_singular_value
    from fedpipe_dist.runtime import bases as bases_mod
    from fedpipe_dist.runtime.bases import RankBases

    dev = torch.device(device)
    cfg = LlamaConfig(**{**SHAPE, "hidden_size": hidden, "intermediate_size": 64, "vocab_size": 64},
                      num_hidden_layers=1)
    model = LlamaForCausalLM(cfg).eval().to(dev)
    sites = find_sites(model)
    by_key = {s.key: s for s in sites}
    bases = RankBases(model, sites, {"fp32"}, device=dev)
    g = torch.Generator().manual_seed(0)
    deltas = {s.key: ((torch.randn(s.out_features, stack_rank, generator=g) * 1e-3).to(dev),
                      (torch.randn(stack_rank, s.in_features, generator=g) * 1e-3).to(dev)) for s in sites}
    exact = bases_mod._check_rows

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def exact_merge() -> None:
        bases_mod._check_rows = lambda o, i: None
        try:
            bases.merge(deltas, by_key, measure=True)
        finally:
            bases_mod._check_rows = exact

    variants = {"merge_s": lambda: bases.merge(deltas, by_key, measure=False),
                "merge_sampled_check_s": lambda: bases.merge(deltas, by_key, measure=True),
                "merge_exact_check_s": exact_merge}
    best = {k: float("inf") for k in variants}
    for _ in range(reps):  # interleaved, so that drifting load hits the variants alike
        for k, fn in variants.items():
            best[k] = min(best[k], timed(fn))
    out = {"device": device, "hidden": hidden, "stack_rank": stack_rank, **best}
    out["check_s"] = out["merge_sampled_check_s"] - out["merge_s"]
    out["exact_check_s"] = out["merge_exact_check_s"] - out["merge_s"]
    factors = [(torch.randn(hidden, 4, generator=g).to(dev), torch.randn(4, hidden, generator=g).to(dev))
               for _ in range(15 * 4)]
    from fedpipe_dist.algorithm.sanitize import update_norm

    own = [{f"s{j}": factors[4 * i + j] for j in range(4)} for i in range(8)]  # one rank's 8 servers, one layer
    out["norms_s"] = min(timed(lambda: [update_norm(u) for u in own]) for _ in range(reps))
    out["importance_s"] = min(timed(lambda: [mean_singular_value(b, a) for b, a in factors]) for _ in range(reps)) / 2
    big = torch.empty(256 * 2**20 // 4, device=dev)
    out["copy_bw"] = 2 * big.numel() * 4 / min(timed(lambda: big.clone()) for _ in range(reps))  # read + write
    return out


def a100_round_s(tflops: float) -> float:
    """Training time of one round of the alpaca_llama2_7b.yaml plan (round 1's) at `tflops` per server."""
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.planning import plan_table

    cfg = load_job("jobs/alpaca_llama2_7b.yaml", [f"clients.tflops={tflops}"])
    _, plans, infos = plan_table(cfg, log=lambda *a: None)
    return cfg.train.local_steps * max(i.predicted_step_s for i in infos)


def fit(layers: list[int], values: list[float]) -> tuple[float, float]:
    """(fixed, per layer) of a least-squares line through (L, value)."""
    if len(layers) == 1:
        return 0.0, values[0] / layers[0]
    per_layer, fixed = np.polyfit(layers, values, 1)
    return float(fixed), float(per_layer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--a100-tflops", type=float, default=156.0,
                    help="achieved bf16 TFLOP/s of an A100-class server (half its 312 peak, as the job's 40 is of a "
                         "3090 Ti's 80)")
    ap.add_argument("--link-gbs", type=float, default=25.0, help="interconnect GB/s for the exchange's estimate "
                    "(200 Gb/s InfiniBand)")
    ap.add_argument("--reuse", action="store_true", help="summarize runs already in --work instead of running them")
    ap.add_argument("--work", type=Path, default=None, help="folder for the models and runs (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "scale_7b.json")
    ap.add_argument("--micro-only", action="store_true", help="only the in-process timings of one layer's merge, "
                    "fidelity check and importance (no job), e.g. on a GPU: benchmarks/gpu_check.sh")
    ap.add_argument("--device", default="cpu", help="device of --micro-only (cpu, cuda)")
    ap.add_argument("--hidden", type=int, default=4096, help="width of --micro-only's layer (4096: LLaMA-2-7B)")
    ap.add_argument("--stack-rank", type=int, default=60, help="rank of --micro-only's merged update (15 x rank 4)")
    args = ap.parse_args(argv)
    if args.micro_only:
        res = micro(args.stack_rank, device=args.device, hidden=args.hidden)
        write_json(args.out, res, indent=2)
        print(json.dumps(res))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="scale_7b_"))
    runs: dict[str, dict[int, dict]] = {"full": {}, "chain": {}}
    for L in args.layers:
        model = work / f"llama7b-{L}layers"
        if not args.reuse and not (model / "config.json").exists():
            build_model(model, L)
        for variant, full_every in (("full", 1), ("chain", 50)):
            out = work / f"run-{L}-{variant}"
            wall = float("nan") if args.reuse else torchrun_job(2, job_args(model, out, args, full_every),
                                                               f"{L} layers, {variant}")
            runs[variant][L] = {**measure_run(out, args.rounds), "job_wall_s": wall}
            print(f"{L} layers, {variant}: {json.dumps(runs[variant][L])}", file=sys.stderr)
    mic = micro(int(round(np.mean([runs["chain"][L]["stack_rank_mean"] for L in args.layers]))))
    result = summarize(runs, mic, args)
    write_json(args.out, result, indent=2)
    print(table(result))
    return 0


def summarize(runs: dict, mic: dict, args) -> dict:
    """Per phase: fixed + per-layer cost through the measured layer counts, read at 32 layers, and an A100-class
    estimate with the model each phase's row states; the non-training total and its share of the A100 round."""
    chain, layers = runs["chain"], args.layers
    round_s = a100_round_s(args.a100_tflops)
    bw_ratio = mic["copy_bw"] / A100_BW
    rows: dict[str, dict] = {}

    def line(key: str, values: list[float], model: str) -> dict:
        fixed, per = fit(layers, values)
        if per < 0:  # a cost that does not grow with width, and noise: its mean
            fixed, per, model = float(np.mean(values)), 0.0, "measured; no growth with the layers: mean over them"
        rows[key] = {"fixed": fixed, "per_layer": per, "at_32": fixed + per * FULL_LAYERS, "model": model}
        return rows[key]

    for k in ("train_s", "wait_s", "eval_s", "merge_s", "checkpoint_s", "exchange_s", "bytes_up", "bytes_down",
              "rank0_peak_bytes"):
        line(k, [chain[L][k] for L in layers], "measured, line through the layer counts")
    for k in ("plan_s", "record_s"):  # per server and per round: no weight is touched
        v = float(np.mean([run[L][k] for run in runs.values() for L in layers]))
        rows[k] = {"fixed": v, "per_layer": 0.0, "at_32": v, "model": "width-independent: mean over all runs"}
    for k in ("check_s", "exact_check_s", "importance_s", "norms_s"):
        rows[k] = {"fixed": 0.0, "per_layer": mic[k], "at_32": mic[k] * FULL_LAYERS,
                   "model": "timed on one 7B layer in this process"}
    for variant in ("full", "chain"):
        line(f"checkpoint_bytes_{variant}", [runs[variant][L]["checkpoint_bytes_per_rank"] for L in layers],
             "file sizes, rank 0 and rank 1")
    for k, row in rows.items():
        if not k.endswith("_s") or k in ("train_s", "wait_s", "eval_s"):
            continue
        if k in MEMORY_BOUND:
            row["a100_s"], why = row["at_32"] * bw_ratio, f"x CPU copy bandwidth / A100's ({bw_ratio:.2e})"
        elif k == "exchange_s":  # rank 0 receives every upload, then broadcasts one payload (bytes_down / 16)
            payload = rows["bytes_up"]["at_32"] + rows["bytes_down"]["at_32"] / 16
            row["a100_s"], why = payload / (args.link_gbs * 1e9), f"bytes up + one payload down at {args.link_gbs} GB/s"
        else:
            row["a100_s"], why = row["at_32"], "CPU seconds as measured (host work, this machine's disk)"
        row["model"] += f"; A100: {why}"
        row["share"] = row["a100_s"] / round_s
    non_training = ("plan_s", "norms_s", "exchange_s", "merge_s", "importance_s", "record_s", "checkpoint_s")
    total = sum(rows[k]["a100_s"] for k in non_training)
    # evaluation as alpaca_llama2_7b.yaml sets it: eval.max_samples examples of max_length tokens, forward only,
    # shared by its 16 ranks (an upper bound: examples are often shorter)
    from fedpipe_dist.job import load_job

    job = load_job("jobs/alpaca_llama2_7b.yaml", [])
    K = job.checkpoint.full_every
    eval_s = 2 * LLAMA2_7B_PARAMS * job.eval.max_samples * job.model.max_length / (16 * args.a100_tflops * 1e12)
    return {"layers": layers, "rounds": args.rounds, "seq": args.seq, "runs": runs, "micro": mic,
            "a100_tflops": args.a100_tflops, "link_gbs": args.link_gbs, "a100_round_train_s": round_s,
            "copy_bw_ratio_to_a100": bw_ratio, "phases": rows, "non_training": list(non_training),
            "non_training_a100_s": total, "non_training_share": total / round_s,
            "alpaca_eval_a100_s": eval_s, "alpaca_eval_share": eval_s / round_s,
            "eval_samples": job.eval.max_samples, "with_eval_share": (total + eval_s) / round_s,
            "checkpoint_bytes_ratio": rows["checkpoint_bytes_chain"]["at_32"] / rows["checkpoint_bytes_full"]["at_32"],
            # with a full snapshot every K rounds (the default K), per round on average
            "checkpoint_bytes_ratio_amortized": (rows["checkpoint_bytes_full"]["at_32"]
                                                 + (K - 1) * rows["checkpoint_bytes_chain"]["at_32"])
            / K / rows["checkpoint_bytes_full"]["at_32"], "full_every": K}


def table(res: dict) -> str:
    def fmt(k, v):
        return f"{v / 2**20:,.1f} MiB" if "bytes" in k else f"{v:.3f} s"

    lines = ["| per round | fixed | per layer | at 32 layers (CPU) | A100-class estimate | share of A100 round |",
             "|---|---|---|---|---|---|"]
    for k, row in res["phases"].items():
        gpu = f"{row['a100_s']:.3f} s" if "a100_s" in row else "-"
        share = f"{100 * row['share']:.2f} %" if "share" in row else "-"
        lines.append(f"| {k} | {fmt(k, row['fixed'])} | {fmt(k, row['per_layer'])} | {fmt(k, row['at_32'])} | "
                     f"{gpu} | {share} |")
    lines.append(f"\nA100 round (cost model, {res['a100_tflops']:.0f} TFLOP/s): {res['a100_round_train_s']:.2f} s of "
                 f"training; non-training ({', '.join(res['non_training'])}): {res['non_training_a100_s']:.3f} s = "
                 f"{100 * res['non_training_share']:.1f} %; the job's evaluation ({res['eval_samples']} examples, at "
                 f"most): {res['alpaca_eval_a100_s']:.2f} s = {100 * res['alpaca_eval_share']:.1f} %; both: "
                 f"{100 * res['with_eval_share']:.1f} %; checkpoint bytes per round per rank, chain / full: "
                 f"{res['checkpoint_bytes_ratio']:.4f} (with a full one every {res['full_every']} rounds: "
                 f"{res['checkpoint_bytes_ratio_amortized']:.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
