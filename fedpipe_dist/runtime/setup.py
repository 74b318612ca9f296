"""Set-up of a run on one rank: model, adapter sites, this rank's data shards, the eval slice, profiles, the
method, the planner and the bases, gathered in one `Run` that the round engine and the method read.

    run = set_up(cfg, comm, log, point)      # point: the checkpoint a resumed run continues from (or None)
    run.evaluate()                           # eval loss of the current global model (every rank calls it)

Server c lives on rank c % world_size; its data never leaves it. The eval set is public held-out data:
every rank scores a strided slice of it and the sums are all-gathered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapters.sites import Site, find_sites, n_layers
from ..algorithm.cost import model_shape
from ..comm.base import Communicator
from ..config import JobConfig, per_client_values
from ..data import format_example, load_eval_pairs, load_train_pairs, partition, partition_key, tokenize_pairs
from ..methods import Method, make_method
from ..metrics.generate import generation_pairs
from ..metrics.perplexity import evaluate, reweighted_losses, scored_share, summarize
from ..models import check_max_length, load_model, load_tokenizer
from .bases import RankBases, lowest_precision
from .heterogeneity import ServerProfile, client_profiles, device_memory_bytes, measure_tflops
from .planning import RoundPlanner
from .provenance import provenance
from .record import Laps
from .resume import saved_profiles


@dataclass
class KeyMix:
    """The partition keys of the training set (names) and each server's share of each ([n, keys])."""

    names: list[str]
    mix: np.ndarray


@dataclass
class Run:
    """What every phase of a run reads: the job, this rank's part of the federation, and the shared state."""

    cfg: JobConfig
    comm: Communicator
    log: object  # runtime/record.Log
    tok: object
    model: object
    sites: list[Site]
    shards: dict  # hosted server -> its TokenizedSet
    shard_sizes: list[int]  # |D_i| of every server (known to every rank)
    eval_slice: object  # this rank's strided share of the eval set
    eval_subset: object  # (k) -> this rank's share of the first k eval examples (run's eval order), tokenized
    eval_full: object = None  # () -> this rank's share of the whole eval set (None: eval_slice is all of it)
    profiles: list[ServerProfile] = field(default_factory=list)
    method: Method | None = None
    planner: RoundPlanner | None = None
    bases: RankBases | None = None
    precisions: list[str] = field(default_factory=list)  # each server's base precision, fixed for the run
    eval_precision: str = "fp32"
    view_bytes: dict[str, int] = field(default_factory=dict)  # measured bytes of each base precision in use
    gen_mrs: list = field(default_factory=list)  # E2E generation at the end: distinct MRs ...
    gen_refs: list = field(default_factory=list)  # ... and all references of each
    setup_phases: dict = field(default_factory=dict)  # seconds per set-up phase on this rank (set_up)
    provenance: dict = field(default_factory=dict)  # where this attempt came from (runtime/provenance.py)
    dropped_rows: dict = field(default_factory=dict)  # {"train"/"eval": rows left out for an empty mr or ref}
    keys: KeyMix | None = None  # every server's mix of partition keys
    own_eval: dict = field(default_factory=dict)  # hosted server -> its held-out own examples (data.own_eval_samples)
    eval_groups: np.ndarray | None = None  # per example of eval_slice: its key's column in keys.mix (-1: none)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    @property
    def rank0(self) -> bool:
        return self.comm.rank == 0

    @property
    def site_by_key(self) -> dict[str, Site]:
        return {s.key: s for s in self.sites}

    @property
    def L(self) -> int:
        return n_layers(self.sites)

    def owner(self, c: int) -> int:
        return c % self.comm.world_size

    @property
    def my_clients(self) -> list[int]:
        return [c for c in range(self.cfg.clients.n) if self.owner(c) == self.comm.rank]

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    def evaluate(self, state=None, data=None) -> dict:
        """Eval loss of the global model at eval precision, with the method's kept global adapter (or `state`)
        attached, on the eval set (or `data`, this rank's share of other examples). Every rank calls it.
        On the eval set, also "own": per server, the loss on its own mix of partition keys (reweighted_losses;
        NaN where none of its keys is in the eval sample), "own_coverage": the share of its data whose keys
        the eval sample holds, and with data.own_eval_samples "heldout": per server, the loss on its held-out
        own examples (each scored on the rank hosting it: they never leave it; only the loss travels)."""
        self.bases.use(self.eval_precision)
        groups = self.eval_groups if data is None and self.keys is not None else None
        with self.method.attach(state):
            part = evaluate(self.model, self.eval_slice if data is None else data, batch_size=self.cfg.eval.batch_size,
                            pad_id=self.pad_id, device=self.comm.device, groups=groups,
                            n_groups=len(self.keys.names) if groups is not None else 0)
            held = {c: evaluate(self.model, s, batch_size=self.cfg.eval.batch_size, pad_id=self.pad_id,
                                device=self.comm.device)["loss"]
                    for c, s in self.own_eval.items()} if data is None else {}
        parts = self.comm.all_gather_object((part["moments"], part.get("group_sums"), held))
        out = summarize(*(sum(p[0][i] for p in parts) for i in range(len(parts[0][0]))))
        if groups is not None:
            sums = sum(p[1] for p in parts)
            out["own"], out["own_coverage"] = reweighted_losses(sums, self.keys.mix), scored_share(sums, self.keys.mix)
        if any(p[2] for p in parts):
            out["heldout"] = np.full(self.cfg.clients.n, np.nan)
            for p in parts:
                for c, loss in p[2].items():
                    out["heldout"][c] = loss
        return out


