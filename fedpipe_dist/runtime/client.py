"""Local training on one edge server: fresh adapters per the round's plan, trained on private data only."""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters.lora import FixedUpdates, LoRAAdapters, _pkey
from ..adapters.sites import KIND_INDEX, Site, n_layers
from ..algorithm.aggregation import ClientUpdate
from ..algorithm.importance import SensitivitySum, mean_singular_value
from ..algorithm.planner import ClientPlan
from ..config import JobConfig
from ..data.tokenize import TokenizedSet, collate
from ..metrics.perplexity import lm_loss


@dataclass
class ClientStats:
    client: int
    completed: bool
    batch_size: int
    local_steps: int
    samples: int
    local_s: float
    peak_mem_bytes: int
    trainable_params: int
    train_loss: float
    bytes_up: int = 0
    sensitivity: np.ndarray | None = None  # [layer, 4] Eqn 4, mean over the round's steps; NaN = no adapter
    singular: np.ndarray | None = None  # [layer, 4] mean singular value of (alpha/r) B A after training
    prune_norm: float = float("nan")  # HetLoRA: sum over sites of ||B[:, k:]|| ||A[k:]|| after training
    update_norm: float = float("nan")  # Frobenius norm of the update it sends (sanitization, algorithm/sanitize.py)
    step_times: list = field(default_factory=list)  # per local step: (batch, padded tokens, seconds incl. slowdown)


@dataclass
class Steps:
    """What the local loop did: each step's loss, whether the plan completed before the deadline, the slowdown
    time charged without waiting (clients.throttle=clock; 0 when the server really waited), and each step's
    (batch, padded tokens, seconds) as the server's clock saw it (plan.step_cost=measured fits them)."""

    losses: list[float]
    completed: bool
    charged: float
    timed: list[tuple[int, int, float]]


@dataclass(frozen=True)
class LocalTraining:
    """What a server's local training reads from the job, and nothing else (built once per run with `of`)."""

    seed: int
    lr: float
    lr_schedule: str  # train.lr_schedule: constant | cosine (round_lr)
    lr_min: float
    rounds: int
    weight_decay: float
    local_steps: int  # a plan's own local_steps, when set, takes precedence
    max_grad_norm: float
    batch_max: int
    lr_scaling: str  # plan.lr_scaling: none | sqrt | linear
    throttle: str  # clients.throttle: sleep | clock
    step_delay_s: float  # clients.step_delay_s
    lora_alpha: float
    lora_dropout: float

    @classmethod
    def of(cls, cfg: JobConfig) -> "LocalTraining":
        t = cfg.train
        return cls(seed=cfg.seed, lr=t.lr, lr_schedule=t.lr_schedule, lr_min=t.lr_min, rounds=cfg.rounds,
                   weight_decay=t.weight_decay, local_steps=t.local_steps,
                   max_grad_norm=t.max_grad_norm, batch_max=t.batch_max, lr_scaling=cfg.plan.lr_scaling,
                   throttle=cfg.clients.throttle, step_delay_s=cfg.clients.step_delay_s,
                   lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)

    def lr_for(self, batch_size: int, round_idx: int) -> float:
        """Round round_idx's lr (train.lr_schedule), scaled by plan.lr_scaling: a server training at batch b_i
        uses it x (b_i / batch_max)^p."""
        p = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.lr_scaling]
        lr = round_lr(self.lr, self.lr_schedule, self.lr_min, round_idx, self.rounds)
        return lr * (batch_size / self.batch_max) ** p


def round_lr(lr: float, schedule: str, lr_min: float, round_idx: int, rounds: int) -> float:
    """The lr of round round_idx (1-based) of `rounds` under train.lr_schedule: constant, or OpenFedLLM's cosine
    across rounds (utils.cosine_learning_rate at its 0-based round), constant within the round."""
    if schedule == "constant":
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * (round_idx - 1) / rounds))


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """One integer seed per (job, round, client), independent of which rank hosts the client."""
    return int(np.random.SeedSequence([seed, round_idx, client]).generate_state(1)[0])


