"""Job configuration: YAML job files + dotted overrides, validated into keyword-only dataclasses.

    cfg = load_job("jobs/quickstart.yaml", ["rounds=3", "clients.slowdown=[1,2,2,3]"])

Every error is a ConfigError whose message names the offending key (as a dotted path) and says how to
fix it; the CLI turns it into exit code 2. Values in overrides are parsed as YAML, so lists and dicts
work. Unknown keys are refused with a "did you mean" hint, never ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError, UserInputError  # noqa: F401 (defined in errors.py; importers of config find them here too)

TARGETS = ("q", "k", "v", "o")
PRECISIONS = ("fp32", "fp16", "bf16", "nf8", "nf4")
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)  # block sizes bitsandbytes' NF4 supports on CPU and CUDA
# plan.variant presets: the switch values a job gets for every one of these keys it leaves null.
# paper: Algorithm 1 and Eqn 10 as published. tuned: the measured best (docs/planner.md, "Variants").
PLAN_VARIANTS = {
    "paper": {"plan.split": "batch", "plan.rank_alloc": "greedy", "plan.step_overhead_s": 0.0,
              "plan.lr_scaling": "none", "aggregation.weights": "paper", "lora.carry": "none"},
    "tuned": {"plan.split": "auto", "plan.rank_alloc": "spread", "plan.step_overhead_s": 0.0,
              "plan.lr_scaling": "none", "aggregation.weights": "samples", "lora.carry": "adapter"},
}


@dataclass(kw_only=True)
class ModelConfig:
    """Which causal LM to fine-tune."""

    name_or_path: str = "tiny-gpt2"
    """Built-in tiny config (tiny-gpt2, tiny-llama; random init, offline), a local HF folder, or a hub name."""
    max_length: int = 128
    """Tokens per example (prompt + target); longer examples are truncated."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base is loaded in (quantized bases come from clients.precision)."""


