"""Local training on one edge server: fresh adapters per the round's plan, trained on private data only."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters.lora import LoRAAdapters, _pkey
from ..adapters.sites import KIND_INDEX, Site, n_layers
from ..algorithm.aggregation import ClientUpdate
from ..algorithm.importance import mean_singular_value, sensitivity_of
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


def _reset_peak_mem(device: torch.device) -> bool:
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


def _peak_mem(device: torch.device, reset_ok: bool) -> int:
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


def train_client(model, sites: list[Site], plan: ClientPlan, data: TokenizedSet, cfg: JobConfig, *,
                 round_idx: int, pad_id: int, device: torch.device, slowdown: float = 1.0,
                 deadline_s: float | None = None, mem_budget_bytes: int | None = None,
                 start: dict | None = None, prune: tuple[float, float] | None = None
                 ) -> tuple[ClientUpdate, ClientStats]:
    """Train fresh adapters on this client's shard for cfg.train.local_steps and return their factors.

    A slowdown s > 1 makes the server really slower: after each step it waits (s - 1) times the step's
    own duration, so wall-clock, straggler wait and deadlines are measured, not computed. With a deadline,
    training stops once it is passed and the client counts as not completed. On CUDA the server's memory
    budget caps this process's allocations (torch's per-process memory fraction).
    `start`: factors the adapters start from (methods with a global adapter); `prune`: HetLoRA's
    (gamma, reg): reg * ||B[:, k:]|| ||A[k:]|| (k = floor(gamma r)) joins the loss of every step.
    """
    seed = client_seed(cfg.seed, round_idx, plan.client)
    gen = torch.Generator().manual_seed(seed)
    adapters = LoRAAdapters(sites, plan.ranks, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, generator=gen,
                            device=device, init=start)
    opt = torch.optim.AdamW(adapters.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = batch_indices(len(data), plan.batch_size, np.random.default_rng(seed))
    if device.type == "cuda":
        if mem_budget_bytes:  # enforce the server's memory budget on this GPU (an OOM is a real failure)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, mem_budget_bytes / total), device)
    reset_ok = _reset_peak_mem(device)
    L = n_layers(sites)
    sens_sum = {s.key: torch.zeros((), device=device) for s in adapters.sites}  # Eqn 4, summed over steps
    losses = []
    completed = True
    t0 = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), adapters.attach(model):
        torch.manual_seed(seed)  # dropout masks depend on the client and round only
        for _ in range(cfg.train.local_steps):
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                completed = False
                break
            t_step = time.perf_counter()
            batch = collate(data, next(batches), pad_id).to(device)
            loss = lm_loss(model, batch)
            objective = loss
            if prune is not None and prune[1] > 0:
                objective = loss + prune[1] * _prune_term(adapters, prune[0])
            objective.backward()
            for s in adapters.sites:  # Eqn 4 on the raw gradients, before clipping and the update
                sens_sum[s.key] += sensitivity_of([adapters.A[_pkey(s)], adapters.B[_pkey(s)]])
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(adapters.parameters(), cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if slowdown > 1.0:
                time.sleep((slowdown - 1.0) * (time.perf_counter() - t_step))
    model.eval()
    sensitivity = np.full((L, 4), np.nan)
    singular = np.full((L, 4), np.nan)
    factors = adapters.factors()
    for s in adapters.sites if losses else []:  # no step ran (deadline already passed): nothing measured
        j = KIND_INDEX[s.kind]
        sensitivity[s.layer, j] = float(sens_sum[s.key]) / len(losses)
        singular[s.layer, j] = mean_singular_value(*factors[s.key])
    prune_norm = float(_prune_term(adapters, prune[0]).detach()) if prune is not None else float("nan")
    stats = ClientStats(
        client=plan.client, completed=completed, batch_size=plan.batch_size, local_steps=len(losses),
        samples=len(losses) * plan.batch_size, local_s=time.perf_counter() - t0,
        peak_mem_bytes=_peak_mem(device, reset_ok), trainable_params=adapters.trainable_parameters(),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        sensitivity=sensitivity, singular=singular, prune_norm=prune_norm)
    update = ClientUpdate(plan.client, len(data), plan.batch_size, factors)
    return update, stats
