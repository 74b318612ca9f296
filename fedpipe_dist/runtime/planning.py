"""Per-round planning inside a run: importance state per hosted server, score exchange, the planner call.

Every rank ends up with the same plans: the importance scores of all servers are all-gathered (an
[layer, 4] array each), and the planner is a pure function of scores, profiles and the job.
"""

from __future__ import annotations

import math

import numpy as np

from ..adapters.sites import Site, n_layers
from ..algorithm.cost import (
    ModelShape,
    flops_per_sample,
    ft_flops_per_sample,
    ft_memory_bytes,
    houlsby_flops_per_sample,
    houlsby_memory_bytes,
    memory_bytes,
)
from ..algorithm.importance import ImportanceState
from ..algorithm.planner import PRECISION_ORDER, ClientPlan, PlanInfo, ServerBudget, fedpipe_plan, uniform_plan
from ..config import ADAPTER_FREE_METHODS, JobConfig
from .heterogeneity import ServerProfile


class RoundPlanner:
    def __init__(self, cfg: JobConfig, shape: ModelShape, sites: list[Site], profiles: list[ServerProfile],
                 hosted: list[int]):
        self.cfg = cfg
        self.shape = shape
        self.sites = sites
        self.L = n_layers(sites)
        self.servers = [ServerBudget(p.tflops * 1e12, p.mem_budget_bytes) for p in profiles]
        self.states = {c: ImportanceState(self.L, cfg.plan.lam1, cfg.plan.lam2) for c in hosted}
        self.act_bytes = 4 if cfg.model.dtype == "float32" else 2
        # precision=auto picks from these; a model loaded in 16 bits has no fp32 base to offer.
        self.native = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype]
        self.auto_options = PRECISION_ORDER if self.native == "fp32" else (self.native, "nf8", "nf4")
        self.pinned: list[str] | None = None  # each server's base precision, fixed after round 1
        self.client_ranks = initial_client_ranks(cfg, [srv.flops_per_s for srv in self.servers])
        # fedadapter: each server's (depth, width) this round; the engine sets them (trial groups differ)
        self.adapter_configs = [(cfg.fedadapter.depth, cfg.fedadapter.width)] * cfg.clients.n

    def pin_precisions(self, comm) -> list[str]:
        """Each server's base precision for the whole run: the job's list, or the planner's round-1 choice.

        A server's memory does not change between rounds, and its base is quantized once when it loads
        (as QLoRA does); re-quantizing whenever a plan's ranks moved the memory estimate would cost a copy
        of the weights per change and gain nothing, so later rounds plan with this precision fixed (a plan
        that no longer fits then lowers the batch, or counts as under-training).
        """
        plans, _, _ = self.plan(comm, 1)
        self.pinned = [p.precision for p in plans]
        return list(self.pinned)

    def _precisions(self) -> str | list[str]:
        return self.pinned if self.pinned is not None else self.cfg.clients.precision

    def scores(self, comm, round_idx: int) -> np.ndarray:
        """[client, layer, 4] importance used to plan this round (identical on every rank)."""
        n, p = self.cfg.clients.n, self.cfg.plan
        if p.importance == "platon":
            local = {c: st.scores() for c, st in self.states.items()}
            merged: dict[int, np.ndarray] = {}
            for part in comm.all_gather_object(local):
                merged.update(part)
            return np.stack([merged[c] for c in range(n)])
        if p.importance == "random":  # ablation: a fresh seeded order every round
            return np.random.default_rng([self.cfg.seed, round_idx, 0xA11]).random((n, self.L, 4))
        return np.zeros((n, self.L, 4))  # fixed: ties everywhere, so the order q, v, k, o decides

    def plan(self, comm, round_idx: int) -> tuple[list[ClientPlan], list[PlanInfo], np.ndarray]:
        cfg = self.cfg
        n, T = cfg.clients.n, cfg.model.max_length
        if cfg.plan.mode == "uniform" or cfg.method != "fedpipe":
            # The baselines (and FedPipe's uniform ablation) do not adapt: batch_max, every target at the
            # server's rank (client_ranks), and the precision the job names (auto: see below).
            prec = self._precisions()
            prec = prec if isinstance(prec, list) else [prec] * n
            plans = uniform_plan(self.sites, n, targets=cfg.lora.targets, rank=cfg.lora.rank,
                                 batch_size=cfg.train.batch_max, local_steps=cfg.train.local_steps)
            lora = cfg.method not in ADAPTER_FREE_METHODS
            # auto: the most bits whose memory fits (QLoRA-style bases for the baselines too); ft trains its
            # fp32 weights, so it has no other option (a server it does not fit under-trains)
            options = ("fp32",) if cfg.method == "ft" else self.auto_options
            infos = []
            for c, (pl, p, r, srv) in enumerate(zip(plans, prec, self.client_ranks, self.servers)):
                pl.ranks = {k: r for k in pl.ranks} if lora else {}
                for option in (options if p == "auto" else (p,)):
                    pl.precision = option
                    step, mem = self._uniform_cost(c, pl)
                    if mem <= srv.mem_bytes:
                        break
                infos.append(PlanInfo(math.inf, step, step / srv.flops_per_s, mem, mem <= srv.mem_bytes))
            return plans, infos, np.full((n, self.L, 4), np.nan)
        scores = self.scores(comm, round_idx)
        precision = self._precisions()
        plans, infos = fedpipe_plan(
            self.shape, self.servers, list(scores), targets=cfg.lora.targets, candidate_ranks=cfg.lora.ranks,
            ref_rank=cfg.lora.rank, b_min=cfg.train.batch_min, b_max=cfg.train.batch_max, seq_len=T,
            step_time_s=cfg.plan.step_time_s, granularity=cfg.plan.granularity, precision=precision,
            act_bytes=self.act_bytes, auto_options=self.auto_options, split=cfg.plan.split,
            rank_alloc=cfg.plan.rank_alloc, step_overhead_s=cfg.plan.step_overhead_s,
            local_steps=cfg.train.local_steps)
        return plans, infos, scores

    def _uniform_cost(self, c: int, pl: ClientPlan) -> tuple[float, float]:
        """FLOPs of one local step and peak memory of a non-FedPipe plan, by method (algorithm/cost.py)."""
        T, shape, b = self.cfg.model.max_length, self.shape, pl.batch_size
        if self.cfg.method == "ft":
            return b * ft_flops_per_sample(shape, T), ft_memory_bytes(shape, batch=b, seq_len=T,
                                                                      act_bytes=self.act_bytes)
        if self.cfg.method == "fedadapter":
            d, w = self.adapter_configs[c]
            return (b * houlsby_flops_per_sample(shape, d, w, T),
                    houlsby_memory_bytes(shape, precision=pl.precision, depth=d, width=w, batch=b, seq_len=T,
                                         act_bytes=self.act_bytes))
        return (b * flops_per_sample(shape, pl.ranks, T),
                memory_bytes(shape, precision=pl.precision, ranks=pl.ranks, batch=b, seq_len=T,
                             act_bytes=self.act_bytes))

    def observe(self, client: int, sensitivity: np.ndarray, singular: np.ndarray) -> None:
        """Fold a hosted server's round measurements into its importance state (Eqn 5-7)."""
        self.states[client].update(sensitivity, singular)