@dataclass(kw_only=True)
class DataConfig:
    """Training/eval data and how it is split over the edge servers."""

    name: Literal["synthetic-e2e", "e2e", "alpaca"] = "synthetic-e2e"
    train_path: Optional[str] = None
    """Local file or null for the name's default source: synthetic data (synthetic-e2e), the hub's e2e_nlg
    (e2e, CSV with columns mr,ref when local), the hub's tatsu-lab/alpaca (alpaca, JSON/JSONL when local;
    alpaca also takes a hub dataset name such as yahma/alpaca-cleaned)."""
    eval_path: Optional[str] = None
    """Local eval file; null = the default source's dev split (alpaca: a seeded 2% held out of train)."""
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet split over the partition key (smaller = more skewed)."""
    rare_to_slow: bool = False
    """Dirichlet only: deal the shards so that the slower a server (clients.slowdown, clients.tflops), the
    rarer its keys: a skew aligned with speed, the hard case for weights that follow samples processed."""
    max_train_samples: Optional[int] = None
    """Use only the first N training rows (after a seeded shuffle); null = all."""
    synthetic_train_size: int = 2000
    synthetic_eval_size: int = 200


@dataclass(kw_only=True)
class ClientsConfig:
    """The edge servers and their heterogeneity profiles."""

    n: int = 4
    """Edge servers (clients). May exceed the world size: several virtual servers then share a rank."""
    fraction: float = 1.0
    """Fraction sampled each round (seeded)."""
    memory_gb: Any = 24.0
    """Per-server memory budget: a number, a list of n numbers, or a draw such as {uniform: [12, 24]}."""
    slowdown: Any = 1.0
    """Per-server compute slowdown (1 = as measured): a number, a list of n, or {uniform: [1, 3]}."""
    tflops: Any = None
    """Declared compute of each server before its slowdown (TFLOP/s: a number or a list of n); null = measured
    on each rank. Used by `fedpipe plan` to plan for hardware you are not on."""
    speed: Literal["median", "per_rank"] = "median"
    """Base compute of each server before its slowdown: median (every rank takes the median of all ranks'
    measurements: identical hardware, heterogeneity from clients.slowdown alone, reproducible plans) or
    per_rank (each rank's own measurement: a cluster whose machines really differ)."""
    throttle: Literal["sleep", "clock"] = "sleep"
    """How a slowdown s > 1 is made real. sleep: after each step the server waits (s - 1) x the step's time,
    so wall-clock, waits and deadlines are measured; clock: it does not wait, and its local time (HDF5
    local_s, the deadline) is charged s x the measured step times. clock is for hosting more servers than
    cores (benchmarks on a small machine), where waiting would only serialize the servers on one process."""
    step_delay_s: float = 0.0
    """A fixed wait added to every local step of every server (times its slowdown, made real as the throttle
    says), beyond the step's compute: simulates devices whose step has a fixed cost at any batch (kernel
    launches and the optimizer on a GPU with a small model), for drills of plan.step_cost=measured on a CPU.
    0 = none (never set it to describe real hardware: there, measure)."""
    precision: Any = "auto"
    """Base precision of each server: auto (the most bits that fit memory_gb, chosen by the planner for
    round 1 and kept for the run) or one of fp32/fp16/bf16/nf8/nf4, or a list of n of those."""


@dataclass(kw_only=True)
class TrainConfig:
    """Local training on each edge server."""

    local_steps: int = 10
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    batch_min: int = 1
    batch_max: int = 8
    max_grad_norm: float = 1.0
    """Clip adapter gradients to this norm (0 = off)."""
    optimizer_state: Literal["fresh", "kept"] = "fresh"
    """fresh: every server starts each round with a new AdamW (the field's FedAvg code); kept: each server keeps
    its AdamW moments and step count across rounds for the adapter tensors whose shape did not change."""
    deadline_s: Optional[float] = None
    """Round deadline for local training; a server still training then stops, is counted as
    under-trained, and its update is left out of the round. null = no deadline."""


@dataclass(kw_only=True)
class PlanConfig:
    """How each round's per-server configuration is chosen (Sec. III-C/D, Algorithm 1)."""

    mode: Literal["fedpipe", "uniform"] = "fedpipe"
    """fedpipe: batch from compute ratios, weights and ranks by importance under a FLOPs budget;
    uniform: every server gets lora.rank on every target and batch train.batch_max (fixed-rank LoRA)."""
    importance: Literal["platon", "fixed", "random"] = "platon"
    """platon: Eqn 3-7 scores; fixed: a fixed order (q, v, k, o); random: a seeded random order per round."""
    granularity: Literal["type", "layer"] = "type"
    """type: one choice per weight type across all layers (the paper); layer: per (layer, weight)."""
    step_time_s: Optional[float] = None
    """Time budget of one local step. null = what the fastest server needs for uniform LoRA (lora.rank on
    every target, batch_max): FedPipe then gets fixed-rank LoRA's time per round on the fastest server."""
    variant: Literal["paper", "tuned"] = "tuned"
    """Presets for the switches below that are left null (docs/planner.md has the measured table): paper is
    Algorithm 1 and Eqn 10 as published; tuned is the combination that measured fastest to quality."""
    split: Optional[Literal["batch", "steps", "auto"]] = None
    """How a server's compute share is spent. batch (the paper): b_i from its compute ratio, every server
    train.local_steps steps; steps: every server train.batch_max, local steps from its compute ratio; auto: from
    the step-cost shape t(b) = t0 + c b (plan.step_overhead_s = t0): a smaller batch while that keeps every
    step, fewer steps where even batch_min does not fit (algorithm/planner.stage1_auto). It is batch at t0 = 0
    and tends to steps as t0 grows (a GPU on a small model: a step costs nearly the same at any batch)."""
    rank_alloc: Optional[Literal["greedy", "spread"]] = None
    """greedy (Algorithm 1): most important weight first, at the highest rank that fits; spread: every
    targeted weight at the highest rank all of them fit at, then the leftover budget by importance."""
    step_overhead_s: Optional[float] = None
    """Fixed time of a local step on the fastest server beyond its FLOPs (t0: Python, launches, optimizer).
    The paper's step-time model has none (0); with it, small batches are planned as slower than FLOPs say."""
    step_cost: Literal["given", "measured"] = "given"
    """Where t0 comes from. given: plan.step_overhead_s. measured: every server times its round-1 local steps
    (seconds and padded tokens), the times are scaled to the fastest server's speed and fitted as
    t0 + c x tokens over all servers, and from round 2 on the plan uses the fitted t0 (in samples' worth, so the
    planner's FLOPs need not match the device's efficiency) instead of plan.step_overhead_s. With
    plan.split=auto this makes the batch-or-steps choice from the devices' real step-cost shape."""
    lr_scaling: Optional[Literal["none", "sqrt", "linear"]] = None
    """Per-server learning rate: train.lr x (b_i / train.batch_max)^p, p = 0 (none), 1/2 or 1."""
    lam1: float = 0.85
    """EMA factor of the smoothed sensitivity (Eqn 5)."""
    lam2: float = 0.95
    """EMA factor of the uncertainty (Eqn 6)."""


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters on the attention projections."""

    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """Which of q, k, v, o may get adapters."""
    ranks: list[int] = field(default_factory=lambda: [16, 12, 8, 4, 2])
    """Candidate ranks (high to low) the planner may choose from."""
    rank: int = 4
    """Rank used when every server gets the same configuration (the paper's default: 4)."""
    client_ranks: Optional[list[int]] = None
    """Per-server rank for the heterogeneous-rank baselines (flora, flexlora, hetlora): a list of n, or null =
    by compute: the largest of lora.ranks not above max(lora.ranks) x C_i / max_j C_j (at least the smallest)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    carry: Optional[Literal["none", "adapter", "shared_a"]] = None
    """method=fedpipe, what a server starts the next round from. none (the paper): the merged update is in the
    base and every server draws fresh adapters (B = 0, a new A). adapter: every server starts from one global
    adapter, the weighted average of the round's factors, and the base takes the rest of the exact average
    (algorithm/aggregation/fedpipe.kept_adapter_step). shared_a: one A drawn from the job's seed, frozen and shared
    by every server, only B trains and travels; the global B is the weighted average, which is exactly the average
    of the servers' models (algorithm/aggregation/fedpipe.shared_a_delta). null = plan.variant's choice."""
    dropout: float = 0.0


@dataclass(kw_only=True)
class HetLoRAConfig:
    """HetLoRA's rank self-pruning (Cho et al. 2024), used by method=hetlora."""

    gamma: float = 0.9
    """Keep floor(gamma * r) ranks when pruning; the trailing ranks are regularized. 1 = no pruning."""
    reg: float = 1.0e-3
    """Weight of the regularizer ||B[:, k:]|| * ||A[k:]|| added to the local loss."""


@dataclass(kw_only=True)
class FedAdapterConfig:
    """FedAdapter's progressive adapter configuration (algorithm/aggregation/fedadapter.py), method=fedadapter."""

    depth: int = 2
    """Layers (from the top) that start with Houlsby adapters."""
    width: int = 8
    """Starting bottleneck width."""
    depth_step: int = 2
    """A deeper trial configuration adds this many layers."""
    width_mult: int = 2
    """A wider trial configuration multiplies the width by this."""
    max_width: int = 64
    period: int = 5
    """Every period-th round is a trial round (current vs deeper vs wider on groups of servers); 0 = never."""
    trial_eval_samples: int = 128
    """Eval examples each trial configuration is scored on."""


@dataclass(kw_only=True)
class AggregationConfig:
    transport: Literal["factored", "dense"] = "factored"
    """factored: clients send B, A and rank 0 stacks them (exact); dense: weighted reduce of dW at rank 0."""
    wire: Literal["fp32", "bf16"] = "fp32"
    """Format of the LoRA factors in the factored transport. bf16 halves the factor bytes up (every server's
    B, A) and down (the stack, or a global adapter's factors), but rounds each factor to 8 bits of mantissa,
    so it changes results and is opt-in: every server is rounded alike (those on rank 0 too) and every rank
    merges the same rounded values, so ranks stay in sync. A dense downlink (FlexLoRA's dW_g, or a stack
    larger than its product) stays fp32, like every dense payload: bf16 here is a format for factors only
    (so bf16 halves only the uplink when the downlink goes dense). Measured on the quickstart job
    (benchmarks/wire_bf16.py): ||BA - bf16(B) bf16(A)||_F / ||BA||_F about 2.2e-3 per server, 1.7e-3 on the
    merged update; final eval loss within 0.003 of fp32 over 3 seeds. transport=dense needs fp32."""
    sanitize: bool = True
    """Leave out updates that are not finite or whose norm exceeds max_norm_ratio x the round's median
    (algorithm/sanitize.py); rejected servers are recorded in HDF5 (clients/rejected) and the round goes on."""
    max_norm_ratio: float = 10.0
    weights: Optional[Literal["paper", "data", "samples", "fednova"]] = None
    """method=fedpipe's weights w_i: paper |D_i|/b_i (Eqn 10); data |D_i|; samples b_i x steps_i (the examples
    each server trained on); fednova |D_i| / steps_i, the sum then scaled by sum_i p_i steps_i (FedNova's
    normalized averaging). null = plan.variant's choice."""


@dataclass(kw_only=True)
class FaultsConfig:
    """Fault injection for drills and tests: chosen servers send a broken update (never set in production)."""

    nan_clients: list[int] = field(default_factory=list)
    """These servers' updates become NaN after local training."""
    scale_clients: list[int] = field(default_factory=list)
    """These servers' updates are multiplied by `scale` after local training."""
    scale: float = 1000.0
    misreport_clients: list[int] = field(default_factory=list)
    """These servers report 1/scale of their update's real norm (a lying server; rank 0 re-checks)."""


@dataclass(kw_only=True)
class QuantConfig:
    """How quantized bases are stored (docs/quantization.md)."""

    block_size: int = 64
    """Weights per absmax scale (QLoRA: 64)."""
    double_quant: bool = False
    """Quantize the absmax scales too (8-bit, blocks of 256): about 0.37 fewer bits per weight."""
    backend: Literal["auto", "bitsandbytes", "native"] = "auto"
    """NF4 through bitsandbytes (auto: when it is installed and supports block_size) or our own NF-k code
    (byte-identical NF4); NF8 is always ours (bitsandbytes has none)."""
    measure_absorbed: bool = True
    """Measure each round which share of the merged update the stored weights took up (HDF5 absorbed)."""


@dataclass(kw_only=True)
class EvalConfig:
    precision: str = "auto"
    """Base precision of the evaluated and exported model: auto (the lowest precision any server trains
    on, so that no number flatters the quantized servers) or fp32/fp16/bf16/nf8/nf4."""
    every: int = 1
    """Evaluate after every k-th round (the last round is always evaluated)."""
    max_samples: Optional[int] = 256
    """Evaluate every round on N eval examples (a fixed random sample, the same for every run of a seed; its
    standard error is recorded as eval_loss_se); null = all."""
    batch_size: int = 16
    final_full: bool = True
    """Also evaluate the final model on the whole eval set at the end (results.h5 eval/full_loss, full_ppl,
    full_loss_se, full_tokens) when max_samples is a sample of it."""


@dataclass(kw_only=True)
class GenerationConfig:
    """E2E generation and scoring at the end of a run (metrics/e2e.py, metrics/generate.py): beam search on
    each distinct meaning representation, scored against all its references (BLEU, NIST, METEOR, ROUGE-L,
    CIDEr); `fedpipe eval` does the same on a final/ folder."""

    enabled: bool = False
    data_path: Optional[str] = None
    """E2E CSV (columns mr,ref) to generate for, e.g. testset_w_refs.csv; null = the eval split."""
    max_mrs: Optional[int] = None
    """Score only the first N distinct MRs (in file order); null = all."""
    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8
    meteor: bool = True
    """METEOR 1.5 needs java; false leaves it out (NaN) on machines without it."""


@dataclass(kw_only=True)
class CommConfig:
    backend: Literal["auto", "torch", "mpi", "local"] = "auto"
    """auto: torch.distributed when launched by torchrun/srun (or mpirun with MASTER_ADDR set), mpi4py under
    mpirun otherwise, in-process for one process; torch / mpi / local force one."""
    timeout_s: float = 600.0
    """Timeout of every collective."""
    audit: bool = False
    """Log every payload leaving each rank to <output.dir>/wire_audit/rank<r>.jsonl and flag anything that is
    not adapter updates, scalars or profiles (comm/audit.py)."""


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/quickstart"
    overwrite: bool = False
    """Replace an existing results.h5 in dir (otherwise a run refuses to touch it)."""
    foreign_files: Literal["refuse", "keep"] = "refuse"
    """Files the project did not write in dir/checkpoint/ or dir/final/ (io/owned.py): refuse to start beside
    them, or keep them in place and start anyway (a fresh run never deletes them either way)."""
    save_final: bool = True
    """Write <dir>/final/ (merged model + tokenizer) at the end."""
    csv: bool = True
    """Keep <dir>/rounds.csv beside results.h5: its rounds/ columns, one line per round (io/sinks.py)."""
    tensorboard: bool = False
    """Also write TensorBoard event files into <dir>/tensorboard/ (needs the tensorboard package)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Per-round checkpoints beside results.h5 (io/checkpoint.py, docs/reliability.md)."""

    enabled: bool = True
    """Each rank saves what it needs to continue (its base's merged state, the kept global adapter,
    importance and planner state, RNG states) into <output.dir>/checkpoint/, keeping the two newest (and the
    earlier files their base state continues from: full_every)."""
    every: int = 1
    """Checkpoint every this many rounds (and after the last); a resume repeats the rounds since."""
    full_every: int = 50
    """A checkpoint holds the base's whole merged state only every this many rounds (and first after a
    resume); the ones between hold the merged updates since the previous checkpoint, in the factored form
    they were exchanged in (LLaMA-2-7B: about 1/17 of the state), and a resume merges them again onto the
    newest full one, bitwise the same (runtime/chain.py). 1: every checkpoint is full."""


@dataclass(kw_only=True)
class JobConfig:
    """A whole federated fine-tuning job. See jobs/quickstart.yaml for a documented example."""

    method: str = "fedpipe"
    rounds: int = 20
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    hetlora: HetLoRAConfig = field(default_factory=HetLoRAConfig)
    fedadapter: FedAdapterConfig = field(default_factory=FedAdapterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: bool = False
    """Continue the run in output.dir from its newest complete checkpoint, appending to its results.h5
    (a restart under torchrun --max-restarts resumes without it). Nothing to resume from: a fresh start."""
    central: bool = False
    """The job's centralized limit instead of the job (runtime/central.py): one process trains LoRA at lora.rank
    (every parameter for method ft) on exactly the samples the servers would train on, each step the union of
    the servers' batches of that step, one AdamW for the whole run. results.h5 records method=central."""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Validation across fields


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}", key=key)


def resolve_variant(cfg: JobConfig) -> None:
    """Fill every plan.variant switch the job left null with the variant's value (in place)."""
    for dotted, value in PLAN_VARIANTS[cfg.plan.variant].items():
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) is None:
            setattr(getattr(cfg, section), key, value)


def validate(cfg: JobConfig) -> None:
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


# --------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with typed coercion and helpful unknown-key errors


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML 1.1 (PyYAML) reads 1e3 or 2e-4 (no dot in the mantissa) as strings, not numbers.
_SCI_INT = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        msg = errors[-1] if errors else f"{key}: bad value {value!r}"
        if type(None) in args:
            msg += "; or null for the default behaviour"
        raise ConfigError(msg, key=key)
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}{extra}", key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b] (got {value!r}); write it as "
                              f"{key}=[a, b]", key=key)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            raise ConfigError(f"{key}: is a group of settings, not a value (got {value!r}); set its keys "
                              f"instead, e.g. {key}.{names[0]}=..., choosing from {names}", key=key)
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false (got {value!r}); set {key}=true or {key}=false",
                          key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _SCI_INT.match(value.strip()) and float(value).is_integer():
            return int(float(value))
        raise ConfigError(f"{key}: expected an integer (got {value!r}); set it to a whole number such as 8",
                          key=key)
    if tp is float:
        num = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            num = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '2e-4' as a string
            try:
                num = float(value)
            except ValueError:
                pass
        if num is None:
            raise ConfigError(f"{key}: expected a number (got {value!r}); set it to a number such as 0.5 or "
                              "1e-3", key=key)
        if not math.isfinite(num):
            raise ConfigError(f"{key}: must be a finite number (got {value!r}); set it to a number such as "
                              "0.5", key=key)
        return num
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ConfigError(f"{key}: is empty; set it to a text value (write {key}=VALUE with no space "
                              "around '=')", key=key)
        if isinstance(value, int) and not isinstance(value, bool):  # a folder named 2024 is still a name
            return str(value)
        leaf = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}: expected text (got {value!r}); quote it so YAML reads it as text: "
                          f"{leaf}: '{value}' in a job file, \"{key}='{value}'\" on the command line",
                          key=key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a bug in this file, not the job


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the job (e.g. 'train.lr'), for suggestions across groups."""
    cls = cls or JobConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return out


def _suggest(name: str, names: list[str], prefix: str) -> list[str]:
    """Likely intended dotted keys for an unknown key `prefix + name`."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if close:  # a typo of a key in the same group (train.lrr -> train.lr)
        return [prefix + close[0]]
    everywhere = _all_keys()
    same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == name and k != prefix + name]
    if same_leaf:  # the right key in the wrong group (lr -> train.lr)
        return same_leaf[:3]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return [prefix + close[0]]
    leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
    return [leaves[close[0]]] if close else []


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs, problems = {}, []
    for k, v in data.items():  # every wrong key and value, not only the first
        if k not in names:
            close = _suggest(str(k), names, prefix)
            hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "? ") if close else ""
            problems.append(ConfigError(f"unknown key '{prefix}{k}': {hint}valid keys here are {names}",
                                        key=f"{prefix}{k}"))
            continue
        try:
            kwargs[k] = _coerce(v, hints[k], prefix + k)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError.gathered(problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix or 'job'}: {e}") from None


