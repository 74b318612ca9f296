"""The planner's cost model (fedpipe_dist/algorithm/cost.py) checked against measurement on this machine.

Run on demand (not part of the test suite), from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py                  # llama-256, about 3 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py --model gpt2-256 \
        --out benchmarks/out/cost_model_gpt2.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py --no-memory --reps 50   # step times only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py --model stories260K \
        --stories-path ../shared/data          # the shared stories260K weights (Python-bound: tiny)

Two checks, both on CPU in fp32 with real LoRAAdapters hooked into a real (randomly initialized, seeded)
model fed with synthetic E2E examples (data.synthetic_e2e -> tokenize_pairs -> collate), every example
exactly seq_len tokens long so that seq_len in the cost model is the length actually trained on:

1. Step time. A "step" is exactly the body of the loop in runtime/client.py::train_client: collate,
   lm_loss, backward, Eqn-4 sensitivity per adapter, gradient clipping, AdamW step on the adapters,
   zero_grad, loss.item(). For each pair of plans (ClientPlans from planner.uniform_plan) the predicted
   ratio of step times is (b_A * f_c(A)) / (b_B * f_c(B)) with f_c = cost.flops_per_sample; the measured
   ratio is median(step time A) / median(step time B). All variants share one model in one process and
   are interleaved: every round runs one timed step of every variant, in a fresh seeded order, after
   `--warmup` untimed interleaved rounds, so load from other processes hits all variants alike. Also
   reported: forward / backward / update phase medians, and a least-squares fit t = t0 + F / R over all
   variants (t0: fixed per-step time, R: effective FLOP/s), to explain misses.
2. Memory. Each (batch, seq_len, ranks, attention) point runs in a fresh subprocess: build the model,
   one step (AdamW states, kernel init), a second step, then a third under
   torch.profiler(profile_memory=True). Measured peak = bytes of the tensors alive before the step (base
   parameters and buffers, adapter weights, AdamW moments: counted exactly) + the peak of bytes allocated
   by torch's CPU allocator during the profiled step and not yet freed ("Total Allocated" of the
   profiler's [memory] events). Coarser, for reference: the growth of the resident set during the first
   and the second step (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before).
   Predicted = cost.memory_bytes(precision="fp32"). Then, unless --no-fit, the activation constants are
   measured: the same step for four variations of the model's shape (half the layers, twice d_ff, twice
   d_model, each with vocab 8192) gives the floats kept per token per layer per d_model and per d_ff, and
   the copies of the logits, to compare with cost.py's per-architecture act_d, act_ff and 3 (fit_activation_constants).

Output: Markdown tables on stdout and JSON at `--out` (default benchmarks/out/cost_model.json).
Threads: torch.set_num_threads(--threads, default 1): one core, so that the second core of a 2-core
machine absorbs other load and timings stay comparable.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from benchmarks._jobs import write_json  # noqa: E402
from fedpipe_dist.adapters.lora import LoRAAdapters  # noqa: E402
from fedpipe_dist.adapters.sites import KINDS, find_sites  # noqa: E402
from fedpipe_dist.algorithm.cost import (  # noqa: E402
    activation_bytes,
    adapter_params,
    base_weight_bytes,
    flops_per_sample,
    memory_bytes,
    model_shape,
)
from fedpipe_dist.algorithm.importance import SensitivitySum  # noqa: E402
from fedpipe_dist.algorithm.planner import uniform_plan  # noqa: E402
from fedpipe_dist.config import JobConfig  # noqa: E402
from fedpipe_dist.data import format_example  # noqa: E402
from fedpipe_dist.data.synthetic import synthetic_e2e  # noqa: E402
from fedpipe_dist.data.tokenize import TokenizedSet, collate, tokenize_pairs  # noqa: E402
from fedpipe_dist.metrics.perplexity import lm_loss  # noqa: E402
from fedpipe_dist.runtime.client import batch_indices  # noqa: E402

CONFIG_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
               "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "vocab_size",
               "tie_word_embeddings")
DEFAULT_OUT = REPO / "benchmarks" / "out" / "cost_model.json"
TARGET_REL_ERROR = 0.25
STORIES_REL = Path("models") / "stories260K-hf"

# Built-in shapes: big enough that matmuls, not Python, dominate a step on one CPU core.
MODELS = {
    "llama-256": dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=688, max_position_embeddings=1024,
                      tie_word_embeddings=True),
    "gpt2-256": dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # fedpipe_dist.models' own tiny model (hidden 64, 2 layers): seconds, for the test; Python-bound.
    "tiny-llama": None,
    # Needs --stories-path DIR or FEDPIPE_SHARED_DATA=DIR holding models/stories260K-hf (weights + tokenizer).
    "stories260K": None,
}
BUILT_IN_SPECS = sorted(k for k, v in MODELS.items() if v)


# ---- variants (plans) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    batch: int
    seq_len: int
    targets: str  # e.g. "qkvo" or "q"
    rank: int
    attn: str = "sdpa"  # attention implementation (memory points; the timed steps always run sdpa)

    @property
    def name(self) -> str:
        extra = "" if self.attn == "sdpa" else f" {self.attn}"
        return f"b{self.batch} T{self.seq_len} r{self.rank} {self.targets}{extra}"

    def plan(self, sites):
        return uniform_plan(sites, 1, targets=list(self.targets), rank=self.rank, batch_size=self.batch)[0]

    def to_dict(self) -> dict:
        return dict(name=self.name, batch=self.batch, seq_len=self.seq_len, targets=self.targets,
                    rank=self.rank, attn=self.attn)


def parse_variant(text: str) -> Variant:
    """'B:T:TARGETS:R[:ATTN]', e.g. '8:128:qkvo:4' or '8:256:qkvo:4:eager'."""
    parts = text.split(":")
    if len(parts) not in (4, 5) or not set(parts[2]) <= set(KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected B:T:TARGETS:R[:ATTN], e.g. 8:128:qkvo:4")
    attn = parts[4] if len(parts) == 5 else "sdpa"
    return Variant(int(parts[0]), int(parts[1]), parts[2], int(parts[3]), attn)


def default_pairs(T: int) -> list[tuple[str, Variant, Variant]]:
    v = Variant
    return [
        ("batch 8 vs 2", v(8, T, "qkvo", 4), v(2, T, "qkvo", 4)),
        ("rank 16 qkvo vs rank 2 q", v(8, T, "qkvo", 16), v(8, T, "q", 2)),
        ("b4 r16 vs b8 r4", v(4, T, "qkvo", 16), v(8, T, "qkvo", 4)),
        ("b4 2T vs b8 T (attention)", v(4, 2 * T, "qkvo", 4), v(8, T, "qkvo", 4)),
        ("batch 8 vs 1", v(8, T, "qkvo", 4), v(1, T, "qkvo", 4)),
    ]


def default_memory_points(T: int) -> list[Variant]:
    v = Variant
    return [v(1, T, "qkvo", 4), v(4, T, "qkvo", 4), v(8, T, "qkvo", 4), v(16, T, "qkvo", 4),
            v(8, T, "qkvo", 16), v(8, T, "q", 2), v(4, 2 * T, "qkvo", 4), v(4, 2 * T, "qkvo", 4, "eager")]


# ---- model and data ---------------------------------------------------------------------------------------


def stories_dir(stories_path: str | None) -> Path:
    root = stories_path or os.environ.get("FEDPIPE_SHARED_DATA")
    if not root:
        raise SystemExit("--model stories260K needs --stories-path DIR or FEDPIPE_SHARED_DATA=DIR "
                         f"(a folder holding {STORIES_REL})")
    p = Path(root) / STORIES_REL
    if not (p / "config.json").is_file():
        raise SystemExit(f"{p} holds no config.json")
    return p


def build(model_name: str, *, seed: int, attn: str = "sdpa", stories_path: str | None = None,
          overrides: dict | None = None):
    """(model, tokenizer): a frozen fp32 causal LM on CPU, initialized from `seed` (or loaded weights).

    `overrides` replace entries of a built-in spec (MODELS), e.g. {"num_hidden_layers": 2}; the tokenizer
    stays the byte-level one, so a larger vocab_size only adds (unused) rows to the embedding and LM head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedpipe_dist.models import byte_level_tokenizer, load_tokenizer, tiny_config

    if model_name == "stories260K":
        path = str(stories_dir(stories_path))
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    else:
        tok = byte_level_tokenizer()
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        if overrides and MODELS.get(model_name) is None:
            raise SystemExit(f"{model_name}: shape overrides need a built-in spec {BUILT_IN_SPECS}")
        if model_name == "tiny-llama":
            config = tiny_config("tiny-llama", ids["vocab_size"], ids["bos_token_id"], ids["eos_token_id"],
                                 ids["pad_token_id"])
        else:
            spec = {**ids, **MODELS[model_name], **(overrides or {})}
            config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        model = model.float()
    model.requires_grad_(False)
    return model, tok