def set_up(cfg: JobConfig, comm: Communicator, log, point=None) -> Run:
    """Everything a round needs, on this rank; `point` (a resumed run) gives the profiles measured at the start."""
    lap = Laps()  # seconds per set-up phase on this rank (results.h5 setup_phases_json on rank 0)
    prov = provenance(comm)  # first: the load average before this job's own work
    tok, model, sites = _load_model(cfg, comm)
    lap("model")
    dropped: dict = {}
    shards, shard_sizes, keys, own_eval = _load_shards(cfg, comm, tok, dropped)
    lap("train_data")
    eval_slice, eval_subset, eval_full, eval_groups = _load_eval(cfg, comm, tok, dropped, keys)
    lap("eval_data")
    run = Run(cfg=cfg, comm=comm, log=log, tok=tok, model=model, sites=sites, shards=shards,
              shard_sizes=shard_sizes, eval_slice=eval_slice, eval_subset=eval_subset, eval_full=eval_full,
              dropped_rows=dropped, keys=keys, eval_groups=eval_groups, provenance=prov, own_eval=own_eval)
    for part, n in dropped.items():
        if n and comm.rank == 0:
            log(f"data: left out {n} row(s) of data.{part}_path with an empty mr or ref (results.h5: "
                f"dropped_rows_{part})")
    run.gen_mrs, run.gen_refs = _load_generation(cfg)
    lap("generation_data")
    # A resumed run plans with the profiles measured when it started, so its plans are the ones it would have made.
    run.profiles = saved_profiles(point.state) if point else _profile(cfg, comm, run.owner)
    lap("profile")
    run.method = make_method(cfg)
    on_gpu = all(kind == "cuda" for kind in comm.all_gather_object(comm.device.type))  # plan.step_cost=auto
    run.planner = RoundPlanner(cfg, model_shape(model, sites), sites, run.profiles, hosted=run.my_clients,
                               method=run.method, log=log, on_gpu=on_gpu)
    if cfg.plan.step_cost == "auto" and run.planner.measures and comm.rank == 0:
        log("plan.step_cost=auto: every rank trains on a GPU, so the planner times the steps and fits their "
            "fixed cost (plan.step_cost=given plans with plan.step_overhead_s instead)")
    most = max(Counter(run.owner(c) for c in range(cfg.clients.n)).values())
    if on_gpu and most > 1:  # runtime/client.allocator_cap
        log(f"up to {most} servers share a rank's process: clients.memory_gb is planned for by the memory model, not "
            "enforced by CUDA's per-process allocation cap (one server's budget would cap them all); run one server "
            "per rank to enforce it")
    _build_bases(run)
    lap("bases")
    run.method.setup(run)
    lap("method")
    run.setup_phases = lap.seconds
    return run


