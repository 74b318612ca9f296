"""Per-round, per-server plans: batch size, base precision, and a LoRA rank per attention weight.

A plan is data, shared by every rank: each rank computes the same plans from the same inputs
(deterministically), so no plan ever has to be sent. The uniform planner gives every server the same
configuration (fixed-rank LoRA); `fedpipe_plan` is FedPipe's Algorithm 1: batch sizes from compute
ratios, then weights and ranks by importance under each server's FLOPs budget, and the most bits of
base precision that fit its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..adapters.sites import KIND_INDEX, Site, n_layers


@dataclass
class ClientPlan:
    client: int
    batch_size: int
    ranks: dict[str, int] = field(default_factory=dict)  # site.key ("3.q") -> rank; absent or 0 = no adapter
    precision: str = "fp32"
    local_steps: int | None = None  # this round's local steps; None = the job's train.local_steps

    def rank_matrix(self, sites: list[Site]) -> np.ndarray:
        """[layer, 4] ranks in q, k, v, o order (0 = no adapter), the HDF5 clients/ranks layout."""
        m = np.zeros((n_layers(sites), 4), dtype=np.int32)
        for s in sites:
            m[s.layer, KIND_INDEX[s.kind]] = self.ranks.get(s.key, 0)
        return m


def uniform_plan(sites: list[Site], n_clients: int, *, targets: list[str], rank: int, batch_size: int,
                 precision: str = "fp32", local_steps: int | None = None) -> list[ClientPlan]:
    """Every server: batch `batch_size`, rank `rank` on every targeted weight of every layer."""
    ranks = {s.key: rank for s in sites if s.kind in targets}
    return [ClientPlan(c, batch_size, dict(ranks), precision, local_steps) for c in range(n_clients)]


def sample_clients(n_clients: int, fraction: float, *, seed: int, round_idx: int) -> list[int]:
    """Sorted ids of the servers taking part in a round: a seeded draw, the same on every rank."""
    k = max(1, int(round(fraction * n_clients)))
    if k >= n_clients:
        return list(range(n_clients))
    rng = np.random.default_rng([seed, round_idx, 0x5A])
    return sorted(int(c) for c in rng.choice(n_clients, size=k, replace=False))


# ---- FedPipe's planner (Sec. III-D, Algorithm 1) -----------------------------------------------------------

PRECISION_ORDER = ("fp32", "fp16", "nf8", "nf4")  # most bits first: precision=auto takes the first that fits
TIE_ORDER = {"q": 0, "v": 1, "k": 2, "o": 3}  # equal scores: LoRA's finding that W_q, W_v matter most


@dataclass
class ServerBudget:
    """What the planner knows of one server: measured compute and its memory budget."""

    flops_per_s: float
    mem_bytes: float


@dataclass
class PlanInfo:
    """The planner's reasoning for one server, for HDF5, `fedpipe plan` and tests."""

    budget_flops: float  # FLOPs this server may spend per local step
    step_flops: float  # FLOPs of one step under the plan: b * f_c
    predicted_step_s: float
    predicted_mem_bytes: float
    fits: bool  # within both the FLOPs budget and the memory budget


def stage1_batch(flops_per_s: list[float], b_min: int, b_max: int, overhead: float = 0.0) -> list[int]:
    """Stage 1: b_i from the capability ratio u_i = C_i / max_j C_j.

    The paper rounds u_i * b_max; we take the floor, so that no server's batch exceeds its share of the
    fastest server's step time (rounding up would make it a straggler by design). Clipped to b_min.
    `overhead`: a step's fixed cost (plan.step_overhead_s) in samples' worth of the fastest server's compute,
    o. A step then costs o + b samples' worth, and b_i = floor(u_i (o + b_max) - o): the paper's rule at o = 0.
    """
    top = max(flops_per_s)
    return [max(b_min, min(b_max, int(np.floor(c / top * (overhead + b_max) - overhead + 1e-9))))
            for c in flops_per_s]


def stage1_steps(flops_per_s: list[float], steps: int) -> list[int]:
    """plan.split=steps: every server trains at the same batch, local steps K_i = floor(u_i K), at least 1."""
    top = max(flops_per_s)
    return [max(1, int(np.floor(c / top * steps + 1e-9))) for c in flops_per_s]