def batch_indices(n: int, b: int, rng: np.random.Generator):
    """Endless batches of b indices: reshuffle each pass; a shard smaller than b is sampled with repeats."""
    while True:
        perm = rng.permutation(n)
        if n < b:
            yield rng.choice(n, size=b, replace=True)
            continue
        for start in range(0, n - b + 1, b):
            yield perm[start:start + b]


def reset_peak_mem(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator statistics, or Linux's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM := current RSS
        return True
    except OSError:
        return False


def peak_mem(device: torch.device, reset_ok: bool) -> int:
    """CUDA: peak bytes allocated by this process since the reset. CPU: the process's peak resident set
    since the reset (VmHWM: everything the rank holds, its other bases included), or, where the peak cannot
    be reset, since the process started (ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _prune_term(adapters: LoRAAdapters, gamma: float) -> torch.Tensor:
    """HetLoRA's regularizer summed over the adapted sites (algorithm/aggregation/hetlora.py)."""
    from ..algorithm.aggregation.hetlora import prune_regularizer

    terms = [prune_regularizer(adapters.B[_pkey(s)], adapters.A[_pkey(s)], gamma) for s in adapters.sites]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _run_steps(model, params: list[torch.Tensor], data: TokenizedSet, plan: ClientPlan, tr: LocalTraining, *,
               round_idx: int, seed: int, pad_id: int, device: torch.device, slowdown: float, deadline_s: float | None,
               extra_loss=None, after_backward=None, opt_memory: dict | None = None) -> Steps:
    """The local loop every method shares: seeded batches, AdamW on `params`, gradient clipping, the
    server's slowdown (and clients.step_delay_s) and the round deadline. `extra_loss()` joins the objective
    (HetLoRA's regularizer); `after_backward()` sees the raw gradients (FedPipe's sensitivity).
    `opt_memory`: the server's AdamW state of its last round (train.optimizer_state=kept), put back where a
    tensor's shape is the same, and replaced by this round's at the end."""
    opt = torch.optim.AdamW(params, lr=tr.lr_for(plan.batch_size, round_idx), weight_decay=tr.weight_decay)
    if opt_memory:
        _restore_moments(opt, params, opt_memory)
    batches = batch_indices(len(data), plan.batch_size, np.random.default_rng(seed))
    losses: list[float] = []
    timed: list[tuple[int, int, float]] = []
    completed = True
    charged = 0.0
    clock = tr.throttle == "clock"
    t0 = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout masks depend on the client and round only
            for _ in range(plan.local_steps or tr.local_steps):
                if deadline_s is not None and time.perf_counter() - t0 + charged > deadline_s:
                    completed = False
                    break
                t_step = time.perf_counter()
                batch = collate(data, next(batches), pad_id).to(device)
                loss = lm_loss(model, batch)
                objective = loss if extra_loss is None else loss + extra_loss()
                objective.backward()
                if after_backward is not None:
                    after_backward()
                if tr.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compute = time.perf_counter() - t_step
                # the server's step is slowdown x (compute + the simulated fixed delay); what is not compute waits
                wait = max(0.0, slowdown - 1.0) * compute + max(1.0, slowdown) * tr.step_delay_s
                if wait > 0:
                    if clock:
                        charged += wait
                    else:
                        time.sleep(wait)
                timed.append((batch.input_ids.shape[0], batch.input_ids.numel(), compute + wait))
    finally:
        model.eval()
    if opt_memory is not None:
        opt_memory.clear()
        opt_memory.update({i: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                           for i, p in enumerate(params) if (st := opt.state.get(p))})
        opt_memory["shapes"] = [tuple(p.shape) for p in params]
    return Steps(losses, completed, charged, timed)


def _restore_moments(opt, params, memory: dict) -> None:
    """Put a server's AdamW state back on the tensors whose index and shape are those of its last round."""
    shapes = memory.get("shapes", [])
    for i, p in enumerate(params):
        if i in memory and i < len(shapes) and shapes[i] == tuple(p.shape):
            opt.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in memory[i].items()}