def initial_client_ranks(cfg: JobConfig, flops: list[float]) -> list[int]:
    """Each server's LoRA rank for the non-FedPipe methods. lora (and FedPipe's uniform ablation): lora.rank
    everywhere. flora, flexlora, hetlora: lora.client_ranks, or by compute: the largest of lora.ranks not
    above max(lora.ranks) x C_i / max_j C_j, at least the smallest (a tiering like those papers' setups)."""
    from ..config import HETERO_RANK_METHODS

    n = cfg.clients.n
    if cfg.method not in HETERO_RANK_METHODS:
        return [cfg.lora.rank] * n
    if cfg.lora.client_ranks is not None:
        return list(cfg.lora.client_ranks)
    cands, top = sorted(set(cfg.lora.ranks)), max(flops)
    return [max([r for r in cands if r <= cands[-1] * f / top + 1e-9], default=cands[0]) for f in flops]


def plan_table(cfg: JobConfig, log=print) -> tuple[str, list[ClientPlan], list[PlanInfo]]:
    """`fedpipe plan`: round 1's plan for every server from a meta-device model (no weights, no training)."""
    import torch

    from ..adapters.sites import KINDS, find_sites
    from ..algorithm.cost import adapter_params, model_shape
    from ..comm.local import LocalComm
    from ..models import meta_model
    from .heterogeneity import client_profiles, measure_tflops

    model = meta_model(cfg.model.name_or_path, log=log)
    sites = [s for s in find_sites(model) if s.kind in cfg.lora.targets]
    measured = [0.0] if cfg.clients.tflops is not None else [measure_tflops(torch.device("cpu"))]
    profiles = client_profiles(cfg, measured, owner=lambda c: 0)

    planner = RoundPlanner(cfg, model_shape(model, sites), sites, profiles, hosted=list(range(cfg.clients.n)))
    plans, infos, _ = planner.plan(LocalComm(), 1)
    L = n_layers(sites)
    head = ("| server | slowdown | TFLOP/s | memory GB | batch | precision | " + " | ".join(f"r_{k}" for k in KINDS)
            + " | adapter params | step s (pred) | memory GB (pred) | fits |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for prof, pl, info in zip(profiles, plans, infos):
        m = pl.rank_matrix(sites)
        cols = []
        for j in range(4):  # one rank per type when uniform across layers, else min-max and the layer count
            col = m[:, j]
            cols.append(str(col[0]) if (col == col[0]).all() else f"{col.min()}-{col.max()} ({(col > 0).sum()}/{L})")
        lines.append(f"| {pl.client} | {prof.slowdown:.2f} | {prof.tflops:.3g} | {prof.mem_budget_bytes / 2**30:.1f} | "
                     f"{pl.batch_size} | {pl.precision} | " + " | ".join(cols) + f" | "
                     f"{adapter_params(planner.shape, pl.ranks):,} | {info.predicted_step_s:.3g} | "
                     f"{info.predicted_mem_bytes / 2**30:.2f} | {'yes' if info.fits else 'NO'} |")
    return "\n".join(lines), plans, infos