def stage1_auto(flops_per_s: list[float], b_min: int, b_max: int, steps: int, overhead: float = 0.0
                ) -> tuple[list[int], list[int]]:
    """plan.split=auto: batch first, then steps, from the step-cost shape t(b) = o + b (samples' worth of the
    fastest server's compute; `overhead` o is plan.step_overhead_s in those units). Server i has u_i of the
    fastest server's round, K (o + b_max) u_i. It keeps all K steps at the largest batch that fits (the paper's
    batch split, stage1_batch) while that batch is at least b_min; where even b_min does not fit (a slow server,
    or a large o: a step costs nearly the same at any batch, as on a GPU with a small model) it takes the most
    steps that fit at b_min, K_i = floor(K u_i (o + b_max) / (o + b_min)), and then the largest batch those K_i
    steps leave room for. At o = 0 it is the paper's rule wherever u_i b_max >= b_min; as o grows it becomes
    plan.split=steps (b_max, K_i = floor(u_i K))."""
    top = max(flops_per_s)
    batches, out_steps = [], []
    for c in flops_per_s:
        room = steps * c / top * (overhead + b_max)  # the server's round, in samples' worth
        k = min(steps, max(1, int(np.floor(room / (overhead + b_min) + 1e-9))))
        b = max(b_min, min(b_max, int(np.floor(room / k - overhead + 1e-9))))
        batches.append(b)
        out_steps.append(k)
    return batches, out_steps


def _items(sites: list[Site], targets: list[str], granularity: str) -> list[tuple[tuple, list[Site]]]:
    """Units the greedy search picks: one per weight type (all layers) or one per (layer, weight)."""
    chosen = [s for s in sites if s.kind in targets]
    if granularity == "type":
        return [((TIE_ORDER[k], -1), [s for s in chosen if s.kind == k]) for k in sorted(set(s.kind for s in chosen),
                                                                                      key=TIE_ORDER.get)]
    return [((TIE_ORDER[s.kind], s.layer), [s]) for s in chosen]


def greedy_ranks(items, item_scores: list[float], candidate_ranks: list[int], budget: float, cost,
                 tol: float = 0.0) -> dict[str, int]:
    """Algorithm 1, stage 2: most important item first, the highest candidate rank whose cost fits the
    remaining budget; an item with no fitting rank gets no adapter. `cost(sites, r)` is FLOPs per sample.
    `tol` (FLOPs) absorbs floating-point noise in the budget: a rank that exactly spends it must fit
    whatever the rounding (the default budget is often exactly some ranks' cost)."""
    return _upgrade(items, _by_importance(items, item_scores), candidate_ranks, {}, budget, cost, tol)


def _by_importance(items, item_scores: list[float]) -> list[int]:
    """Item indices, most important first; ties in the items' own order (q, v, k, o, then by layer)."""
    return sorted(range(len(items)), key=lambda i: (-item_scores[i], items[i][0]))


def _upgrade(items, order: list[int], candidate_ranks: list[int], ranks: dict[str, int], remaining: float, cost,
             tol: float) -> dict[str, int]:
    """In `order`, raise each item to the highest candidate rank above its current one (0 if it has none)
    whose extra cost fits what remains of the budget; returns `ranks`, updated."""
    for i in order:
        sites = items[i][1]
        now = ranks.get(sites[0].key, 0)
        for r in sorted({r for r in candidate_ranks if r > now}, reverse=True):
            extra = cost(sites, r) - (cost(sites, now) if now else 0.0)
            if extra <= remaining + tol:
                remaining -= extra
                for s in sites:
                    ranks[s.key] = r
                break
    return ranks


def spread_ranks(items, item_scores: list[float], candidate_ranks: list[int], budget: float, cost,
                 tol: float = 0.0) -> dict[str, int]:
    """plan.rank_alloc=spread: every item at the highest candidate rank all of them fit at together, then
    the leftover budget upgrades items in order of importance (each to the highest rank that still fits).
    If not even the lowest rank fits every item, the most important items take it while it fits."""
    order = _by_importance(items, item_scores)
    cands = sorted(set(candidate_ranks))
    common = next((r for r in reversed(cands)
                   if sum(cost(items[i][1], r) for i in order) <= budget + tol), None)
    if common is None:  # too little for every weight: the lowest rank on the most important ones
        return _upgrade(items, order, cands[:1], {}, budget, cost, tol)
    ranks = {s.key: common for i in order for s in items[i][1]}
    remaining = budget - sum(cost(items[i][1], common) for i in order)
    return _upgrade(items, order, cands, ranks, remaining, cost, tol)


RANK_ALLOCATORS = {"greedy": greedy_ranks, "spread": spread_ranks}


def item_scores(items, scores: np.ndarray) -> list[float]:
    """Mean importance over an item's sites (scores [layer, 4] in q, k, v, o order)."""
    return [float(np.mean([scores[s.layer, KIND_INDEX[s.kind]] for s in sites])) for _, sites in items]