def _load_model(cfg: JobConfig, comm: Communicator):
    tok = load_tokenizer(cfg.model.name_or_path)
    # Kept on the CPU until the bases are built: a quantized server never holds the full-width model on
    # its device (each block weight is moved there, quantized, and only its codes stay).
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, dtype=cfg.model.dtype, tokenizer=tok)
    model.eval()
    check_max_length(cfg.model.max_length, model.config, cfg.model.name_or_path)
    sites = [s for s in find_sites(model) if s.kind in cfg.lora.targets]
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    checks = comm.all_gather_object(checksum)
    if any(abs(c - checks[0]) > 1e-6 * max(1.0, abs(checks[0])) for c in checks):
        raise RuntimeError(f"ranks loaded different base models (parameter checksums {checks}); every rank "
                           "must see the same model.name_or_path and seed")
    return tok, model, sites


def _load_shards(cfg: JobConfig, comm: Communicator, tok, dropped: dict):
    """The training set split over the servers; this rank tokenizes only the shards of the servers it hosts.
    Also every server's mix of partition keys ([n, keys]: the share of its shard holding each key; known to every
    rank, like the shard sizes) and the keys, and the hosted servers' held-out own examples (data.own_eval_samples:
    taken out of the shard before anything trains; shard sizes and key mixes are of what trains).
    `dropped["train"]`: the rows the file reader left out."""
    n = cfg.clients.n
    pairs = load_train_pairs(cfg.data, cfg.seed)
    dropped["train"] = getattr(pairs, "dropped", 0)
    if cfg.data.max_train_samples is not None:
        keep = np.random.default_rng([cfg.seed, 7]).permutation(len(pairs))[: cfg.data.max_train_samples]
        pairs = [pairs[i] for i in sorted(keep)]
    keys = [partition_key(src) for src, _ in pairs]
    shard_idx = partition(keys, n, scheme=cfg.data.partition, alpha=cfg.data.dirichlet_alpha, seed=cfg.seed,
                          speeds=_declared_speeds(cfg) if cfg.data.rare_to_slow else None)
    shard_idx, held_idx = _hold_out(shard_idx, cfg.data.own_eval_samples, cfg.seed)
    mine = [c for c in range(n) if c % comm.world_size == comm.rank]
    shards = {c: tokenize_pairs(tok, [format_example(*pairs[i]) for i in shard_idx[c]], cfg.model.max_length)
              for c in mine}
    own_eval = {c: tokenize_pairs(tok, [format_example(*pairs[i]) for i in held_idx[c]], cfg.model.max_length)
                for c in mine if len(held_idx[c])}
    names = sorted(set(keys))
    column = {k: j for j, k in enumerate(names)}
    mix = np.zeros((n, len(names)))
    for c, ix in enumerate(shard_idx):
        np.add.at(mix[c], [column[keys[i]] for i in ix], 1.0 / len(ix))
    return shards, [len(ix) for ix in shard_idx], KeyMix(names, mix), own_eval


