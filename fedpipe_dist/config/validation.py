"""Checks across a job's fields (`validate`), plan.variant's presets filled in (`resolve_variant`), and per-server
values drawn from a job's spec (`per_client_values`). `cfg` is a JobConfig (jobconfig.py, which calls `validate`
when it is built, so this module does not import it)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .sections import BNB_BLOCKS, MAX_SYNTHETIC, PLAN_VARIANTS, PRECISIONS, TARGETS

# --------------------------------------------------------------------------------------------------
# Validation across fields


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}", key=key)


def resolve_variant(cfg) -> None:
    """Fill every plan.variant switch the job left null with the variant's value (in place)."""
    for dotted, value in PLAN_VARIANTS[cfg.plan.variant].items():
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) is None:
            setattr(getattr(cfg, section), key, value)


def validate(cfg) -> None:
    _check(cfg.plan.variant in PLAN_VARIANTS, "plan.variant",
           f"unknown variant {cfg.plan.variant!r}; choose one of {list(PLAN_VARIANTS)}")
    resolve_variant(cfg)
    _check(cfg.rounds >= 1, "rounds", f"must be >= 1 (got {cfg.rounds})")
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1 (got {cfg.checkpoint.every})")
    _check(cfg.checkpoint.full_every >= 1, "checkpoint.full_every",
           f"must be >= 1 (got {cfg.checkpoint.full_every}); 1 makes every checkpoint a full one")
    _check(cfg.aggregation.max_norm_ratio > 1, "aggregation.max_norm_ratio",
           f"must be > 1 (got {cfg.aggregation.max_norm_ratio}); 10 leaves honest heterogeneous updates alone")
    if cfg.aggregation.wire != "fp32":  # the wire format is the factored transport's (the methods' check: job.py)
        _check(cfg.aggregation.transport == "factored", "aggregation.wire",
               f"{cfg.aggregation.wire} rounds the factors of aggregation.transport=factored; the dense transport "
               "sends a pre-summed dW in fp32, so set aggregation.wire=fp32 or aggregation.transport=factored")
    ag = cfg.aggregation
    _check(ag.server_lr > 0 and ag.server_tau > 0, "aggregation.server_lr",
           f"the server optimizer's step and floor must be > 0 (got server_lr={ag.server_lr}, "
           f"server_tau={ag.server_tau}); OpenFedLLM's defaults are 1e-3 and 1e-3")
    _check(0 <= ag.server_beta1 < 1 and 0 <= ag.server_beta2 < 1, "aggregation.server_beta1",
           f"server_beta1 and server_beta2 must be in [0, 1) (got {ag.server_beta1}, {ag.server_beta2})")
    for key in ("nan_clients", "scale_clients", "misreport_clients"):
        bad = [c for c in getattr(cfg.faults, key) if not (isinstance(c, int) and 0 <= c < cfg.clients.n)]
        _check(not bad, f"faults.{key}", f"server ids must be in 0..{cfg.clients.n - 1} (got {bad})")
    g = cfg.generation
    if g.enabled:
        _check(cfg.data.name != "alpaca", "generation.enabled",
               "E2E generation scoring needs E2E data (data.name e2e or synthetic-e2e); set generation.enabled=false")
    for key in ("num_beams", "max_new_tokens", "batch_size"):
        _check(getattr(g, key) >= 1, f"generation.{key}", f"must be >= 1 (got {getattr(g, key)})")
    _check(g.no_repeat_ngram_size >= 0, "generation.no_repeat_ngram_size",
           f"must be >= 0 (0 = off; got {g.no_repeat_ngram_size})")
    _check(g.max_mrs is None or g.max_mrs >= 1, "generation.max_mrs", f"must be >= 1 or null (got {g.max_mrs})")
    fa = cfg.fedadapter
    for key in ("depth", "width", "depth_step", "max_width", "trial_eval_samples"):
        _check(getattr(fa, key) >= 1, f"fedadapter.{key}", f"must be >= 1 (got {getattr(fa, key)})")
    _check(fa.width_mult >= 1, "fedadapter.width_mult", f"must be >= 1 (got {fa.width_mult})")
    _check(fa.period >= 0, "fedadapter.period", f"must be >= 0 (0 = no trials; got {fa.period})")
    _check(fa.width <= fa.max_width, "fedadapter.width",
           f"starts above fedadapter.max_width={fa.max_width} (got {fa.width})")
    _check(0 < cfg.hetlora.gamma <= 1, "hetlora.gamma", f"must be in (0, 1] (got {cfg.hetlora.gamma})")
    _check(cfg.hetlora.reg >= 0, "hetlora.reg", f"must be >= 0 (got {cfg.hetlora.reg})")
    if cfg.lora.client_ranks is not None:
        _check(len(cfg.lora.client_ranks) == cfg.clients.n and all(isinstance(r, int) and r >= 1
                                                                    for r in cfg.lora.client_ranks),
               "lora.client_ranks", f"must be a list of {cfg.clients.n} ranks >= 1, or null (got "
               f"{cfg.lora.client_ranks})")
    # Seeds feed numpy SeedSequence (no negatives) and torch.manual_seed (at most 64 bits).
    _check(0 <= cfg.seed < 2**32, "seed",
           f"must be an integer in [0, 2**32) (got {cfg.seed}); set e.g. seed=0")
    _check(cfg.model.max_length >= 8, "model.max_length", f"must be >= 8 (got {cfg.model.max_length})")
    c = cfg.clients
    _check(c.n >= 1, "clients.n", f"must be >= 1 (got {c.n})")
    _check(0.0 < c.fraction <= 1.0, "clients.fraction", f"must be in (0, 1] (got {c.fraction})")
    per_client_values(c.memory_gb, c.n, "clients.memory_gb", seed=cfg.seed, positive=True)
    per_client_values(c.slowdown, c.n, "clients.slowdown", seed=cfg.seed, positive=True)
    if c.tflops is not None:
        per_client_values(c.tflops, c.n, "clients.tflops", seed=cfg.seed, positive=True)
    if isinstance(c.precision, list):
        _check(len(c.precision) == c.n, "clients.precision",
               f"has {len(c.precision)} entries but clients.n={c.n}; give {c.n} values or 'auto'")
        for p in c.precision:
            _check(p in PRECISIONS, "clients.precision", f"unknown precision {p!r}; choose from {PRECISIONS}")
    else:
        _check(c.precision == "auto" or c.precision in PRECISIONS, "clients.precision",
               f"must be 'auto', one of {PRECISIONS}, or a list of {c.n} of those (got {c.precision!r})")
    t = cfg.train
    _check(t.local_steps >= 1, "train.local_steps", f"must be >= 1 (got {t.local_steps})")
    _check(t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
    _check(0 <= t.lr_min <= t.lr, "train.lr_min", f"must be in [0, train.lr={t.lr}] (got {t.lr_min})")
    _check(t.batch_min >= 1, "train.batch_min", f"must be >= 1 (got {t.batch_min})")
    _check(t.batch_max >= t.batch_min, "train.batch_max",
           f"must be >= train.batch_min={t.batch_min} (got {t.batch_max}); raise train.batch_max or lower "
           "train.batch_min")
    lo = cfg.lora
    _check(len(lo.targets) > 0, "lora.targets", "must name at least one of q, k, v, o")
    for tname in lo.targets:
        _check(tname in TARGETS, "lora.targets", f"unknown target {tname!r}; choose from {list(TARGETS)}")
    _check(len(set(lo.targets)) == len(lo.targets), "lora.targets", "lists a target twice")
    _check(len(lo.ranks) > 0 and all(r >= 1 for r in lo.ranks), "lora.ranks", "must be a list of ranks >= 1")
    _check(lo.rank >= 1, "lora.rank", f"must be >= 1 (got {lo.rank})")
    _check(lo.alpha > 0, "lora.alpha", f"must be > 0 (got {lo.alpha})")
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1) (got {lo.dropout})")
    _check(cfg.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    if cfg.output.tensorboard:
        import importlib.util

        _check(importlib.util.find_spec("tensorboard") is not None, "output.tensorboard",
               "needs the tensorboard package: pip install tensorboard (or set output.tensorboard=false; "
               "rounds.csv and results.h5 hold the same numbers)")
    _check(not cfg.data.rare_to_slow or cfg.data.partition == "dirichlet", "data.rare_to_slow",
           "deals a non-iid split; set data.partition=dirichlet with it, or leave it false")
    _check(cfg.data.max_train_samples is None or cfg.data.max_train_samples >= 1, "data.max_train_samples",
           f"must be >= 1, or null for every row (got {cfg.data.max_train_samples}); an empty training set "
           "cannot be split over the clients")
    _check(cfg.data.own_eval_samples >= 0, "data.own_eval_samples",
           f"must be >= 0 (got {cfg.data.own_eval_samples}); 0 holds out nothing")
    _check(cfg.eval.max_samples is None or cfg.eval.max_samples >= 1, "eval.max_samples",
           f"must be >= 1, or null for every eval example (got {cfg.eval.max_samples})")
    _check(t.deadline_s is None or t.deadline_s > 0, "train.deadline_s",
           f"must be > 0 seconds, or null for no deadline (got {t.deadline_s})")
    pl = cfg.plan
    _check(0 < pl.lam1 < 1, "plan.lam1", f"must be in (0, 1) (got {pl.lam1}); PLATON uses 0.85")
    _check(0 < pl.lam2 < 1, "plan.lam2", f"must be in (0, 1) (got {pl.lam2}); PLATON uses 0.95")
    _check(pl.step_overhead_s >= 0, "plan.step_overhead_s",
           f"must be >= 0 seconds (got {pl.step_overhead_s}); 0 is the paper's FLOPs-only step time")
    _check(c.step_delay_s >= 0, "clients.step_delay_s", f"must be >= 0 seconds (got {c.step_delay_s}); 0 = none")
    _check(pl.step_time_s is None or pl.step_time_s > 0, "plan.step_time_s",
           f"must be > 0 seconds, or null for the automatic budget (got {pl.step_time_s})")
    _check(cfg.eval.precision == "auto" or cfg.eval.precision in PRECISIONS, "eval.precision",
           f"must be 'auto' or one of {PRECISIONS} (got {cfg.eval.precision!r})")
    if cfg.model.dtype != "float32":  # an fp32 base is the model's own fp32 weights: none when loaded in 16 bits
        asked = c.precision if isinstance(c.precision, list) else [c.precision]
        _check("fp32" not in asked, "clients.precision",
               f"fp32 bases need model.dtype=float32 (it is {cfg.model.dtype}); set model.dtype=float32, or use "
               "fp16, bf16, nf8, nf4 or auto")
        _check(cfg.eval.precision != "fp32", "eval.precision",
               f"fp32 needs model.dtype=float32 (it is {cfg.model.dtype}); set model.dtype=float32, or use auto "
               "or a 16/8/4-bit precision")
    q = cfg.quant
    _check(q.block_size >= 2, "quant.block_size", f"must be >= 2 (got {q.block_size}); QLoRA uses 64")
    if q.backend == "bitsandbytes":
        _check(q.block_size in BNB_BLOCKS, "quant.block_size",
               f"bitsandbytes supports {list(BNB_BLOCKS)} (got {q.block_size}); pick one, or set quant.backend=native")
    _check(cfg.eval.every >= 1, "eval.every", "must be >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(cfg.comm.timeout_s > 0, "comm.timeout_s", "must be > 0")
    if cfg.data.name == "synthetic-e2e":
        for key in ("synthetic_train_size", "synthetic_eval_size"):
            n = getattr(cfg.data, key)
            # generated in memory at the start, about 13 us each (1 million: 13 s on one core)
            _check(1 <= n <= MAX_SYNTHETIC, f"data.{key}", f"must be between 1 and {MAX_SYNTHETIC:,} (got {n:,}); "
                   "the synthetic set is generated in memory at the start; use a real dataset (data.name=e2e) for "
                   "more")


def per_client_values(spec: Any, n: int, key: str, *, seed: int, positive: bool = False) -> list[float]:
    """Expand a per-server setting: a number, a list of n numbers, or a draw {uniform: [lo, hi]}."""
    import numpy as np

    if isinstance(spec, bool):
        raise ConfigError(f"{key}: expected a number, a list of {n} numbers or {{uniform: [lo, hi]}} "
                          f"(got {spec!r})", key=key)
    if isinstance(spec, (int, float)):
        vals = [float(spec)] * n
    elif isinstance(spec, list):
        if len(spec) != n:
            raise ConfigError(f"{key}: has {len(spec)} entries but clients.n={n}; give {n} values, one "
                              "number for all, or a draw such as {uniform: [12, 24]}", key=key)
        try:
            if any(isinstance(v, bool) for v in spec):
                raise TypeError
            vals = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: every entry must be a number (got {spec!r})", key=key) from None
    elif isinstance(spec, dict) and set(spec) == {"uniform"}:
        bounds = spec["uniform"]
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                        for b in bounds)
                and bounds[0] <= bounds[1]):
            raise ConfigError(f"{key}: uniform needs two numbers [lo, hi] with lo <= hi (got {bounds!r}); "
                              "write it as {uniform: [12, 24]}", key=key)
        # A draw is part of the job: seeded by the job seed and the key, identical on every rank.
        rng = np.random.default_rng([seed, sum(map(ord, key))])
        vals = [float(v) for v in rng.uniform(bounds[0], bounds[1], size=n)]
    else:
        raise ConfigError(f"{key}: expected a number, a list of {n} numbers or a draw such as "
                          f"{{uniform: [12, 24]}} (got {spec!r})", key=key)
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"{key}: values must be finite numbers (got {vals})", key=key)
    if positive and any(v <= 0 for v in vals):
        raise ConfigError(f"{key}: values must be > 0 (got {vals})", key=key)
    return vals
