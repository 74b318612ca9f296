"""Table V analog: the base precisions FP32 / FP16 / BF16 / NF8 / NF4 side by side, with the merge that keeps
every update (runtime/bases.py, algorithm/merge.py).

Run on demand (not part of the test suite), from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_bases.py --stories-path ../shared/data
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_bases.py --models gpt2-medium --steps 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_bases.py --stories-path ../shared/data \
        --models stories260K --rounds 10 --no-memory --steps 0      # eval losses only

Per model and precision:
1. Base weight bytes, measured: the bytes of the tensors the base really stores at that precision
   (RankBases.base_bytes: codes + absmax scales of every block linear, or its 16/32-bit matrix, plus the
   embeddings, norms and LM head as loaded), and the block linears alone.
2. Residual bytes: the merged-update residual once it is dense (its cap, reached after enough rounds:
   2 bytes per adapted parameter), and that per base parameter.
3. Peak memory of one local training step (uniform LoRA rank --rank on q, k, v, o; batch --batch; seq_len
   --seq-len), one fresh subprocess per precision, residual at its cap. CUDA: torch.cuda.max_memory_allocated.
   CPU (no GPU here): the bytes of every tensor alive before the step (base at its precision, residual,
   adapters, AdamW moments), counted exactly, + the peak of bytes torch's CPU allocator handed out during
   the step and had not yet freed (torch.profiler profile_memory, as benchmarks/cost_model.py measures).
4. Step time: all precisions share one model in one process (RankBases holds every view) and are
   interleaved step by step after a warm-up; median seconds and the ratio to FP32's, measured in the same run.
5. stories260K only (needs its weights): eval loss on the E2E dev set after the same rounds of the same
   uniform plan (4 servers, all on the precision, no slowdowns), each run evaluated on its own base; the
   lowest absorbed fraction over all rounds and the residual's bytes per parameter, from results.h5.

Output: Markdown on stdout and JSON at --out (default benchmarks/out/quantized_bases.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:  # run as a plain script from a checkout
        sys.path.insert(0, str(p))

from _jobs import write_json  # noqa: E402
from cost_model import Trainer, Variant, build, fixed_length_set, profiled_peak_bytes  # noqa: E402

from fedpipe_dist.adapters.sites import find_sites  # noqa: E402
from fedpipe_dist.config import JobConfig  # noqa: E402
from fedpipe_dist.runtime.bases import RankBases  # noqa: E402

PRECISIONS = ["fp32", "fp16", "bf16", "nf8", "nf4"]
# The benchmark's shapes: the shared stories260K weights, and GPT-2 medium's published shape (random init;
# 50,257-row embedding, so the share of unquantized parameters is the real model's).
SHAPES = {"stories260K": ("stories260K", None),
          "gpt2-medium": ("gpt2-256", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257))}


def make(model_key: str, seed: int, stories_path: str | None):
    name, overrides = SHAPES[model_key]
    return build(name, seed=seed, stories_path=stories_path, overrides=overrides)


@torch.no_grad()
def fill_residual(bases: RankBases, sites, seed: int) -> None:
    """Merge one dense update of 1 % of each weight's norm: every residual goes dense (its cap)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for s in sites:
        d = torch.randn(s.out_features, s.in_features, generator=g)
        deltas[s.key] = d * (0.01 / d.norm())
    bases.merge(deltas, {s.key: s for s in sites}, measure=False)


# ---- memory: one subprocess per precision ---------------------------------------------------------------