def allocator_cap(device: torch.device, n_hosted: int, mem_budget_bytes: int | None) -> int | None:
    """The cap on this process's CUDA allocations while one of its servers trains: the server's budget where the
    process is that one server (an OOM is then a real failure), none where it hosts several. CUDA's cap is per
    process, and a process hosting several servers holds all of their state (every precision's base view, their
    kept adapters and moments), so one server's budget would cap the others' memory too; their plans still fit
    their budgets by the memory model (algorithm/cost.memory_bytes), and each server's peak is still measured."""
    return mem_budget_bytes if device.type == "cuda" and n_hosted == 1 else None


def _budget_memory(device: torch.device, mem_budget_bytes: int | None) -> bool:
    """On CUDA, cap this process's allocations at `mem_budget_bytes` (allocator_cap); then start a fresh
    peak-memory measurement."""
    if device.type == "cuda" and mem_budget_bytes:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_budget_bytes / total), device)
    return reset_peak_mem(device)


def train_client(model, sites: list[Site], plan: ClientPlan, data: TokenizedSet, tr: LocalTraining, *,
                 round_idx: int, pad_id: int, device: torch.device, slowdown: float = 1.0,
                 deadline_s: float | None = None, mem_budget_bytes: int | None = None,
                 start: dict | None = None, prune: tuple[float, float] | None = None, trainable=None,
                 frozen: dict | None = None, opt_memory: dict | None = None) -> tuple[ClientUpdate, ClientStats]:
    """Train fresh adapters on this client's shard for its plan's local steps and return their factors.

    A slowdown s > 1 makes the server really slower: after each step it waits (s - 1) times the step's
    own duration, so wall-clock, straggler wait and deadlines are measured, not computed. With a deadline,
    training stops once it is passed and the client counts as not completed. On CUDA the server's memory
    budget caps this process's allocations (torch's per-process memory fraction).
    `start`: factors the adapters start from (methods with a global adapter); `prune`: HetLoRA's
    (gamma, reg): reg * ||B[:, k:]|| ||A[k:]|| (k = floor(gamma r)) joins the loss of every step;
    `trainable(adapters)`: the adapter tensors the optimizer updates (default: every A and B); `frozen`: updates
    (factors or dense, by site key) added to the model during training and left out of the update (the part of
    a kept global adapter beyond this server's rank, methods/fedpipe.py).
    """
    seed = client_seed(tr.seed, round_idx, plan.client)
    gen = torch.Generator().manual_seed(seed)
    adapters = LoRAAdapters(sites, plan.ranks, alpha=tr.lora_alpha, dropout=tr.lora_dropout, generator=gen,
                            device=device, init=start)
    reset_ok = _budget_memory(device, mem_budget_bytes)
    L = n_layers(sites)
    # Eqn 4 on the raw gradients (after each backward, before clipping and the update), summed over steps
    sens_sum = SensitivitySum(adapters.site_params(), device=device)

    extra = (lambda: prune[1] * _prune_term(adapters, prune[0])) if prune is not None and prune[1] > 0 else None
    t0 = time.perf_counter()
    with adapters.attach(model), (FixedUpdates(sites, frozen).attach(model) if frozen else nullcontext()):
        params = list(adapters.parameters()) if trainable is None else trainable(adapters)
        ran = _run_steps(model, params, data, plan, tr, round_idx=round_idx, seed=seed, pad_id=pad_id,
                         device=device, slowdown=slowdown, deadline_s=deadline_s, extra_loss=extra,
                         after_backward=sens_sum.add, opt_memory=opt_memory)
    sensitivity = np.full((L, 4), np.nan)
    singular = np.full((L, 4), np.nan)
    factors = adapters.factors()
    summed = sens_sum.total.tolist()
    for i, s in enumerate(adapters.sites if ran.losses else []):  # no step ran (deadline passed): nothing measured
        j = KIND_INDEX[s.kind]
        sensitivity[s.layer, j] = summed[i] / len(ran.losses)
        singular[s.layer, j] = mean_singular_value(*factors[s.key])
    prune_norm = float(_prune_term(adapters, prune[0]).detach()) if prune is not None else float("nan")
    stats = _stats(plan, ran, t0, device, reset_ok, sum(p.numel() for p in params))
    stats.sensitivity, stats.singular, stats.prune_norm = sensitivity, singular, prune_norm
    return ClientUpdate(plan.client, len(data), plan.batch_size, factors,
                        plan.local_steps or tr.local_steps), stats