def fedpipe_plan(shape, servers: list[ServerBudget], scores: list[np.ndarray], *, targets: list[str],
                 candidate_ranks: list[int], ref_rank: int, b_min: int, b_max: int, seq_len: int,
                 step_time_s: float | None, granularity: str = "type", precision: str | list[str] = "auto",
                 act_bytes: int = 4, auto_options: tuple[str, ...] = PRECISION_ORDER, split: str = "batch",
                 rank_alloc: str = "greedy", step_overhead_s: float = 0.0, local_steps: int = 1
                 ) -> tuple[list[ClientPlan], list[PlanInfo]]:
    """Per-server plans for one round.

    Budget: every server may spend tau seconds per local step, C_i,max = flops_per_s_i * tau. By default
    tau is the fastest server's step time for uniform LoRA (ref_rank on every target, batch b_max), so a
    round costs what fixed-rank LoRA costs on the fastest server. Per sample the adapters get
    min(C_i,max / b_i - base, A_ref), A_ref being the fastest server's per-sample adapter budget: a server
    with more compute then never gets a smaller total rank (the floor in stage 1 would otherwise hand a
    slower server more per-sample slack).

    A step also has a fixed cost (`step_overhead_s` on the fastest server, t0): O = t0 * C_top FLOPs' worth,
    the same for every server of a homogeneous-hardware profile (a slowed server's t0 is slowed too).
    `split="steps"`: every server plans batch b_max and local_steps * u_i steps (stage1_steps) instead of a
    smaller batch; `split="auto"`: a smaller batch while that keeps every step, fewer steps beyond (stage1_auto);
    the round budget, local_steps * tau, is the same either way.
    """
    from .cost import adapter_flops_per_sample, base_flops_per_sample, flops_per_sample, memory_bytes

    sites = list(shape.sites)
    items = _items(sites, targets, granularity)
    base = base_flops_per_sample(shape, seq_len)
    speeds = [s.flops_per_s for s in servers]
    top = max(speeds)
    ref = {s.key: ref_rank for s in sites if s.kind in targets}
    f_ref = flops_per_sample(shape, ref, seq_len)
    overhead = step_overhead_s * top  # FLOPs' worth of a step's fixed cost, on every server
    if step_time_s is None:
        step_time_s = (overhead + b_max * f_ref) / top
    allocate = RANK_ALLOCATORS[rank_alloc]

    def cost(item_sites, r):
        return sum(adapter_flops_per_sample(s, r, seq_len) for s in item_sites)

    # The fastest server's batch: b_max, or under a step time too short for b_max (a plan.step_time_s below the
    # default), the largest batch that leaves room per sample for the cheapest item at the lowest rank; a_ref is
    # its per-sample adapter budget. Without this, a_ref < 0 left every server with no adapter at all: plans that
    # "fit" and train nothing.
    cheapest = min((cost(item_sites, min(candidate_ranks)) for _, item_sites in items), default=0.0)
    b_top = b_max
    while b_top > b_min and (top * step_time_s - overhead) / b_top - base < cheapest * (1 - 1e-9):
        b_top -= 1
    a_ref = (top * step_time_s - overhead) / b_top - base

    if split == "steps":
        batches, steps = [b_top] * len(servers), stage1_steps(speeds, local_steps)
    elif split == "auto":
        batches, steps = stage1_auto(speeds, b_min, b_top, local_steps, overhead / f_ref)
    else:
        batches, steps = stage1_batch(speeds, b_min, b_top, overhead / f_ref), [local_steps] * len(servers)
    plans, infos = [], []
    for c, (srv, b, k) in enumerate(zip(servers, batches, steps)):
        # a server's round budget: local_steps steps of tau; per step, what its k steps leave
        budget = srv.flops_per_s * step_time_s * local_steps / k
        while b > b_min and b * base + overhead > budget:  # the frozen model alone must fit the step budget
            b -= 1
        fixed = precision[c] if isinstance(precision, list) else precision
        options = auto_options if fixed == "auto" else (fixed,)
        importance = item_scores(items, scores[c])
        while True:  # if no precision fits the memory budget, a smaller batch may
            adapter_budget = min((budget - overhead) / b - base, a_ref)
            # budget / b - base cancels most digits (base dominates): tolerate that much rounding
            ranks = allocate(items, importance, candidate_ranks, adapter_budget, cost, tol=1e-9 * (base + a_ref))
            if not ranks and items and b > b_min:  # no adapter fits beside this batch: a smaller one may
                b -= 1
                continue
            mems = {p: memory_bytes(shape, precision=p, ranks=ranks, batch=b, seq_len=seq_len, act_bytes=act_bytes)
                    for p in options}
            prec = next((p for p in options if mems[p] <= srv.mem_bytes), None)
            if prec is not None or b <= b_min:
                break
            b -= 1
        prec = prec or options[-1]
        step = b * flops_per_sample(shape, ranks, seq_len) + overhead
        fits = step <= budget * (1 + 1e-9) and mems[prec] <= srv.mem_bytes
        plans.append(ClientPlan(c, b, ranks, prec, k))
        infos.append(PlanInfo(budget, step, step / srv.flops_per_s, mems[prec], fits))
    return plans, infos