def _hold_out(shard_idx: list, k: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each shard split into what trains and min(k, a quarter of the shard) held-out examples, by a seeded draw
    per server (the same on every rank); each part keeps the shard's order."""
    train, held = [], []
    for c, ix in enumerate(shard_idx):
        ix = np.asarray(ix)
        perm = np.random.default_rng([seed, 0x0E7A1, c]).permutation(len(ix))
        take = min(k, len(ix) // 4)
        held.append(ix[np.sort(perm[:take])])
        train.append(ix[np.sort(perm[take:])])
    return train, held


def _declared_speeds(cfg: JobConfig) -> list[float]:
    """Each server's speed as the job declares it (clients.tflops, or 1, over clients.slowdown): what
    data.rare_to_slow deals by, known before any measurement and the same on every rank."""
    n = cfg.clients.n
    slow = per_client_values(cfg.clients.slowdown, n, "clients.slowdown", seed=cfg.seed)
    base = per_client_values(cfg.clients.tflops, n, "clients.tflops", seed=cfg.seed) \
        if cfg.clients.tflops is not None else [1.0] * n
    return [b / s for b, s in zip(base, slow)]


def _load_eval(cfg: JobConfig, comm: Communicator, tok, dropped: dict, keys: "KeyMix"):
    """This rank's strided slice of the eval set, a tokenizer of its share of the first k examples, the whole
    set's share (eval.final_full), and the slice's partition keys as columns of `keys` (-1: a key no server holds)."""
    ev = load_eval_pairs(cfg.data, cfg.seed)
    dropped["eval"] = getattr(ev, "dropped", 0)
    everything = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))
    order = everything if cfg.eval.max_samples is None else everything[: cfg.eval.max_samples]

    def share(indices):
        return tokenize_pairs(tok, [format_example(*ev[i]) for i in indices[comm.rank::comm.world_size]],
                              cfg.model.max_length)

    column = {k: j for j, k in enumerate(keys.names)}
    groups = np.array([column.get(partition_key(ev[i][0]), -1) for i in order[comm.rank::comm.world_size]],
                      dtype=np.int64)
    # the whole eval set, tokenized only when asked for (eval.final_full, at the end): None when the sample is it
    full = None if len(order) == len(everything) else (lambda: share(everything))
    return share(order), lambda k: share(order[:k]), full, groups


def _load_generation(cfg: JobConfig):
    """E2E generation at the end: read now, so that a bad path fails before any training."""
    if not cfg.generation.enabled:
        return [], []
    from ..metrics.e2e import group_references
    from ..metrics.generate import check_scoring_tools

    check_scoring_tools()
    mrs, refs = group_references(generation_pairs(cfg.generation.data_path, cfg.data, cfg.seed))
    if cfg.generation.max_mrs is not None:
        mrs, refs = mrs[: cfg.generation.max_mrs], refs[: cfg.generation.max_mrs]
    return mrs, refs


def _profile(cfg: JobConfig, comm: Communicator, owner) -> list[ServerProfile]:
    """Measured compute per rank, heterogeneity per server. One rank at a time, so that ranks sharing a
    machine do not slow each other's measurement down."""
    mine = None
    for r in range(comm.world_size):
        if r == comm.rank:
            mine = (measure_tflops(comm.device), device_memory_bytes(comm.device))
        comm.barrier()
    measured = comm.all_gather_object(mine)
    return client_profiles(cfg.clients, cfg.seed, [m[0] for m in measured], owner, device_mem=[m[1] for m in measured])


def _build_bases(run: Run) -> None:
    """Every server's precision is fixed for the run; this rank keeps one view per precision it needs."""
    cfg = run.cfg
    run.precisions = run.planner.pin_precisions(run.comm)
    run.eval_precision = lowest_precision(run.precisions) if cfg.eval.precision == "auto" else cfg.eval.precision
    needed = {run.precisions[c] for c in run.my_clients} | {run.eval_precision}
    run.bases = RankBases(run.model, run.sites, needed, device=run.comm.device, block_size=cfg.quant.block_size,
                          double_quant=cfg.quant.double_quant, backend=cfg.quant.backend)
    run.model.to(run.comm.device)
    for part in run.comm.all_gather_object({p: run.bases.base_bytes(p) for p in run.bases.views}):
        run.view_bytes.update(part)