def fixed_length_set(tok, seq_len: int, n: int, seed: int) -> TokenizedSet:
    """n examples of exactly seq_len tokens: an E2E prompt, then several references as the target
    (truncated by tokenize_pairs to max_length = seq_len)."""
    rows = synthetic_e2e(n * 16, seed=seed)
    pairs = []
    for i in range(n):
        group = rows[16 * i:16 * (i + 1)]
        prompt, target = format_example(*group[0])
        for src, ref in group[1:]:
            target += " " + ref
        pairs.append((prompt, target))
    limit, tok.model_max_length = tok.model_max_length, 10**9  # targets run past it before truncation:
    try:  # silence the tokenizer's "longer than the maximum" warning for text we cut to seq_len anyway
        ts = tokenize_pairs(tok, pairs, max_length=seq_len)
    finally:
        tok.model_max_length = limit
    short = [len(x) for x in ts.input_ids if len(x) != seq_len]
    if short:
        raise SystemExit(f"seq_len {seq_len}: {len(short)} examples are shorter ({min(short)} tokens); "
                         "use a smaller --seq-len")
    return ts


class Trainer:
    """One variant's adapters, optimizer and batch stream, set up as train_client sets them up."""

    def __init__(self, variant: Variant, sites, data: TokenizedSet, cfg: JobConfig, pad_id: int, seed: int):
        self.variant = variant
        self.plan = variant.plan(sites)
        gen = torch.Generator().manual_seed(seed)
        self.adapters = LoRAAdapters(sites, self.plan.ranks, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                     generator=gen)
        self.opt = torch.optim.AdamW(self.adapters.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay)
        self.batches = batch_indices(len(data), self.plan.batch_size, np.random.default_rng(seed))
        self.data, self.cfg, self.pad_id = data, cfg, pad_id
        self.sensitivity = SensitivitySum(self.adapters.site_params())

    def step(self, model) -> tuple[float, float, float]:
        """One step of train_client's loop (adapters attached): (forward, backward, update) seconds."""
        t0 = time.perf_counter()
        batch = collate(self.data, next(self.batches), self.pad_id)
        loss = lm_loss(model, batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.sensitivity.add()  # Eqn 4, as train_client does every step
        if self.cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.adapters.parameters(), self.cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2


def phase_flops(shape, variant: Variant, ranks: dict[str, int]) -> tuple[float, float]:
    """(forward, backward) FLOPs per sample under the cost model's own accounting (see cost.py)."""
    T = variant.seq_len
    by_key = {s.key: s for s in shape.sites}
    ad = sum(r * (by_key[k].in_features + by_key[k].out_features) for k, r in ranks.items() if r > 0) * T
    attn = 4.0 * T * T * shape.d_attn * shape.n_layers
    fwd = 2.0 * shape.linear_params * T + attn + 2.0 * ad
    bwd = 2.0 * shape.linear_params * T + 2 * attn + 4.0 * ad
    return fwd, bwd


# ---- step time --------------------------------------------------------------------------------------------


def run_step_times(args, model, tok, shape, sites, pairs) -> dict:
    cfg = JobConfig()
    variants = []
    for _, a, b in pairs:
        for v in (a, b):
            if v not in variants:
                variants.append(v)
    sets = {T: fixed_length_set(tok, T, args.examples, args.seed) for T in {v.seq_len for v in variants}}
    trainers = [Trainer(v, sites, sets[v.seq_len], cfg, tok.pad_token_id, args.seed + i)
                for i, v in enumerate(variants)]
    times = {v: [] for v in variants}
    phases = {v: [] for v in variants}
    round_times = []  # one dict per timed round, for paired ratios
    rng = np.random.default_rng(args.seed)
    model.train()
    for r in range(args.warmup + args.reps):
        this_round = {}
        for i in rng.permutation(len(trainers)):
            tr = trainers[i]
            with tr.adapters.attach(model):
                fwd, bwd, upd = tr.step(model)
            if r >= args.warmup:
                times[tr.variant].append(fwd + bwd + upd)
                phases[tr.variant].append((fwd, bwd, upd))
                this_round[tr.variant] = fwd + bwd + upd
        if r >= args.warmup:
            round_times.append(this_round)
    model.eval()

    rows = []
    for v, tr in zip(variants, trainers):
        f_c = flops_per_sample(shape, tr.plan.ranks, v.seq_len)
        fwd_f, bwd_f = phase_flops(shape, v, tr.plan.ranks)
        ph = np.median(np.array(phases[v]), axis=0)
        rows.append(dict(**v.to_dict(), adapter_params=adapter_params(shape, tr.plan.ranks),
                         flops_per_sample=f_c, step_flops=v.batch * f_c, times_s=times[v],
                         median_s=float(np.median(times[v])),
                         phases_median_s=dict(forward=float(ph[0]), backward=float(ph[1]),
                                              update=float(ph[2])),
                         backward_over_forward=dict(measured=float(ph[1] / ph[0]), cost_model=bwd_f / fwd_f)))
    by_name = {row["name"]: row for row in rows}

    # Least squares t = t0 + F / R over all variants: fixed per-step seconds and effective FLOP/s.
    F = np.array([row["step_flops"] for row in rows])
    t = np.array([row["median_s"] for row in rows])
    (t0, k), *_ = np.linalg.lstsq(np.stack([np.ones_like(F), F], axis=1), t, rcond=None)
    fit = dict(t0_s=float(t0), flops_per_s=float(1 / k) if k > 0 else None,
               max_abs_residual_s=float(np.max(np.abs(t0 + k * F - t))),
               note="in-sample fit over all timed variants (diagnostic, not a prediction)")

    out_pairs = []
    for label, a, b in pairs:
        ra, rb = by_name[a.name], by_name[b.name]
        pred = ra["step_flops"] / rb["step_flops"]
        meas = ra["median_s"] / rb["median_s"]
        paired = [rt[a] / rt[b] for rt in round_times]
        err = abs(pred / meas - 1)
        out_pairs.append(dict(
            pair=label, a=a.name, b=b.name, predicted_ratio=pred, measured_ratio=meas,
            rel_error=err, within_target=bool(err <= TARGET_REL_ERROR),
            median_paired_ratio=float(np.median(paired)),
            paired_ratio_iqr=[float(np.percentile(paired, 25)), float(np.percentile(paired, 75))],
            fit_ratio=float((t0 + k * ra["step_flops"]) / (t0 + k * rb["step_flops"]))))
    return dict(variants=rows, pairs=out_pairs, fit=fit, target_rel_error=TARGET_REL_ERROR,
                pairs_within_target=sum(p["within_target"] for p in out_pairs), n_pairs=len(out_pairs),
                reps=args.reps, warmup=args.warmup)


# ---- memory (one subprocess per point) --------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def profiled_peak_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator handed out while fn() ran and had not freed again
    (torch.profiler with profile_memory: "Total Allocated" of its [memory] events, less what was live at
    the window's start)."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not events:
        raise RuntimeError("the profiler recorded no CPU memory events")
    start = events[0]["Total Allocated"] - events[0]["Bytes"]  # live in the window's table at its start
    return max(e["Total Allocated"] for e in events) - start


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: peak tensor bytes of one training step for one point."""
    torch.set_num_threads(spec["threads"])
    v = Variant(**{k: spec[k] for k in ("batch", "seq_len", "targets", "rank", "attn")})
    model, tok = build(spec["model"], seed=spec["seed"], attn=v.attn, stories_path=spec.get("stories_path"),
                       overrides=spec.get("overrides"))
    sites = find_sites(model)
    data = fixed_length_set(tok, v.seq_len, max(spec["examples"], 2 * v.batch), spec["seed"])
    tr = Trainer(v, sites, data, JobConfig(), tok.pad_token_id, spec["seed"])
    model.train()
    with tr.adapters.attach(model):
        rss_cold = _status_kib("VmRSS")
        hwm_ok = _reset_hwm()
        tr.step(model)  # first step: creates the AdamW moments, initializes kernels
        rss_cold_peak = _status_kib("VmHWM")
        base = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        adapters = sum(p.numel() * p.element_size() for p in tr.adapters.parameters())
        moments = sum(t.numel() * t.element_size() for st in tr.opt.state.values() for t in st.values()
                      if torch.is_tensor(t))
        rss_before = _status_kib("VmRSS")
        _reset_hwm()
        tr.step(model)
        rss_peak = _status_kib("VmHWM")
        window_peak = profiled_peak_bytes(lambda: tr.step(model))
    return dict(static_bytes=base + adapters + moments, base_bytes=base, adapter_bytes=adapters,
                adamw_moment_bytes=moments, window_peak_bytes=window_peak,
                total_bytes=base + adapters + moments + window_peak,
                rss_step_growth_bytes=(rss_peak - rss_before) * 1024 if hwm_ok else None,
                rss_first_step_growth_bytes=(rss_cold_peak - rss_cold) * 1024 if hwm_ok else None,
                adapter_params=tr.adapters.trainable_parameters())


def measure_in_subprocess(args, v: Variant, overrides: dict | None = None) -> dict:
    """memory_child(v) in a fresh Python process (this script with --memory-child)."""
    spec = dict(v.to_dict(), model=args.model, seed=args.seed, threads=args.threads, examples=args.examples,
                stories_path=args.stories_path, overrides=overrides)
    spec.pop("name")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory point {v.name} {overrides or ''} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(args, shape, sites, points) -> dict:
    rows = []
    for v in points:
        meas = measure_in_subprocess(args, v)
        plan = v.plan(sites)  # the shape and sites do not depend on the attention implementation
        pred = dict(base_bytes=base_weight_bytes(shape, "fp32"),
                    adapter_state_bytes=16 * adapter_params(shape, plan.ranks),
                    activation_bytes=activation_bytes(shape, v.batch, v.seq_len),
                    total_bytes=memory_bytes(shape, precision="fp32", ranks=plan.ranks, batch=v.batch,
                                             seq_len=v.seq_len))
        # The step's own growth, predicted: activations + adapter grads (4 bytes a parameter).
        pred_window = pred["activation_bytes"] + 4 * adapter_params(shape, plan.ranks)
        rows.append(dict(**v.to_dict(), predicted=pred, measured=meas,
                         rel_error=abs(pred["total_bytes"] / meas["total_bytes"] - 1),
                         signed_error=pred["total_bytes"] / meas["total_bytes"] - 1,
                         predicted_window_bytes=pred_window,
                         window_signed_error=pred_window / meas["window_peak_bytes"] - 1))
    return dict(points=rows)


FIT_VOCAB = 8192  # large enough that the logits' copies, not a transient of the backward, set the peak


def fit_activation_constants(args, shape) -> dict:
    """Measured floats kept per token and layer, split into d_model and d_ff parts, and logits copies.

    The same step (batch 4, seq_len T, rank 4 on q, k, v, o, sdpa) is measured for the built-in model with
    vocab FIT_VOCAB and for four variations of its shape: half the layers, twice d_ff, twice d_model
    (twice the heads, same head_dim, same d_ff). With per-token floats
    F = L * (a * d_model + c * d_ff) + k * vocab (sdpa keeps no heads x T attention matrix):
        per layer  = (F(L) - F(L/2)) / (L/2)
        c          = (F(2 d_ff) - F) / (L * d_ff)
        a          = (F(2 d_model) - F) / (L * d_model)   and, as a check, (per layer - c * d_ff) / d_model
        k (logits) = (F(L/2) - L/2 * per layer) / vocab
    To compare with cost.py's act_d (a), act_ff (c) and its 3 logits copies (k).
    """
    spec = MODELS.get(args.model)
    if not spec:
        return dict(skipped=f"{args.model}: needs a built-in spec {BUILT_IN_SPECS}")
    gpt2 = spec["model_type"] == "gpt2"
    keys = (("n_layer", "n_embd", "n_head", "n_inner") if gpt2 else
            ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"))
    L, d, ff = shape.n_layers, shape.d_model, shape.d_ff
    if L < 2 or L % 2:
        return dict(skipped=f"needs an even number of layers (got {L})")
    base = {"vocab_size": FIT_VOCAB, keys[3]: ff}
    wide = {**base, keys[1]: 2 * d, keys[2]: 2 * shape.n_heads}
    if not gpt2:
        wide["num_key_value_heads"] = 2 * spec.get("num_key_value_heads", shape.n_heads)
    shapes = {"base": base, "half_layers": {**base, keys[0]: L // 2},
              "double_d_ff": {**base, keys[3]: 2 * ff}, "double_d_model": wide}
    v = Variant(4, args.seq_len, "qkvo", 4)
    per_token = {}
    for name, over in shapes.items():
        m = measure_in_subprocess(args, v, over)
        per_token[name] = (m["window_peak_bytes"] - 4 * m["adapter_params"]) / (v.batch * v.seq_len * 4)
    per_layer = (per_token["base"] - per_token["half_layers"]) / (L // 2)
    c = (per_token["double_d_ff"] - per_token["base"]) / (L * ff)
    a = (per_token["double_d_model"] - per_token["base"]) / (L * d)
    return dict(point=v.name, vocab=FIT_VOCAB, shapes=shapes, floats_per_token=per_token,
                floats_per_token_layer=per_layer, act_d=a, act_d_check=(per_layer - c * ff) / d, act_ff=c,
                logits_copies=(per_token["half_layers"] - (L // 2) * per_layer) / FIT_VOCAB,
                cost_model=dict(act_d=shape.act_d, act_ff=shape.act_ff, logits_copies=3,
                                floats_per_token_layer=shape.act_d * d + shape.act_ff * ff
                                + (shape.n_heads * v.seq_len if shape.eager_attention else 0)))


# ---- reporting --------------------------------------------------------------------------------------------


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def markdown(doc: dict) -> str:
    lines = []
    st = doc.get("step_time")
    if st:
        lines += ["### Step time: predicted vs measured ratios", "",
                  "| pair | A | B | predicted A/B (b·f_c) | measured A/B (medians) | rel. error | ≤ 25% | "
                  "paired A/B median [IQR] | t0 + F/R fit A/B |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in st["pairs"]:
            lines.append(f"| {p['pair']} | {p['a']} | {p['b']} | {p['predicted_ratio']:.3f} | "
                         f"{p['measured_ratio']:.3f} | {100 * p['rel_error']:.1f}% | "
                         f"{'yes' if p['within_target'] else 'no'} | {p['median_paired_ratio']:.3f} "
                         f"[{p['paired_ratio_iqr'][0]:.3f}, {p['paired_ratio_iqr'][1]:.3f}] | "
                         f"{p['fit_ratio']:.3f} |")
        fit = st["fit"]
        rate = f"{fit['flops_per_s'] / 1e9:.1f} GFLOP/s" if fit["flops_per_s"] else "n/a"
        lines += ["", f"{st['pairs_within_target']}/{st['n_pairs']} pairs within 25%. Fit over all variants: "
                  f"t = {1e3 * fit['t0_s']:.1f} ms + F / ({rate}), "
                  f"max residual {1e3 * fit['max_abs_residual_s']:.1f} ms.", "",
                  "| variant | step GFLOP (b·f_c) | median step ms | forward ms | backward ms | update ms | "
                  "bwd/fwd measured | bwd/fwd cost model | GFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in st["variants"]:
            ph = v["phases_median_s"]
            lines.append(f"| {v['name']} | {v['step_flops'] / 1e9:.2f} | {1e3 * v['median_s']:.1f} | "
                         f"{1e3 * ph['forward']:.1f} | {1e3 * ph['backward']:.1f} | "
                         f"{1e3 * ph['update']:.1f} | "
                         f"{v['backward_over_forward']['measured']:.2f} | "
                         f"{v['backward_over_forward']['cost_model']:.2f} | "
                         f"{v['step_flops'] / v['median_s'] / 1e9:.1f} |")
    mem = doc.get("memory")
    if mem:
        lines += ["", "### Memory: predicted vs measured peak of a step (MiB)", "",
                  "| point | predicted total | measured total | error | predicted activations + grads | "
                  "measured step peak (profiler) | error | RSS growth, 1st / 2nd step | "
                  "static (weights, adapters, AdamW) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in mem["points"]:
            m = p["measured"]
            lines.append(f"| {p['name']} | {_mib(p['predicted']['total_bytes'])} | "
                         f"{_mib(m['total_bytes'])} | "
                         f"{100 * p['signed_error']:+.1f}% | {_mib(p['predicted_window_bytes'])} | "
                         f"{_mib(m['window_peak_bytes'])} | {100 * p['window_signed_error']:+.1f}% | "
                         f"{_mib(m['rss_first_step_growth_bytes'])} / {_mib(m['rss_step_growth_bytes'])} | "
                         f"{_mib(m['static_bytes'])} |")
        fit = mem.get("activation_fit")
        if fit and "skipped" not in fit:
            cm = fit["cost_model"]
            lines += ["", f"### Activation constants: measured ({fit['point']}, vocab {fit['vocab']}, "
                      "sdpa) vs cost.py", "",
                      "| | per d_model (ACT_D) | per d_ff (ACT_FF) | floats per token and layer | "
                      "logits copies |",
                      "|---|---|---|---|---|",
                      f"| measured | {fit['act_d']:.2f} (check {fit['act_d_check']:.2f}) | "
                      f"{fit['act_ff']:.2f} | "
                      f"{fit['floats_per_token_layer']:.0f} | {fit['logits_copies']:.2f} |",
                      f"| cost.py | {cm['act_d']} | {cm['act_ff']} | {cm['floats_per_token_layer']} "
                      f"| {cm['logits_copies']} |"]
        elif fit:
            lines += ["", f"Activation constants fit skipped: {fit['skipped']}"]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-256")
    ap.add_argument("--stories-path", default=None, help="folder holding models/stories260K-hf "
                    "(default $FEDPIPE_SHARED_DATA); only for --model stories260K")
    ap.add_argument("--seq-len", type=int, default=128, help="T of the pairs (one pair also uses 2T)")
    ap.add_argument("--reps", type=int, default=30,
                    help="timed interleaved rounds (one step of every variant each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--examples", type=int, default=64, help="training examples per sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-points", type=parse_variant, nargs="*", default=None,
                    help="memory points B:T:TARGETS:R[:ATTN] (default: a built-in list of 8)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-fit", action="store_true", help="skip the fit of the activation constants "
                    "(4 more subprocesses with changed shapes)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return {}
    import transformers

    torch.set_num_threads(args.threads)
    model, tok = build(args.model, seed=args.seed, stories_path=args.stories_path)
    sites = find_sites(model)
    shape = model_shape(model, sites)
    load0 = os.getloadavg()
    doc = dict(meta=dict(
        model=args.model, config={k: v for k, v in model.config.to_dict().items() if k in CONFIG_KEYS},
        attn_implementation=model.config._attn_implementation,
        shape=dict(n_layers=shape.n_layers, d_model=shape.d_model, d_ff=shape.d_ff, n_heads=shape.n_heads,
                   d_attn=shape.d_attn, vocab=shape.vocab, linear_params=shape.linear_params,
                   total_params=shape.total_params),
        seq_len=args.seq_len, threads=args.threads, torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), loadavg_start=list(load0),
        argv=list(argv) if argv is not None else sys.argv[1:],
        started=time.strftime("%Y-%m-%dT%H:%M:%S")))
    if not args.no_timing:
        doc["step_time"] = run_step_times(args, model, tok, shape, sites, default_pairs(args.seq_len))
    if not args.no_memory:
        points = args.mem_points if args.mem_points is not None else default_memory_points(args.seq_len)
        doc["memory"] = run_memory(args, shape, sites, points)
        if not args.no_fit:
            doc["memory"]["activation_fit"] = fit_activation_constants(args, shape)
    doc["meta"]["loadavg_end"] = list(os.getloadavg())
    out = write_json(args.out, doc)
    print(markdown(doc))
    print(f"\nJSON: {out}")
    return doc


if __name__ == "__main__":
    main()
