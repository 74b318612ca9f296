"""The job's sections: one keyword-only dataclass per section of a job file (model, data, clients, train, plan,
lora, ...), JobConfig holding them, and the plan.variant presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = [  # what config/ re-exports: the one list of this module's public names
    "TARGETS",
    "PRECISIONS",
    "MAX_SYNTHETIC",
    "BNB_BLOCKS",
    "PLAN_VARIANTS",
    "REBALANCE_PRESETS",
    "ModelConfig",
    "DataConfig",
    "ClientsConfig",
    "TrainConfig",
    "PlanConfig",
    "LoraConfig",
    "HetLoRAConfig",
    "FedAdapterConfig",
    "AggregationConfig",
    "FaultsConfig",
    "QuantConfig",
    "EvalConfig",
    "GenerationConfig",
    "CommConfig",
    "OutputConfig",
    "CheckpointConfig",
]

TARGETS = ("q", "k", "v", "o")
PRECISIONS = ("fp32", "fp16", "bf16", "nf8", "nf4")
MAX_SYNTHETIC = 1_000_000  # synthetic examples: generated in memory at start-up
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)  # block sizes bitsandbytes' NF4 supports on CPU and CUDA
# plan.variant presets: the switch values a job gets for every one of these keys it leaves null.
# paper: Algorithm 1 and Eqn 10 as published. tuned: the measured best (docs/planner.md, "Variants").
PLAN_VARIANTS = {
    "paper": {"plan.split": "batch", "plan.rank_alloc": "greedy", "plan.step_overhead_s": 0.0,
              "plan.step_cost": "given", "plan.lr_scaling": "none", "aggregation.weights": "paper",
              "lora.carry": "none"},
    "tuned": {"plan.split": "auto", "plan.rank_alloc": "spread", "plan.step_overhead_s": 0.0,
              "plan.step_cost": "auto", "plan.lr_scaling": "none", "aggregation.weights": "samples",
              "lora.carry": "adapter"},
}
# lora.rebalance's value per plan.variant where it applies (fedpipe with lora.carry=adapter, fresh AdamW state, no
# server optimizer and more than one local step); "none" elsewhere. job.check_method fills it in, since whether it
# applies needs the method.
REBALANCE_PRESETS = {"paper": "none", "tuned": "orth"}


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
    own_eval_samples: int = 0
    """Per server, this many examples of its own shard held out (a seeded draw, never trained on) and scored with
    the global model at every evaluation (HDF5 clients/eval_loss_heldout): how well the federated model fits each
    server's own data, all of it, where the public eval set holds only some of its keys (non-iid splits). At most
    a quarter of a shard is held out. 0: none, every example trains."""
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
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The lr of round t (1-based) of R = rounds: constant keeps train.lr; cosine is OpenFedLLM's schedule across
    rounds (rui-ye/OpenFedLLM, main_sft.py and utils.cosine_learning_rate): lr_min + (lr - lr_min)(1 + cos(pi
    (t - 1) / R)) / 2, constant within the round. The centralized limit (central=true) follows it round by round."""
    lr_min: float = 1.0e-6
    """The cosine schedule's floor (OpenFedLLM's 1e-6)."""
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
    step_cost: Optional[Literal["given", "measured", "auto"]] = None
    """Where t0 comes from. given: plan.step_overhead_s. measured: every server times its round-1 local steps
    (seconds and padded tokens), the times are scaled to the fastest server's speed and fitted as
    t0 + c x tokens over all servers, and from round 2 on the plan uses the fitted t0 (in samples' worth, so the
    planner's FLOPs need not match the device's efficiency) instead of plan.step_overhead_s. With
    plan.split=auto this makes the batch-or-steps choice from the devices' real step-cost shape. auto (the
    tuned variant's): measured where every rank trains on a GPU (on an H200, stories260K's step costs 25 ms +
    2 us per token: nearly the same at any batch), given on CPUs (a step's cost there grows with its batch, and
    plans stay independent of the machine's load). The paper variant: given."""
    step_fit: Literal["rounds", "round1"] = "rounds"
    """plan.step_cost=measured, how the timed steps are fitted. rounds: every round's steps by Theil-Sen (median
    pairwise slope), planned with the median over the rounds' fits, so a burst of load on the machine moves it
    little; round1: least squares on round 1's steps only, kept for the rest of the run (the first version)."""
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
    of the servers' models (algorithm/aggregation/fedpipe.shared_a_delta). null = plan.variant's choice; another
    method starts its rounds by its own rule and refuses any other value (job.check_method)."""
    rebalance: Optional[Literal["none", "svd", "orth"]] = None
    """How a kept global adapter of factors is factored for the next round (fedpipe with lora.carry=adapter, lora,
    lora_hb; not beside kept AdamW moments or a server optimizer, whose state it would rotate). none: the
    averaged factors as they are. svd: the same product B_g A_g split by its SVD, B = U sqrt(S), A = sqrt(S) V^T
    (FlexLoRA's split; algorithm/aggregation/fedpipe.svd_rebalance), strongest direction first. The global model
    is the same exact average either way; only the next round's starting factors differ. orth: the same SVD with
    A's rows orthonormal times a fresh A row's norm (1/sqrt(3)) and the singular values in B. null = plan.variant's
    choice where it applies (REBALANCE_PRESETS: tuned orth, paper none; none at train.local_steps=1, where orth
    measured worse), none elsewhere (every other method)."""
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
    server_opt: Literal["none", "fedavgm", "fedadagrad", "fedyogi", "fedadam"] = "none"
    """A server-side optimizer on the kept global adapter (algorithm/server_opt.py; Reddi et al. 2021, as
    OpenFedLLM applies it to LoRA factors): the clients' average minus the global adapter is its
    pseudo-gradient. Methods that keep a global adapter of factors only: lora, lora_hb, hetlora, and fedpipe with
    lora.carry=adapter (the base still takes the exact average's cross terms). none: the plain average."""
    server_lr: float = 1e-3
    """The server optimizer's step size eta (fedadagrad, fedyogi, fedadam; OpenFedLLM's default)."""
    server_beta1: float = 0.9
    """Its momentum b1 (fedavgm, fedyogi, fedadam)."""
    server_beta2: float = 0.99
    """Its second-moment decay b2 (fedyogi, fedadam)."""
    server_tau: float = 1e-3
    """Its adaptivity floor tau (v starts at tau^2; fedadagrad, fedyogi, fedadam)."""


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