def memory_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = make(spec["model"], spec["seed"], spec["stories_path"])
    sites = find_sites(model)
    p = spec["precision"]
    bases = RankBases(model, sites, {p}, device=device, backend=spec["backend"])
    model.to(device)
    fill_residual(bases, sites, spec["seed"])
    v = Variant(spec["batch"], spec["seq_len"], "qkvo", spec["rank"])
    data = fixed_length_set(tok, v.seq_len, 4 * v.batch, spec["seed"])
    tr = Trainer(v, sites, data, JobConfig(), tok.pad_token_id, spec["seed"])
    tr.adapters.to(device)
    tr.opt = torch.optim.AdamW(tr.adapters.parameters(), lr=1e-4)
    model.train()
    out = dict(base_bytes=bases.base_bytes(p), block_bytes=bases.block_weight_bytes(p),
               residual_bytes=bases.residual_bytes(), base_params=bases.base_params, device=device.type)
    with tr.adapters.attach(model):
        tr.step(model)  # AdamW moments, kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            tr.step(model)
            torch.cuda.synchronize()
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
            out["how"] = "torch.cuda.max_memory_allocated"
            return out
        tr.step(model)
        adapters = sum(t.numel() * t.element_size() for t in tr.adapters.parameters())
        moments = sum(t.numel() * t.element_size() for st in tr.opt.state.values() for t in st.values()
                      if torch.is_tensor(t))
        window = profiled_peak_bytes(lambda: tr.step(model))
    static = out["base_bytes"] + out["residual_bytes"] + adapters + moments
    out.update(peak_bytes=static + window, static_bytes=static, step_window_bytes=window,
               how="static tensor bytes + torch.profiler peak of CPU allocations during the step")
    return out


def measure_memory(args, model_key: str, precision: str) -> dict:
    spec = dict(model=model_key, precision=precision, seed=args.seed, stories_path=args.stories_path,
                batch=args.batch, seq_len=args.seq_len, rank=args.rank, threads=args.threads, backend=args.backend)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory of {model_key} at {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- step time: every precision in one process, interleaved ------------------------------------------------


def step_times(args, model_key: str) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = make(model_key, args.seed, args.stories_path)
    sites = find_sites(model)
    bases = RankBases(model, sites, set(args.precisions), device=torch.device("cpu"), backend=args.backend)
    fill_residual(bases, sites, args.seed)
    v = Variant(args.batch, args.seq_len, "qkvo", args.rank)
    data = fixed_length_set(tok, v.seq_len, 4 * v.batch, args.seed)
    trainers = {p: Trainer(v, sites, data, JobConfig(), tok.pad_token_id, args.seed) for p in args.precisions}
    model.train()
    times = {p: [] for p in args.precisions}
    rng = np.random.default_rng(args.seed)
    for r in range(args.warmup + args.steps):
        for p in rng.permutation(args.precisions):  # a fresh order each round: drift hits all alike
            bases.use(p)
            with trainers[p].adapters.attach(model):  # hooks bind to the installed modules
                t0 = time.perf_counter()
                trainers[p].step(model)
                dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[p].append(dt)
    med = {p: float(np.median(t)) for p, t in times.items()}
    return {p: dict(median_s=med[p], ratio_to_fp32=med[p] / med["fp32"] if "fp32" in med else None,
                    samples=times[p]) for p in args.precisions}


# ---- eval loss after the same rounds (stories260K on E2E) --------------------------------------------------


def eval_runs(args) -> dict:
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.io.hdf5 import Results
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.engine import run_job

    root = Path(args.stories_path or os.environ.get("FEDPIPE_SHARED_DATA", ""))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.precisions:
            over = [f"model.name_or_path={root / 'models' / 'stories260K-hf'}",
                    f"data.train_path={root / 'e2e' / 'trainset.csv'}", f"data.eval_path={root / 'e2e' / 'devset.csv'}",
                    f"rounds={args.rounds}", "clients.slowdown=1", "plan.mode=uniform", f"lora.rank={args.rank}",
                    f"clients.precision={p}", f"eval.max_samples={args.eval_samples}", f"eval.every={args.rounds}",
                    f"data.max_train_samples={args.train_samples}", f"quant.backend={args.backend}",
                    f"output.dir={Path(tmp) / p}", f"seed={args.seed}"]
            cfg = load_job(str(REPO / "jobs" / "e2e_stories260k.yaml"), over)
            t0 = time.perf_counter()
            run_job(cfg, LocalComm(), show_progress=False)
            r = Results(Path(tmp) / p / "results.h5")
            out[p] = dict(eval_loss_round0=float(r.rounds["eval_loss"][0]), eval_loss=r.last_eval_loss(),
                          absorbed_min=float(np.nanmin(r.clients["absorbed"][1:])),
                          extra_bytes_per_param=float(r.clients["extra_bytes_per_param"][-1].max()),
                          wall_s=time.perf_counter() - t0)
    ref = out.get("fp32", {}).get("eval_loss")
    for v in out.values():
        v["loss_vs_fp32"] = v["eval_loss"] / ref - 1 if ref else None
    return out


# ---- report --------------------------------------------------------------------------------------------------


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.2f}"