def _split_override(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value (e.g. train.lr=1e-3)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: empty key; write it as dotted.key=value")
    return key, raw


def apply_override(tree: dict, override: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a nested dict in place."""
    key, raw = _split_override(override)
    try:
        value = safe_yaml(raw, f"override {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.__class__.__name__}); "
                          "quote strings and write lists as [a, b]", key=key) from None
    node = tree
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node or node[p] is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            group = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: '{group}' is a value, not a group of keys; set it directly "
                              f"as {group}=VALUE", key=group)
        node = node[p]
    node[parts[-1]] = value


def _yaml_error_hint(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f"{problem}{where}. Fix the syntax there: indent nested keys with spaces (not tabs), write "
            "'key: value' with a space after ':', and quote text that contains ':' or '#'")


MAX_SYNTHETIC = 1_000_000  # synthetic examples: generated in memory at start-up
MAX_JOB_BYTES = 1 << 20  # a job file is a page of settings; a megabyte is far beyond any real one
MAX_YAML_NODES = 100_000  # after alias expansion: a "billion laughs" file is a few hundred bytes


def safe_yaml(text: str, where: str):
    """yaml.safe_load with bounds checked first: the text's size and the node count after alias expansion
    (aliases are shared while loading, but anything that walks the result, such as building an error
    message, pays for every expanded node). ConfigError names `where`; YAML errors pass through."""
    if len(text) > MAX_JOB_BYTES:
        raise ConfigError(f"{where} is {len(text):,} characters; a job holds at most {MAX_JOB_BYTES:,} (is it the "
                          "right file?)")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(n) -> int:  # expanded node count, each shared (aliased) node computed once
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a node that contains itself (a recursive alias) counts once
        children = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else \
            n.value if isinstance(n, yaml.SequenceNode) else []
        total = 1
        for c in children:
            total += size(c)
            if total > MAX_YAML_NODES:
                break
        sizes[id(n)] = total
        return total

    try:
        expanded = size(node) if node is not None else 0
    except RecursionError:
        raise ConfigError(f"{where} nests its values too deeply; write it as plain key: value lines") from None
    if expanded > MAX_YAML_NODES:
        raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES:,} values through its aliases (*name); "
                          "a job file needs none: write the values out")
    return yaml.safe_load(text)


def read_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), check=None) -> JobConfig:
    """Read a YAML job file (or start from defaults when path is None) and apply overrides; every section is
    checked (validate), then `check(cfg)`, and a ConfigError says whether the file or an override set the key.
    Load jobs with fedpipe_dist.job.load_job, which passes the job's method's own checks as `check`."""
    tree: dict = {}
    file_tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"job file {str(p)!r} is a folder; pass a YAML file such as "
                              "jobs/quickstart.yaml")
        if not p.is_file():
            raise ConfigError(f"job file {str(p)!r} does not exist; pass a YAML file such as "
                              "jobs/quickstart.yaml")
        if p.stat().st_size > MAX_JOB_BYTES:
            raise ConfigError(f"job file {str(p)!r} is {p.stat().st_size:,} bytes; a job file holds at most "
                              f"{MAX_JOB_BYTES:,} (is it the right file?)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"job file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
        except OSError as e:
            raise ConfigError(f"job file {str(p)!r} cannot be read ({e.strerror}); check its "
                              "permissions") from None
        try:
            loaded = safe_yaml(text, f"job file {str(p)!r}")
        except yaml.YAMLError as e:
            raise ConfigError(f"job file {str(p)!r} is not valid YAML: {_yaml_error_hint(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"job file {str(p)!r} must hold a mapping of keys at the top (got "
                              f"{type(loaded).__name__}); write it as 'key: value' lines, e.g. 'rounds: 10'")
        tree = loaded
        file_tree = copy.deepcopy(loaded)
    problems = []
    for o in overrides:
        try:
            apply_override(tree, o)
        except ConfigError as e:
            problems.append(e)
    cfg = None
    try:
        cfg = _build(JobConfig, tree)
        if check is not None and not problems:
            check(cfg)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:  # each with where its key was set
        placed = [ConfigError(f"{p}{_origin(p.key, path, file_tree, overrides)}", key=p.key) for p in problems]
        raise ConfigError.gathered(placed) from None
    return cfg


def _origin(key: str | None, path: str | Path | None, file_tree: dict, overrides) -> str:
    """' (from the override ...)' or ' (in job file ...)': where the offending key was set, if known."""
    if not key:
        return ""
    base = key.split("[", 1)[0]
    for o in reversed(list(overrides)):
        okey = o.split("=", 1)[0].strip()
        if okey == base or okey.startswith(base + ".") or base.startswith(okey + "."):
            return f" (from the override {o!r})"
    node: Any = file_tree
    for part in base.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f" (in job file {str(path)!r})"


def build_job(tree: dict) -> JobConfig:
    """A JobConfig from its to_dict() form, every section checked (fedpipe_dist.job.job_from_dict adds the
    method's own checks)."""
    return _build(JobConfig, tree)
