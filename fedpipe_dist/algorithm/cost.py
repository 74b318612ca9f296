"""Cost model of a plan: FLOPs per training sample (f_c in Eqn 2e) and peak memory of a local step.

The paper's f_c charges only the adapters; here it includes the frozen model's own forward and backward,
which dominates and does not depend on the ranks (NOTES.md, open points). Shapes come from a model
(meta-device is enough), so the model works for LLaMA2-7B without weights.

FLOPs per token (one multiply-add = 2 FLOPs):
  frozen linear layers, forward                  2 * P_lin
  frozen linear layers, backward (input grads)   2 * P_lin          (no weight grads: the base is frozen)
  attention core (QK^T, AV), forward             4 * T * d_attn per layer, backward twice that
  LoRA adapter of rank r on a site [out, in]     forward 2 r (in+out); backward 4 r (in+out) (grads of
                                                 the input, A and B): 6 r (in+out) in all
Memory of a local step (bytes):
  base weights: the block linears (attention and MLP) at the server's precision (NF-k: k bits + one fp32
  absmax per block of 64), everything else (embeddings, norms, LM head) as loaded (runtime/bases.py)
  merged-update residual of a non-fp32 base: at most 2 bytes per adapted parameter (algorithm/merge.py)
  adapters: fp32 weight + grad + two AdamW moments = 16 bytes per adapter parameter
  activations kept for backward: per layer and token about (act_d * d_model + act_ff * d_ff) floats,
  the attention probabilities (heads x T per token) only under eager attention (sdpa keeps none), and
  the logits (3 copies of vocab per token).
The activation constants are per architecture, fitted by benchmarks/cost_model.py on CPU (varying layers,
d_ff and d_model): Llama-style gated MLP 6.95 / 3.00, GPT-2 8.95 / 4.00, logits 2.99 copies; rounded to
7 / 3 and 9 / 4, times ACT_PEAK for the backward peak. benchmarks/README.md has measured vs predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..adapters.sites import Site

BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "nf8": 8, "nf4": 4}
NF_BLOCK = 64
# Floats kept for backward per token and layer: (per d_model, per d_ff), fitted by benchmarks/cost_model.py.
ACT_CONSTANTS = {"gpt2": (9, 4), "gated": (7, 3)}  # gated: Llama-style SiLU-gated MLP
# The peak comes during backward, when the stored activations meet the gradient buffers of the layer in
# flight: measured 7.6-8.5 % above the stored activations for both architectures (benchmarks/cost_model.py).
ACT_PEAK = 1.10


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    d_attn: int  # width of the attention core (n_heads * head_dim)
    vocab: int
    linear_params: int  # parameters in all matmul weights (attention, MLP, LM head), frozen
    total_params: int  # everything stored in the base (embeddings counted once when tied)
    sites: tuple[Site, ...]
    block_linear_params: int = -1  # matmul weights inside the blocks: what a quantized base quantizes
    act_d: int = 7  # activation floats per token and layer, per d_model and per d_ff (ACT_CONSTANTS)
    act_ff: int = 3
    eager_attention: bool = False  # eager attention keeps the heads x T probabilities for backward
    nf_scale_bytes: float = 4 / NF_BLOCK  # bytes of scales per NF-k weight as stored (nf_scale_bytes())


def model_shape(model: nn.Module, sites: list[Site]) -> ModelShape:
    """Read the shapes the cost model needs from an HF causal LM (real or on the meta device)."""
    from transformers.pytorch_utils import Conv1D

    cfg = model.config
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    from ..adapters.sites import is_block_linear

    linear = block = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            linear += mod.weight.numel()
            if is_block_linear(name, mod):
                block += mod.weight.numel()
    seen, total = set(), 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    act_d, act_ff = ACT_CONSTANTS["gpt2" if cfg.model_type == "gpt2" else "gated"]
    eager = getattr(cfg, "_attn_implementation", None) == "eager"
    return ModelShape(layers, d, d_ff, heads, heads * head_dim, cfg.vocab_size, linear, total, tuple(sites),
                      block, act_d, act_ff, eager)


def base_flops_per_sample(shape: ModelShape, seq_len: int) -> float:
    T = seq_len
    linear = 4.0 * shape.linear_params * T  # forward + input-gradient backward
    attention = 3 * 4.0 * T * T * shape.d_attn * shape.n_layers  # forward + 2x backward
    return linear + attention


def adapter_flops_per_sample(site: Site, rank: int, seq_len: int) -> float:
    return 6.0 * rank * (site.in_features + site.out_features) * seq_len


def flops_per_sample(shape: ModelShape, ranks: dict[str, int], seq_len: int) -> float:
    """f_c: FLOPs of one training sample under a plan (base + every adapter at its rank)."""
    by_key = {s.key: s for s in shape.sites}
    return base_flops_per_sample(shape, seq_len) + sum(
        adapter_flops_per_sample(by_key[k], r, seq_len) for k, r in ranks.items() if r > 0 and k in by_key)


def adapter_params(shape: ModelShape, ranks: dict[str, int]) -> int:
    by_key = {s.key: s for s in shape.sites}
    return sum(r * (by_key[k].in_features + by_key[k].out_features) for k, r in ranks.items() if r > 0)


def base_weight_bytes(shape: ModelShape, precision: str, rest_bytes: int = 4) -> float:
    """The base at `precision`: block linears at that precision, the rest at rest_bytes per parameter."""
    block = shape.block_linear_params if shape.block_linear_params >= 0 else shape.total_params
    rest = shape.total_params - block
    per = BITS[precision] / 8 + (shape.nf_scale_bytes if precision.startswith("nf") else 0)  # NF-k: + its scales
    return block * per + rest * rest_bytes


def nf_scale_bytes(block_size: int = NF_BLOCK, double_quant: bool = False) -> float:
    """Bytes of scales per NF-k weight as quantization.quantize_nf stores them: an fp32 absmax per block, or with
    double quantization a uint8 code per block plus an fp32 scale per DQ_BLOCK blocks (the one fp32 offset per
    weight matrix is left out: a few bytes per matrix)."""
    from .quantization import DQ_BLOCK

    return (1 + 4 / DQ_BLOCK) / block_size if double_quant else 4 / block_size


def residual_bytes(shape: ModelShape, precision: str) -> float:
    """The merged-update residual a non-fp32 base keeps: at most 2 bytes per adapted parameter."""
    return 0.0 if precision == "fp32" else 2.0 * sum(s.numel for s in shape.sites)


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, act_bytes: int = 4,
                     layers: int | None = None) -> float:
    """Activations kept for backward; `layers`: how many (top) layers backward goes through (all by default)."""
    T = seq_len
    layers = shape.n_layers if layers is None else layers
    per_token_layer = (shape.act_d * shape.d_model + shape.act_ff * shape.d_ff
                       + (shape.n_heads * T if shape.eager_attention else 0))
    logits = 3 * shape.vocab
    return ACT_PEAK * batch * T * (layers * per_token_layer + logits) * act_bytes


def memory_bytes(shape: ModelShape, *, precision: str, ranks: dict[str, int], batch: int, seq_len: int,
                 act_bytes: int = 4) -> float:
    """Predicted peak memory of a local training step (act_bytes: 4 for fp32 compute, 2 for bf16/fp16)."""
    return (base_weight_bytes(shape, precision, act_bytes) + residual_bytes(shape, precision)
            + 16 * adapter_params(shape, ranks)
            + activation_bytes(shape, batch, seq_len, act_bytes))


# ---- the baselines that are not LoRA ------------------------------------------------------------------------
# Full fine-tuning (method ft): every weight trains, so backward also forms the weight gradients
# (2 * P_lin FLOPs per token more), and every parameter carries a gradient and two AdamW moments.


def ft_flops_per_sample(shape: ModelShape, seq_len: int) -> float:
    return base_flops_per_sample(shape, seq_len) + 2.0 * shape.linear_params * seq_len


def ft_memory_bytes(shape: ModelShape, *, batch: int, seq_len: int, act_bytes: int = 4) -> float:
    """fp32 weights + gradients + two AdamW moments (16 B per parameter), and the activations."""
    return 16.0 * shape.total_params + activation_bytes(shape, batch, seq_len, act_bytes)


# Houlsby adapters (method fedadapter, adapters/houlsby.py) in the top `depth` layers at bottleneck `width`:
# the forward runs every layer, backward only the LM head and the top layers (nothing below them needs a
# gradient), and each of the two adapters per layer costs 2 matmuls of width x d_model.


def houlsby_params(shape: ModelShape, depth: int, width: int) -> int:
    return 2 * min(depth, shape.n_layers) * (2 * width * shape.d_model + width + shape.d_model)


def houlsby_flops_per_sample(shape: ModelShape, depth: int, width: int, seq_len: int) -> float:
    T, L = seq_len, shape.n_layers
    d = min(depth, L)
    block = shape.block_linear_params if shape.block_linear_params >= 0 else shape.linear_params
    head = shape.linear_params - block
    forward = 2.0 * shape.linear_params * T + 4.0 * T * T * shape.d_attn * L
    backward = 2.0 * (block * d / L + head) * T + 8.0 * T * T * shape.d_attn * d
    adapters = 2 * d * 12.0 * width * shape.d_model * T  # forward 4 w d, backward 8 w d per adapter and token
    return forward + backward + adapters


def houlsby_memory_bytes(shape: ModelShape, *, precision: str, depth: int, width: int, batch: int, seq_len: int,
                         act_bytes: int = 4) -> float:
    return (base_weight_bytes(shape, precision, act_bytes) + 16 * houlsby_params(shape, depth, width)
            + activation_bytes(shape, batch, seq_len, act_bytes, layers=min(depth, shape.n_layers)))


@dataclass
class StepFit:
    """A measured step-cost shape t = t0 + per_token x padded tokens, in seconds of the fastest server
    (plan.step_cost=measured). `overhead_samples` is t0 in samples' worth of that server's compute, t0 / (per_token
    x the mean padded tokens of a sample): the planner's `o` (algorithm/planner.stage1_auto)."""

    t0_s: float
    per_token_s: float
    tokens_per_sample: float
    steps: int

    @property
    def overhead_samples(self) -> float:
        return self.t0_s / (self.per_token_s * self.tokens_per_sample)


