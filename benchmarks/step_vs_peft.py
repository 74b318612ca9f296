"""The engine's local training step against peft's LoRA: tokens/s and achieved GFLOP/s, interleaved repeats.

Both train LoRA r=4 on every attention projection (q, k, v, o; GPT-2's fused c_attn with its c_proj for
peft, the engine's q/k/v slices of c_attn and c_proj) with AdamW on the same batches (8 x 64 tokens). The
engine side is the real client step (runtime/client.train_client: adapters attached by hooks, the
sensitivity measurement of Eqn 4 after every backward, gradient clipping); the peft side is
get_peft_model + a plain loop with the same optimizer and clipping. Each repeat runs engine then peft (then
the next repeat), so drift in the machine's speed hits both alike; min and median over repeats.

Models: the pretrained stories260K (with --stories-path), and random-init Llama (34M parameters: 8 layers of
width 512, vocabulary 8,000) and GPT-2 (29M, the same shape, tied embeddings).
GFLOP/s counts the cost model's FLOPs (algorithm/cost.py: forward, backward through the frozen base,
adapter weights) per token; the machine's matmul peak is measured here (runtime/heterogeneity.measure_tflops).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_vs_peft.py --stories-path ../shared/data \\
        [--repeats 3] [--steps 8]

--ops counts instead of timing: the operators each step dispatches (top-level aten ops, torch.profiler; on
CUDA also the kernels launched), engine and peft, the difference by operator. On a GPU a small model's step is
launch-bound, so this count is what its time follows; it is deterministic, so it can be read on a CPU.

Output: a Markdown table on stdout and JSON at --out (default benchmarks/out/step_vs_peft.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._jobs import write_json  # noqa: E402

BATCH, SEQ, RANK = 8, 64, 4


def _models(stories: Path | None, big: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = []
    if big:  # about 1.1B parameters (gpu_check.sh)
        cfg = AutoConfig.for_model("llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                                   num_key_value_heads=16, intermediate_size=5504, vocab_size=32000,
                                   max_position_embeddings=256)
        return [("llama-1B", lambda: _seeded(lambda: AutoModelForCausalLM.from_config(cfg)))]
    if stories is not None:
        folder = stories / "models" / "stories260K-hf" if (stories / "models").is_dir() else stories
        out.append(("stories260K", lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)))
    llama = AutoConfig.for_model("llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=8, intermediate_size=1376, vocab_size=8000,
                                 max_position_embeddings=256)
    gpt2 = AutoConfig.for_model("gpt2", n_embd=512, n_layer=8, n_head=8, vocab_size=8000, n_positions=256)
    for name, cfg in (("llama-34M", llama), ("gpt2-29M", gpt2)):
        out.append((name, lambda c=cfg: _seeded(lambda: AutoModelForCausalLM.from_config(c))))
    return out


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _data(vocab: int, n: int = 256):
    from fedpipe_dist.data.tokenize import TokenizedSet

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, SEQ), generator=g).tolist()
    return TokenizedSet(ids, [8] * n)  # 8 prompt tokens, 56 target tokens per example


def _job(steps: int):
    from fedpipe_dist.job import load_job

    return load_job(None, [f"train.local_steps={steps}", "train.lr=1e-3", "lora.alpha=8", "lora.dropout=0"])


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_step(model, data, steps: int, device, sites=None) -> float:
    """Seconds for `steps` engine client steps (runtime/client.train_client)."""
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.planner import ClientPlan
    from fedpipe_dist.runtime.client import LocalTraining, train_client

    sites = sites or find_sites(model)
    plan = ClientPlan(client=0, batch_size=BATCH, ranks={s.key: RANK for s in sites})
    _sync(device)
    t0 = time.perf_counter()
    train_client(model, sites, plan, data, LocalTraining.of(_job(steps)), round_idx=1, pad_id=0, device=device)
    _sync(device)
    return time.perf_counter() - t0


def qlora_pair(model, device):
    """--qlora: the engine's NF4 base through bitsandbytes (runtime/bases.RankBases), and peft's QLoRA model:
    the same weights saved and loaded back 4-bit by transformers + bitsandbytes (nf4, fp32 compute)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.runtime.bases import RankBases

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        q = AutoModelForCausalLM.from_pretrained(d, device_map={"": device.index or 0}, quantization_config=(
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)))
    q.requires_grad_(False)
    sites = find_sites(model)
    bases = RankBases(model, sites, {"nf4"}, device=device, backend="bitsandbytes")
    bases.use("nf4")
    return model.to(device), sites, q