def markdown(doc: dict) -> str:
    lines = []
    for model_key, res in doc["models"].items():
        lines += [f"### {model_key}", "",
                  "| precision | base MiB (x fp32) | block linears MiB (x fp32) | residual at cap MiB (B/param) "
                  "| peak step MiB (x fp32) | step s (x fp32) | eval loss R0 -> R (vs fp32) | min absorbed |",
                  "|---|---|---|---|---|---|---|---|"]
        mem, st, ev = res.get("memory", {}), res.get("step_time", {}), res.get("eval", {})
        f32 = mem.get("fp32", {})
        for p in doc["precisions"]:
            m, s, e = mem.get(p, {}), st.get(p, {}), ev.get(p, {})

            def rel(key, m=m):
                return f" ({m[key] / f32[key]:.3f})" if key in m and f32.get(key) else ""
            resid = (f"{_mib(m['residual_bytes'])} ({m['residual_bytes'] / m['base_params']:.3f})"
                     if "residual_bytes" in m else "-")
            step = f"{s['median_s']:.4f} ({s['ratio_to_fp32']:.2f})" if s else "-"
            loss = (f"{e['eval_loss_round0']:.4f} -> {e['eval_loss']:.4f} ({100 * e['loss_vs_fp32']:+.2f} %)"
                    if e else "-")
            absorbed = f"{e['absorbed_min']:.6f}" if e else "-"
            lines.append(f"| {p} | {_mib(m.get('base_bytes'))}{rel('base_bytes')} | "
                         f"{_mib(m.get('block_bytes'))}{rel('block_bytes')} | {resid} | "
                         f"{_mib(m.get('peak_bytes'))}{rel('peak_bytes')} | {step} | {loss} | "
                         f"{absorbed} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["stories260K", "gpt2-medium"], choices=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS)
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per precision (0: no timing)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the stories260K eval runs")
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="skip the stories260K eval-loss runs")
    ap.add_argument("--backend", default="auto", choices=["auto", "bitsandbytes", "native"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "quantized_bases.json"))
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return {}
    has_stories = bool(args.stories_path) and (Path(args.stories_path) / "models" / "stories260K-hf").is_dir()
    doc = dict(command=" ".join(sys.argv), precisions=args.precisions, batch=args.batch, seq_len=args.seq_len,
               rank=args.rank, torch=torch.__version__, machine=platform.machine(),
               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, models={})
    for model_key in args.models:
        if model_key == "stories260K" and not has_stories:
            print("skipping stories260K: no weights (give --stories-path DIR holding models/stories260K-hf)",
                  file=sys.stderr)
            continue
        res = {}
        if not args.no_memory:
            res["memory"] = {p: measure_memory(args, model_key, p) for p in args.precisions}
        if args.steps > 0:
            res["step_time"] = step_times(args, model_key)
        if model_key == "stories260K" and not args.no_train:
            res["eval"] = eval_runs(args)
        doc["models"][model_key] = res
        print(f"{model_key} done", file=sys.stderr, flush=True)
    write_json(args.out, doc)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