def fit_step_cost(timed: list[tuple[int, int, float]], estimator: str = "theil_sen") -> StepFit | None:
    """t = t0 + c x tokens fitted to measured steps (batch, padded tokens, seconds), t0 clipped at 0; None where the
    steps cannot separate t0 from c (fewer than 3 steps, or every step had the same tokens) or the fitted c is not
    positive. estimator: theil_sen (the median of the pairwise slopes, then the median intercept: a step slowed
    by a burst of load on the machine moves it little) or lstsq (least squares: every step counts alike).
    Written here, not taken from a library: scipy.stats.theilslopes does the same, but scipy is not otherwise a
    dependency, and this is two medians."""
    if len(timed) < 3:
        return None
    b, tok, sec = (np.asarray(col, dtype=float) for col in zip(*timed))
    if np.ptp(tok) == 0:
        return None
    if estimator == "theil_sen":
        c, t0 = _theil_sen(tok, sec)
    elif estimator == "lstsq":
        (c, t0), *_ = np.linalg.lstsq(np.stack([tok, np.ones_like(tok)], axis=1), sec, rcond=None)
    else:
        raise ValueError(f"unknown step-cost estimator {estimator!r}: theil_sen or lstsq")
    if c <= 0:
        return None
    if t0 < 0:  # no fixed cost measurable: the slope through the origin
        t0 = 0.0
        c = float(np.median(sec / tok)) if estimator == "theil_sen" else float(tok @ sec / (tok @ tok))
    return StepFit(float(t0), float(c), float(tok.sum() / b.sum()), len(timed))


def _theil_sen(x: np.ndarray, y: np.ndarray, max_points: int = 1000) -> tuple[float, float]:
    """Theil-Sen: the slope is the median of (y_j - y_i) / (x_j - x_i) over the pairs with x_i != x_j, the
    intercept the median of y - slope x. More than max_points points: an evenly strided subset (the pairs grow as
    the square)."""
    if len(x) > max_points:
        keep = np.linspace(0, len(x) - 1, max_points).round().astype(int)
        x, y = x[keep], y[keep]
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    slope = float(np.median((y[j] - y[i])[ok] / dx[ok]))
    return slope, float(np.median(y - slope * x))
