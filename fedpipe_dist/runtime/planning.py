"""Per-round planning inside a run: importance state per hosted server, score exchange, the planner call.

Every rank ends up with the same plans: the importance scores of all servers are all-gathered (an
[layer, 4] array each), and the planner is a pure function of scores, profiles and the job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np

from ..adapters.sites import Site, n_layers
from ..algorithm.cost import ModelShape, StepFit, fit_step_cost, flops_per_sample, nf_scale_bytes
from ..algorithm.importance import ImportanceState
from ..algorithm.planner import PRECISION_ORDER, ClientPlan, PlanInfo, ServerBudget, fedpipe_plan, uniform_plan
from ..config import JobConfig
from .heterogeneity import ServerProfile


class RoundPlanner:
    """`method` (methods/): whether plans adapt, what a uniform plan costs, which precisions it may take, and
    each server's starting rank; default: the one the job names."""

    def __init__(self, cfg: JobConfig, shape: ModelShape, sites: list[Site], profiles: list[ServerProfile],
                 hosted: list[int], method=None, log=None, on_gpu: bool = False):
        if method is None:
            from ..methods import make_method

            method = make_method(cfg)
        self.cfg = cfg
        self.method = method
        # the NF-k scales as this job stores them (quant.block_size, quant.double_quant)
        self.shape = replace(shape, nf_scale_bytes=nf_scale_bytes(cfg.quant.block_size, cfg.quant.double_quant))
        self.sites = sites
        self.L = n_layers(sites)
        self.servers = [ServerBudget(p.tflops * 1e12, p.mem_budget_bytes) for p in profiles]
        self.states = {c: ImportanceState(self.L, cfg.plan.lam1, cfg.plan.lam2) for c in hosted}
        self.act_bytes = 4 if cfg.model.dtype == "float32" else 2
        # precision=auto picks from these; a model loaded in 16 bits has no fp32 base to offer.
        self.native = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype]
        self.auto_options = PRECISION_ORDER if self.native == "fp32" else (self.native, "nf8", "nf4")
        self.pinned: list[str] | None = None  # each server's base precision, fixed after round 1
        self.client_ranks = method.initial_ranks([srv.flops_per_s for srv in self.servers])
        self.log = log or (lambda msg: None)
        # plan.step_cost=measured: this rank's servers' timed steps of the round not yet fitted, and the fits so far
        # (plan.step_fit=rounds: one per round whose steps could be fitted; round1: at most one, then closed)
        self.timed: dict[int, list] = {}
        # whether the steps are timed and fitted: only for a method whose plans use t0 (lora_hb's batch split takes
        # plan.step_overhead_s as given), with plan.step_cost=measured, or auto where every rank trains on a GPU
        self.measures = method.adaptive() and (cfg.plan.step_cost == "measured"
                                               or (cfg.plan.step_cost == "auto" and on_gpu))
        self.fits: list[StepFit] = []
        self.fits_closed = False

    def set_rank(self, client: int, rank: int) -> None:
        """A method changes a server's rank for the rounds to come (HetLoRA's self-pruning); the planner owns the
        ranks: the method's initial ones, the ones it plans, and these changes."""
        if rank < 0:
            raise ValueError(f"server {client}: a rank cannot be negative (got {rank})")
        self.client_ranks[client] = int(rank)

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
        if not self.method.adaptive():
            return (*self._uniform(), np.full((n, self.L, 4), np.nan))
        scores = self.scores(comm, round_idx)
        precision = self._precisions()
        plans, infos = fedpipe_plan(
            self.shape, self.servers, list(scores), targets=cfg.lora.targets, candidate_ranks=cfg.lora.ranks,
            ref_rank=cfg.lora.rank, b_min=cfg.train.batch_min, b_max=cfg.train.batch_max, seq_len=T,
            step_time_s=cfg.plan.step_time_s, granularity=cfg.plan.granularity, precision=precision,
            act_bytes=self.act_bytes, auto_options=self.auto_options, split=cfg.plan.split,
            rank_alloc=cfg.plan.rank_alloc, step_overhead_s=self.step_overhead_s(comm),
            local_steps=cfg.train.local_steps)
        return plans, infos, scores

    def step_overhead_s(self, comm) -> float:
        """t0 for this round's plan: plan.step_overhead_s, or (plan.step_cost=measured) from the fits of the steps
        timed so far, as soon as there are some (every rank fits the same gathered steps: identical plans)."""
        cfg = self.cfg
        if self.measures and not self.fits_closed:
            timed: dict[int, list] = {}
            for part in comm.all_gather_object(self.timed):
                timed.update(part)
            if any(timed.values()):
                self._fit(timed)
        o = self.overhead_samples
        if o is None:
            return cfg.plan.step_overhead_s
        # o samples' worth of the fastest server's compute, in the FLOPs the planner counts a sample at
        ref = {s.key: cfg.lora.rank for s in self.sites if s.kind in cfg.lora.targets}
        f_ref = flops_per_sample(self.shape, ref, cfg.model.max_length)
        return o * f_ref / max(srv.flops_per_s for srv in self.servers)

    @property
    def overhead_samples(self) -> float | None:
        """The fixed step cost planned with, in samples' worth: the median over the fits so far (None: no fit)."""
        return float(np.median([f.overhead_samples for f in self.fits])) if self.fits else None

    @property
    def estimator(self) -> str:
        """fit_step_cost's estimator for plan.step_fit: least squares for round1, Theil-Sen for rounds."""
        return "lstsq" if self.cfg.plan.step_fit == "round1" else "theil_sen"

    def _fit(self, timed: dict[int, list]) -> None:
        """Fit t0 + c x tokens to every server's timed steps of a round, each scaled to the fastest server's speed
        (a server of half the speed is charged half its seconds), leaving out each server's first step (warm-up).
        plan.step_fit=rounds: Theil-Sen on every round's steps, planned with the median over the rounds, so one
        round slowed by other jobs on the machine does not decide the rest of the run; round1: least squares on
        round 1's steps only (how plan.step_cost=measured worked until 2026-12-03)."""
        once = self.cfg.plan.step_fit == "round1"
        top = max(srv.flops_per_s for srv in self.servers)
        pooled = [(b, tok, sec * self.servers[c].flops_per_s / top)
                  for c in sorted(timed) for b, tok, sec in timed[c][1:]]
        fit = fit_step_cost(pooled, estimator=self.estimator)
        self.timed = {}
        self.fits_closed = once
        first = not self.fits
        if fit is not None:
            self.fits.append(fit)
        if fit is None and once:
            self.log(f"plan.step_cost=measured: the {len(pooled)} timed steps cannot separate a step's fixed cost "
                     f"(too few, or all of one length); planning with plan.step_overhead_s="
                     f"{self.cfg.plan.step_overhead_s}")
        elif fit is not None and first:
            self.log(f"plan.step_cost=measured: a step costs {fit.t0_s * 1e3:.3g} ms + {fit.per_token_s * 1e6:.3g} us "
                     f"per padded token on the fastest server (fitted to {fit.steps} steps); its fixed cost is "
                     f"{fit.overhead_samples:.2f} samples' worth, planned with from now on"
                     + ("" if once else " (refitted every round: the median of the rounds' fits)"))

    def step_fit_record(self) -> dict | None:
        """What results.h5 keeps of the fits (step_fit_json): the median t0, slope and overhead planned with, and
        each fit (None: none made)."""
        if not self.fits:
            return None
        med = {k: float(np.median([getattr(f, k) for f in self.fits])) for k in ("t0_s", "per_token_s",
                                                                              "tokens_per_sample")}
        return {**med, "overhead_samples": self.overhead_samples, "steps": sum(f.steps for f in self.fits),
                "estimator": self.estimator,
                "fits": [{**dataclasses.asdict(f), "overhead_samples": f.overhead_samples} for f in self.fits]}

    def _uniform(self) -> tuple[list[ClientPlan], list[PlanInfo]]:
        """The plan of a method that does not adapt (and of FedPipe's uniform ablation): the method's batch sizes
        (batch_max; lora_hb: in proportion to compute), every
        target at the server's rank (client_ranks; none for a method without LoRA), and the precision the job
        names; auto: the most bits whose memory fits, among the method's options (QLoRA-style bases for the
        baselines too; ft has fp32 only, so a server it does not fit under-trains)."""
        cfg, n = self.cfg, self.cfg.clients.n
        prec = self._precisions()
        prec = prec if isinstance(prec, list) else [prec] * n
        plans = uniform_plan(self.sites, n, targets=cfg.lora.targets, rank=cfg.lora.rank,
                             batch_size=cfg.train.batch_max, local_steps=cfg.train.local_steps)
        options = self.method.precision_options or self.auto_options
        batches = self.method.batch_sizes([srv.flops_per_s for srv in self.servers], self.shape, cfg.model.max_length)
        infos = []
        for c, (pl, p, r, srv) in enumerate(zip(plans, prec, self.client_ranks, self.servers)):
            pl.batch_size = batches[c]
            pl.ranks = {k: r for k in pl.ranks} if self.method.trains_lora else {}
            for option in (options if p == "auto" else (p,)):
                pl.precision = option
                step, mem = self.method.step_cost(c, pl, self.shape, cfg.model.max_length, self.act_bytes)
                if mem <= srv.mem_bytes:
                    break
            infos.append(PlanInfo(math.inf, step, step / srv.flops_per_s, mem, mem <= srv.mem_bytes))
        return plans, infos

    def observe(self, client: int, sensitivity: np.ndarray, singular: np.ndarray, step_times=()) -> None:
        """Fold a hosted server's round measurements into its importance state (Eqn 5-7); keep its timed steps
        until plan.step_cost=measured has fitted them."""
        self.states[client].update(sensitivity, singular)
        if self.measures and not self.fits_closed:
            self.timed[client] = list(step_times)


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
    profiles = client_profiles(cfg.clients, cfg.seed, measured, owner=lambda c: 0)

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