def _stats(plan: ClientPlan, ran: Steps, t0: float, device: torch.device, reset_ok: bool,
           trainable: int) -> ClientStats:
    """`t0`: when local training started (local time counts the slowdown time charged without waiting too)."""
    losses = ran.losses
    return ClientStats(
        client=plan.client, completed=ran.completed, batch_size=plan.batch_size, local_steps=len(losses),
        samples=len(losses) * plan.batch_size, local_s=time.perf_counter() - t0 + ran.charged,
        peak_mem_bytes=peak_mem(device, reset_ok), trainable_params=trainable,
        train_loss=float(np.mean(losses)) if losses else float("nan"), step_times=ran.timed)


def model_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the model once (a tied embedding / LM head counts once), by name."""
    return dict(model.named_parameters())  # named_parameters() already skips tied duplicates


def train_full(model, plan: ClientPlan, data: TokenizedSet, tr: LocalTraining, *, round_idx: int, pad_id: int,
               device: torch.device, slowdown: float = 1.0, deadline_s: float | None = None,
               mem_budget_bytes: int | None = None, opt_memory: dict | None = None
               ) -> tuple[ClientUpdate, ClientStats]:
    """Full fine-tuning (method ft): every parameter trains; the update is W_local - W_global per parameter.
    `opt_memory`: the server's AdamW state across rounds (train.optimizer_state=kept; `_run_steps`).

    The model is restored to the global weights afterwards, so the next server hosted on this rank starts
    from the same model; the update is dense [shape of the parameter] per parameter name."""
    seed = client_seed(tr.seed, round_idx, plan.client)
    params = model_parameters(model)
    start = {k: p.detach().clone() for k, p in params.items()}
    reset_ok = _budget_memory(device, mem_budget_bytes)
    for p in params.values():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        ran = _run_steps(model, list(params.values()), data, plan, tr, round_idx=round_idx, seed=seed,
                         pad_id=pad_id, device=device, slowdown=slowdown, deadline_s=deadline_s, opt_memory=opt_memory)
        stats = _stats(plan, ran, t0, device, reset_ok, sum(p.numel() for p in params.values()))
        with torch.no_grad():
            delta = {k: (p.detach() - start[k]).float().cpu() for k, p in params.items()}
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.requires_grad_(False)
                p.copy_(start[k])
    return ClientUpdate(plan.client, len(data), plan.batch_size, delta), stats


def train_houlsby(model, points, state: dict, plan: ClientPlan, data: TokenizedSet, tr: LocalTraining, *,
                  round_idx: int, pad_id: int, device: torch.device, slowdown: float = 1.0,
                  deadline_s: float | None = None, mem_budget_bytes: int | None = None
                  ) -> tuple[ClientUpdate, ClientStats]:
    """FedAdapter's local training: the Houlsby adapters in `state` (the server's configuration, grown from
    the global adapter) train on the shard; the update is their new state."""
    from ..adapters.houlsby import HoulsbyAdapters

    seed = client_seed(tr.seed, round_idx, plan.client)
    adapters = HoulsbyAdapters(points, state, device=device)
    reset_ok = _budget_memory(device, mem_budget_bytes)
    t0 = time.perf_counter()
    with adapters.attach(model):
        ran = _run_steps(model, list(adapters.parameters()), data, plan, tr, round_idx=round_idx, seed=seed,
                         pad_id=pad_id, device=device, slowdown=slowdown, deadline_s=deadline_s)
    stats = _stats(plan, ran, t0, device, reset_ok, adapters.trainable_parameters())
    return ClientUpdate(plan.client, len(data), plan.batch_size, adapters.state()), stats