def peft_step(model, data, steps: int, device) -> float:
    """Seconds for `steps` steps of peft's LoRA on the same kind of batches."""
    import numpy as np
    from peft import LoraConfig, get_peft_model

    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.metrics.perplexity import lm_loss

    gpt2 = model.config.model_type == "gpt2"
    # attention only, as the engine (a regex: GPT-2's MLP has a c_proj too)
    targets = r".*attn\.(c_attn|c_proj)" if gpt2 else r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                  fan_in_fan_out=gpt2))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    rng = np.random.default_rng(0)
    peft_model.train()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = collate(data, rng.choice(len(data), BATCH, replace=False), 0).to(device)
        loss = lm_loss(peft_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    peft_model.unload()  # the base modules back, for the next repeat's engine run
    return seconds


def ops_per_step(step, model, data, device) -> dict:
    """What one step of `step` (engine_step or peft_step) dispatches: the difference between a 5-step and a
    1-step run, over 4 (what happens once per call, building the optimizer or attaching adapters, cancels)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counted = []
    for steps in (1, 5):
        with profile(activities=acts) as prof:
            step(model, data, steps, device)
        events = prof.events()
        top = Counter(e.name for e in events if e.name.startswith("aten::") and (
            e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        # kineto lists each kernel as an event of device type CUDA; older profilers hang them on their op
        kernels = (sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
                   or sum(len(getattr(e, "kernels", ())) for e in events))
        counted.append((top, kernels))
    (top1, k1), (top5, k5) = counted
    by_op = {k: (top5[k] - top1[k]) / 4 for k in set(top5) | set(top1) if top5[k] != top1[k]}
    return {"aten_ops": sum(by_op.values()), "cuda_kernels": (k5 - k1) / 4 if device.type == "cuda" and k5 else None,
            "by_op": by_op}


def count_ops(models, device, out: str) -> None:
    """--ops: the table of operators (and kernels) per step, engine against peft."""
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch": BATCH,
           "seq": SEQ, "rank": RANK, "models": {}}
    print("| model | engine ops / step | peft ops / step | engine / peft | kernels / step (engine, peft) | "
          "largest differences (engine - peft per step) |")
    print("|---|---|---|---|---|---|")
    for name, build in models:
        model = build().to(device)
        model.requires_grad_(False)
        data = _data(model.config.vocab_size)
        engine_step(model, data, 1, device)  # warm-up
        peft_step(model, data, 1, device)
        e, p = ops_per_step(engine_step, model, data, device), ops_per_step(peft_step, model, data, device)
        diff = {k: e["by_op"].get(k, 0) - p["by_op"].get(k, 0) for k in set(e["by_op"]) | set(p["by_op"])}
        big = sorted((k for k in diff if diff[k]), key=lambda k: -abs(diff[k]))[:4]
        doc["models"][name] = {"engine": e, "peft": p}
        counted = e["cuda_kernels"] is not None and p["cuda_kernels"] is not None
        kernels = f"{e['cuda_kernels']:.0f}, {p['cuda_kernels']:.0f}" if counted else "-"
        print(f"| {name} | {e['aten_ops']:.0f} | {p['aten_ops']:.0f} | {e['aten_ops'] / p['aten_ops']:.3f} | "
              f"{kernels} | {', '.join(f'{k[6:]} {diff[k]:+.0f}' for k in big)} |")
    write_json(out, doc)


def flops_per_token(model) -> float:
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import flops_per_sample, model_shape

    sites = find_sites(model)
    return flops_per_sample(model_shape(model, sites), {s.key: RANK for s in sites}, SEQ) / SEQ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories-path", type=Path, help="../shared/data (or the stories260K-hf folder itself)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="model names to run (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--big", action="store_true", help="a random-init Llama of about 1.1B parameters only")
    ap.add_argument("--qlora", action="store_true", help="NF4 bases: the engine's (bitsandbytes) vs peft QLoRA "
                    "(CUDA only)")
    ap.add_argument("--ops", action="store_true", help="count the operators (and CUDA kernels) per step instead "
                    "of timing (out: benchmarks/out/step_ops.json unless --out)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/step_vs_peft.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.ops:
        models = [(n, b) for n, b in _models(args.stories_path, big=args.big) if not args.only or n in args.only]
        return count_ops(models, device, args.out or str(REPO / "benchmarks" / "out" / "step_ops.json"))
    args.out = args.out or str(REPO / "benchmarks" / "out" / "step_vs_peft.json")
    from fedpipe_dist.runtime.heterogeneity import measure_tflops

    # the best of a few sizes: a small matmul understates what the models' larger ones reach
    peak = max(measure_tflops(device, n=n) for n in ((2048, 4096, 8192) if device.type == "cuda" else
                                                     (512, 1024, 2048))) * 1e3
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "qlora": args.qlora,
           "threads": torch.get_num_threads(), "batch": BATCH, "seq": SEQ, "rank": RANK, "steps": args.steps,
           "repeats": args.repeats, "matmul_peak_gflops": peak, "models": {}}
    tokens = args.steps * BATCH * SEQ
    for name, build in _models(args.stories_path, big=args.big):
        if args.only and name not in args.only:
            continue
        model = build()
        model.requires_grad_(False)
        data = _data(model.config.vocab_size)
        fpt = flops_per_token(model)
        if args.qlora:
            if device.type != "cuda":
                raise SystemExit("--qlora needs CUDA (bitsandbytes' NF4 kernels)")
            model, sites, peft_base = qlora_pair(model, device)
        else:
            model, sites = model.to(device), None
            peft_base = model
        engine_step(model, data, 2, device, sites)  # warm-up, both paths
        peft_step(peft_base, data, 2, device)
        eng, pft = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.repeats):
            eng.append(engine_step(model, data, args.steps, device, sites))
            pft.append(peft_step(peft_base, data, args.steps, device))
        tps = {"engine": [tokens / s for s in eng], "peft": [tokens / s for s in pft]}
        med = {k: statistics.median(v) for k, v in tps.items()}
        doc["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt,
            "tokens_per_s": tps, "median_tokens_per_s": med, "min_tokens_per_s": {k: min(v) for k, v in tps.items()},
            "engine_vs_peft": med["engine"] / med["peft"],
            "gflops": {k: v * fpt / 1e9 for k, v in med.items()},
            "share_of_peak": {k: v * fpt / 1e9 / peak for k, v in med.items()},
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    print(f"{doc['device']}: matmul peak {peak:.1f} GFLOP/s ({doc['threads']} CPU thread(s)); {args.steps} steps x "
          f"{BATCH} x {SEQ} tokens, {args.repeats} interleaved repeats\n")
    print("| model | params | engine tok/s (median, min) | peft tok/s (median, min) | engine / peft | engine GFLOP/s "
          "(share of peak) |")
    print("|---|---|---|---|---|---|")
    for name, m in doc["models"].items():
        print(f"| {name} | {m['params'] / 1e6:.2f} M | {m['median_tokens_per_s']['engine']:.0f}, "
              f"{m['min_tokens_per_s']['engine']:.0f} | {m['median_tokens_per_s']['peft']:.0f}, "
              f"{m['min_tokens_per_s']['peft']:.0f} | {m['engine_vs_peft']:.3f} | {m['gflops']['engine']:.2f} "
              f"({m['share_of_peak']['engine']:.0%}) |")
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
