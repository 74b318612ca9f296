"""The round engine: one process per rank, each hosting one or more edge servers; rank 0 is also central.

    torchrun --standalone --nproc_per_node=4 -m fedpipe_dist run jobs/quickstart.yaml
    python -m fedpipe_dist run jobs/quickstart.yaml          # world size 1: one process plays every server

Per round: sample servers -> plan -> local training of fresh adapters -> exchange (factored stacking or
dense weighted reduce at rank 0) -> every rank merges the same update into its base -> rank 0 evaluates
and appends the round to results.h5. Client c lives on rank c % world_size; its data never leaves it.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters.houlsby import HoulsbyAdapters, find_adapter_points, init_state, save_adapter_state
from ..adapters.lora import FixedUpdates
from ..adapters.sites import Site, find_sites, n_layers
from ..algorithm.aggregation import ClientUpdate, dense_sum, get_aggregator
from ..algorithm.aggregation.base import to_dense
from ..algorithm.aggregation.fedadapter import AdapterConfig, pick_config, trial_configs, trial_groups
from ..algorithm.aggregation.hetlora import pruned_rank
from ..algorithm.cost import houlsby_flops_per_sample, model_shape
from ..algorithm.planner import ClientPlan, sample_clients
from ..algorithm.sanitize import screen, update_norm
from ..comm.base import Communicator, nbytes
from ..comm.payload import (
    dense_layout,
    downlink_is_dense,
    factor_layout,
    layout_numel,
    pack,
    pack_dense,
    stacked_layout,
    unpack,
    unpack_dense,
)
from ..config import ADAPTER_FREE_METHODS, ConfigError, JobConfig, UserInputError
from ..data import format_example, load_eval_pairs, load_train_pairs, partition, partition_key, tokenize_pairs
from ..io.checkpoint import CheckpointDir
from ..io.hdf5 import ResultsWriter
from ..io.schema import PRECISION_BITS
from ..metrics.generate import generate, generation_pairs, write_generations
from ..metrics.perplexity import evaluate, summarize
from ..models import load_model, load_tokenizer
from .bases import RankBases, lowest_precision
from .client import (
    ClientStats,
    model_parameters,
    peak_mem,
    reset_peak_mem,
    train_client,
    train_full,
    train_houlsby,
)
from .heterogeneity import client_profiles, device_memory_bytes, measure_tflops
from .planning import RoundPlanner
from .resume import (
    apply_state,
    find_resume_point,
    new_run_id,
    raise_on_all_ranks,
    rank_state,
    restarted_by_torchrun,
    saved_profiles,
)


class Log:
    """The single rank-0 sink for human-readable progress (a tqdm bar plus lines printed above it)."""

    def __init__(self, enabled: bool, show_bar: bool = True):
        self.enabled = enabled
        self.show_bar = show_bar
        self.bar = None

    def open_bar(self, total: int, done: int = 0) -> None:
        if self.enabled and self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr,
                            dynamic_ncols=True)

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _agree(comm: Communicator, fn):
    """Run fn on rank 0; if it raises a user error, every rank raises it too (so no rank waits forever)."""
    err, result = None, None
    if comm.rank == 0:
        try:
            result = fn()
        except (ConfigError, UserInputError) as e:
            err = str(e)
    err = comm.broadcast_object(err)
    if err is not None:
        raise UserInputError(err)
    return result


def _check_output_dir(out: Path, overwrite: bool) -> None:
    results = out / "results.h5"
    if results.exists() and not overwrite:
        raise UserInputError(f"output.dir: {str(out)!r} already holds results.h5 from an earlier run; choose a new "
                             "output.dir, or set output.overwrite=true to replace it")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output.dir: {str(out)!r} exists and is not a folder; choose another output.dir")


def _base_checksum(model) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


@dataclass
class RunSummary:
    results_path: Path
    final_dir: Path | None
    eval_loss: list[float]


def run_job(cfg: JobConfig, comm: Communicator, *, show_progress: bool = True) -> RunSummary | None:
    """Run the whole job on this rank. Returns the summary on rank 0, None elsewhere."""
    rank0 = comm.rank == 0
    device = comm.device
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress display per job: ours, on rank 0
    out_dir = Path(cfg.output.dir)
    n = cfg.clients.n
    log = Log(rank0, show_bar=show_progress)
    # ---- a fresh run, or the continuation of one (resume=true, or restarted by torchrun --max-restarts) ----
    ckpt = CheckpointDir(out_dir, comm.rank)
    resuming = cfg.resume or restarted_by_torchrun()
    point = find_resume_point(cfg, comm, out_dir, ckpt, log) if resuming else None
    if not resuming:
        _agree(comm, lambda: _check_output_dir(out_dir, cfg.output.overwrite))
    if point is None:  # leftovers of an earlier run here (overwrite, or an attempt that died in round 1) go
        ckpt.clear()
    run_id = point.state["run_id"] if point else new_run_id(comm)
    start = point.round if point else 0
    # ---- model, adapter sites, data (each rank keeps only its own servers' shards) --------------------
    tok = load_tokenizer(cfg.model.name_or_path)
    # Kept on the CPU until the bases are built: a quantized server never holds the full-width model on
    # its device (each block weight is moved there, quantized, and only its codes stay).
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, dtype=cfg.model.dtype, tokenizer=tok)
    model.eval()
    sites = [s for s in find_sites(model) if s.kind in cfg.lora.targets]
    site_by_key = {s.key: s for s in sites}
    checks = comm.all_gather_object(_base_checksum(model))
    if any(abs(c - checks[0]) > 1e-6 * max(1.0, abs(checks[0])) for c in checks):
        raise RuntimeError(f"ranks loaded different base models (parameter checksums {checks}); every rank "
                           "must see the same model.name_or_path and seed")

    def owner(c: int) -> int:
        return c % comm.world_size

    pairs = load_train_pairs(cfg)
    if cfg.data.max_train_samples is not None:
        keep = np.random.default_rng([cfg.seed, 7]).permutation(len(pairs))[: cfg.data.max_train_samples]
        pairs = [pairs[i] for i in sorted(keep)]
    shard_idx = partition([partition_key(src) for src, _ in pairs], n, scheme=cfg.data.partition,
                          alpha=cfg.data.dirichlet_alpha, seed=cfg.seed)
    shard_sizes = [len(ix) for ix in shard_idx]
    my_clients = [c for c in range(n) if owner(c) == comm.rank]
    shards = {c: tokenize_pairs(tok, [format_example(*pairs[i]) for i in shard_idx[c]], cfg.model.max_length)
              for c in my_clients}
    del pairs
    pad_id = tok.pad_token_id

    # The eval set is public held-out data: every rank scores a strided slice, and the sums are added up.
    ev = load_eval_pairs(cfg)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))
    if cfg.eval.max_samples is not None:
        order = order[: cfg.eval.max_samples]
    eval_slice = tokenize_pairs(tok, [format_example(*ev[i]) for i in order[comm.rank::comm.world_size]],
                                cfg.model.max_length)
    trial_slice = None  # fedadapter: the examples trial configurations are scored on
    if cfg.method == "fedadapter" and cfg.fedadapter.period > 0:
        trial = order[: cfg.fedadapter.trial_eval_samples]
        trial_slice = tokenize_pairs(tok, [format_example(*ev[i]) for i in trial[comm.rank::comm.world_size]],
                                     cfg.model.max_length)
    del ev
    gen_mrs, gen_refs = [], []  # E2E generation at the end: distinct MRs and all references of each
    if cfg.generation.enabled:  # read now, so that a bad path fails before any training
        from ..metrics.e2e import group_references
        from ..metrics.generate import check_scoring_tools

        check_scoring_tools()
        gen_mrs, gen_refs = group_references(generation_pairs(cfg))
        if cfg.generation.max_mrs is not None:
            gen_mrs, gen_refs = gen_mrs[: cfg.generation.max_mrs], gen_refs[: cfg.generation.max_mrs]

    def run_eval(adapter_state=None, data=None) -> dict:
        """Eval loss of the model with the method's kept global adapter (or `adapter_state`) attached."""
        bases.use(eval_precision)
        state = global_state if adapter_state is None else adapter_state
        if cfg.method == "fedadapter":
            hooks = HoulsbyAdapters(points, state, device=device, trainable=False)
        else:
            hooks = FixedUpdates(sites, state)  # a kept LoRA-family global adapter: W0 + dW_g
        with hooks.attach(model):
            part = evaluate(model, eval_slice if data is None else data, batch_size=cfg.eval.batch_size,
                            pad_id=pad_id, device=device)
        parts = comm.all_gather_object((part["loss_sum"], part["tokens"]))
        return summarize(sum(p[0] for p in parts), sum(p[1] for p in parts))

    # ---- profiles: measured compute per rank, heterogeneity per server ----------------------------------
    # One rank at a time, so that ranks sharing a machine do not slow each other's measurement down.
    # A resumed run plans with the profiles measured when it started, so its plans are the ones it would have made.
    if point:
        profiles = saved_profiles(point.state)
    else:
        mine = None
        for r in range(comm.world_size):
            if r == comm.rank:
                mine = (measure_tflops(device), device_memory_bytes(device))
            comm.barrier()
        measured = comm.all_gather_object(mine)
        profiles = client_profiles(cfg, [m[0] for m in measured], owner, device_mem=[m[1] for m in measured])
    planner = RoundPlanner(cfg, model_shape(model, sites), sites, profiles, hosted=my_clients)

    # ---- bases: every server's precision is fixed for the run; one view per precision this rank needs -----
    precisions = planner.pin_precisions(comm)
    eval_precision = lowest_precision(precisions) if cfg.eval.precision == "auto" else cfg.eval.precision
    needed = {precisions[c] for c in my_clients} | {eval_precision}
    bases = RankBases(model, sites, needed, device=device, block_size=cfg.quant.block_size,
                      double_quant=cfg.quant.double_quant, backend=cfg.quant.backend)
    model.to(device)
    view_bytes: dict[str, int] = {}
    for part in comm.all_gather_object({p: bases.base_bytes(p) for p in bases.views}):
        view_bytes.update(part)

    # ---- the method: how updates are combined, and what clients start from ---------------------------------
    aggregator = get_aggregator(cfg.method, cfg)
    # The global adapter of lora / flexlora / hetlora (LoRA factors or dense dW) or fedadapter (Houlsby
    # adapters), identical on every rank; merging methods (fedpipe, flora, ft) keep none.
    global_state: dict = {}
    prune_norms: dict[int, float] = {}  # hetlora: each server's pruned-part norm in its last round
    L = n_layers(sites)
    points, adapter_config = [], None
    if cfg.method == "fedadapter":  # one common starting adapter, drawn alike on every rank
        points = find_adapter_points(model)
        adapter_config = AdapterConfig(min(cfg.fedadapter.depth, L), cfg.fedadapter.width)
        global_state = init_state(points, L, adapter_config.depth, adapter_config.width,
                                  _generator(cfg.seed, 0, 0xFADA))

    # ---- resumed: the checkpoint's state; results.h5 back as it was after that round ---------------------------
    ft_params = model_parameters(model) if cfg.method == "ft" else None
    writer = None
    if point:
        err = None
        try:
            global_state, saved_config, eval_losses = apply_state(point.state, device=device, bases=bases,
                                                                  parameters=ft_params, planner=planner,
                                                                  prune_norms=prune_norms)
            adapter_config = AdapterConfig(*saved_config) if saved_config else adapter_config
        except UserInputError as e:
            err = str(e)
        raise_on_all_ranks(comm, err)
        del point.state
        if rank0:
            ckpt.restore_results(start, out_dir / "results.h5")
            writer = ResultsWriter.reopen(out_dir / "results.h5", n_clients=n, n_layers=L, resumed_from=start)
            log(f"fedpipe: resuming {cfg.method} in {out_dir} after round {start} of {cfg.rounds} (eval loss "
                f"{eval_losses[-1]:.4f}); results.h5 continues from there")
    else:  # ---- a fresh run: results file (rank 0) and the untrained base as row 0 -------------------------
        ev0 = run_eval()  # the untrained base, on every rank (the eval is shared)
        eval_losses = [ev0["loss"]]
        if rank0:
            if out_dir.exists():  # whatever is left is replaceable: overwrite=true, or an attempt that died in round 1
                (out_dir / "results.h5").unlink(missing_ok=True)
                shutil.rmtree(out_dir / "final", ignore_errors=True)
            writer = ResultsWriter(out_dir / "results.h5", n_clients=n, n_layers=L, attrs={
                "method": cfg.method, "model": cfg.model.name_or_path, "dataset": cfg.data.name,
                "world_size": comm.world_size, "n_clients": n, "config_json": cfg.to_json(),
                "eval_precision": eval_precision, "base_params": bases.base_params, "run_id": run_id})
            writer.write_profile({"tflops": [p.tflops for p in profiles],
                                  "mem_budget_bytes": [p.mem_budget_bytes for p in profiles],
                                  "slowdown": [p.slowdown for p in profiles],
                                  "base_weight_bytes": [view_bytes[p] for p in precisions]})
            writer.append_round(_round_row(0, eval=ev0, n_selected=0), {})
            log(f"fedpipe: {cfg.method} on {cfg.model.name_or_path} ({len(sites)} adapter sites), {n} servers on "
                f"{comm.world_size} rank(s), {cfg.rounds} rounds -> {out_dir / 'results.h5'}")
            counts = {p: precisions.count(p) for p in dict.fromkeys(precisions)}
            log("bases: " + ", ".join(f"{k} x {p} ({view_bytes[p] / 2**20:.1f} MiB)" for p, k in counts.items())
                + f"; evaluated and exported at {eval_precision}")
            log(f"round 0 (base model at {eval_precision}): eval loss {ev0['loss']:.4f}, ppl {ev0['ppl']:.2f}")
    log.open_bar(cfg.rounds, done=start)

    # ---- rounds -------------------------------------------------------------------------------------------
    for t in range(start + 1, cfg.rounds + 1):
        t_round = time.perf_counter()
        selected = sample_clients(n, cfg.clients.fraction, seed=cfg.seed, round_idx=t)
        configs, group_of, starts = [], {}, []
        if cfg.method == "fedadapter":  # which adapter configuration each server trains this round
            configs, group_of, starts = _fedadapter_round(cfg, points, L, adapter_config, global_state,
                                                          selected, t)
            planner.adapter_configs = [(configs[group_of[c]].depth, configs[group_of[c]].width)
                                       if c in group_of else (adapter_config.depth, adapter_config.width)
                                       for c in range(n)]
        plans, infos, scores = planner.plan(comm, t)
        # A plan that does not fit the server's memory (or FLOPs) budget is not run: under-training.
        runnable = [c for c in selected if infos[c].fits]
        updates: dict[int, ClientUpdate] = {}
        stats: dict[int, ClientStats] = {}
        for c in runnable:
            if owner(c) == comm.rank:
                bases.use(plans[c].precision)
                common = dict(round_idx=t, pad_id=pad_id, device=device, slowdown=profiles[c].slowdown,
                              deadline_s=cfg.train.deadline_s, mem_budget_bytes=profiles[c].mem_budget_bytes)
                if cfg.method == "ft":
                    updates[c], stats[c] = train_full(model, plans[c], shards[c], cfg, **common)
                    continue
                if cfg.method == "fedadapter":
                    updates[c], stats[c] = train_houlsby(model, points, starts[group_of[c]], plans[c], shards[c],
                                                         cfg, **common)
                    continue
                start = None
                if aggregator.keeps_global_adapter:
                    start = {k: f for k, r in plans[c].ranks.items() if r > 0
                             for f in [aggregator.client_start(global_state, k, r)] if f is not None}
                prune = (cfg.hetlora.gamma, cfg.hetlora.reg) if cfg.method == "hetlora" else None
                updates[c], stats[c] = train_client(model, sites, plans[c], shards[c], cfg, start=start,
                                                    prune=prune, **common)
                planner.observe(c, stats[c].sensitivity, stats[c].singular)
        for c in updates:  # each server reports its update's norm (rank 0 re-checks what it receives)
            _inject_faults(cfg, c, updates[c])
            stats[c].update_norm = update_norm(updates[c].factors, starts[group_of[c]] if configs else None)
            if c in cfg.faults.misreport_clients:
                stats[c].update_norm /= cfg.faults.scale
        done: dict[int, tuple[bool, float, float]] = {}
        for part in comm.all_gather_object({c: (st.completed, st.prune_norm, st.update_norm)
                                            for c, st in stats.items()}):
            done.update(part)
        contributors = [c for c in runnable if done[c][0]]
        rejected: dict[int, str] = {}  # server -> why its update was left out
        if cfg.aggregation.sanitize and contributors:  # the same verdicts on every rank, from the reports
            verdicts = screen([done[c][2] for c in contributors], max_ratio=cfg.aggregation.max_norm_ratio)
            rejected = {c: v for c, v in zip(contributors, verdicts) if v != "ok"}
            contributors = [c for c in contributors if c not in rejected]
            for c, why in rejected.items():
                log(f"round {t}: server {c}'s update left out ({why}: norm {done[c][2]:.4g})")
        deltas: dict = {}
        agg_mem_reset = reset_peak_mem(device) if rank0 else False  # rank 0's peak from here to the merge
        if contributors and cfg.method in ADAPTER_FREE_METHODS:
            # FedAvg of whole tensors (every parameter, or every adapter) per group of servers training one
            # configuration (ft and a non-trial fedadapter round: one group).
            groups = [[c for c in contributors if group_of[c] == g] for g in range(len(configs))] \
                if configs else [contributors]
            layouts = [_tensor_layout(starts[g]) for g in range(len(configs))] if configs else \
                [_tensor_layout({k: p for k, p in model_parameters(model).items()})]
            results, traffic = _exchange_fedavg(comm, groups, layouts, updates, owner, aggregator, plans,
                                                shard_sizes)
            if cfg.method == "ft":
                _add_to_parameters(model, results[0])
            else:
                global_state, adapter_config = _fedadapter_choose(
                    cfg, configs, results, global_state, adapter_config, run_eval, trial_slice, planner.shape,
                    log, t)
        elif contributors:
            if cfg.aggregation.transport == "factored":
                claims = {c: done[c][2] for c in contributors} if cfg.aggregation.sanitize else None
                result, traffic = _exchange_factored(comm, sites, plans, contributors, updates, owner, aggregator,
                                                     shard_sizes, claims)
                for c in traffic.get("rejected_late", []):
                    rejected[c] = "not the norm it reported"
                    log(f"round {t}: server {c}'s update left out (its norm differs from the one it reported)")
            else:  # weights from the plan (|D_i|, b_i, K_i), the same on every rank, which pre-sums its own servers
                meta = [_update_meta(c, shard_sizes, plans) for c in contributors]
                scale = aggregator.round_scale(meta)
                weights = [w * scale for w in aggregator.weights(meta)]
                result, traffic = _exchange_dense(comm, sites, plans, contributors, weights, updates, owner)
            if aggregator.keeps_global_adapter:
                global_state = result  # clients start from it next round; the base stays W0 until the end
            else:
                deltas = result
        else:  # nobody finished: the base stays as it is this round
            traffic = {"client_bytes_up": {}, "bytes_down_payload": 0, "wait_s": 0.0, "agg_s": 0.0}
        if cfg.method == "hetlora":  # rank self-pruning: every rank updates every server's rank alike
            for c in contributors:
                norm = done[c][1]
                planner.client_ranks[c] = pruned_rank(planner.client_ranks[c], cfg.hetlora.gamma, norm,
                                                      prune_norms.get(c))
                prune_norms[c] = norm
        absorbed = bases.merge(deltas, site_by_key, measure=cfg.quant.measure_absorbed)
        agg_peak = peak_mem(device, agg_mem_reset) if rank0 else 0
        extra = {p: bases.extra_bytes(p) for p in bases.views}
        for c in stats:
            stats[c].bytes_up = traffic["client_bytes_up"].get(c, 0)

        gathered = comm.gather_object((list(stats.values()), absorbed, extra))
        t_eval = time.perf_counter()
        ev = run_eval() if (t % cfg.eval.every == 0 or t == cfg.rounds) else None
        eval_s = time.perf_counter() - t_eval
        if ev is not None:
            eval_losses.append(ev["loss"])
        if rank0:
            all_stats = {s.client: s for part in gathered for s in part[0]}
            absorbed_by, extra_by = {}, {}
            for _, a, e in gathered:
                absorbed_by.update(a)
                extra_by.update(e)
            row = _round_row(t, eval=ev, n_selected=len(selected), n_clients=n, stats=all_stats,
                             traffic=traffic, wall_s=time.perf_counter() - t_round)
            in_use = set(precisions) | {eval_precision}
            # NaN when nothing was merged or quant.measure_absorbed is off (np.min keeps the NaN)
            row["absorbed_min"] = float(np.min([absorbed_by[p] for p in in_use])) if deltas else math.nan
            row["agg_peak_bytes"] = agg_peak
            row["eval_s"] = eval_s
            arrays = _client_arrays(n, L, sites, plans, selected, all_stats)
            arrays["absorbed"] = np.array([absorbed_by[p] if deltas else math.nan for p in precisions])
            arrays["extra_bytes_per_param"] = np.array([extra_by[p] / bases.base_params for p in precisions])
            arrays["importance"] = scores
            arrays["pred_step_s"] = np.array([i.predicted_step_s for i in infos])
            arrays["pred_mem_bytes"] = np.array([i.predicted_mem_bytes for i in infos], dtype=np.int64)
            arrays["rejected"] = np.array([int(c in rejected) for c in range(n)], dtype=np.int8)
            row["n_rejected"] = len(rejected)
            for c in group_of:  # fedadapter: the configuration each sampled server trained
                arrays["adapter_depth"][c], arrays["adapter_width"][c] = configs[group_of[c]].depth, \
                    configs[group_of[c]].width
            writer.append_round(row, arrays)
            log.step(loss=f"{row['eval_loss']:.4f}" if ev else "-")
        if cfg.checkpoint.enabled and (t % cfg.checkpoint.every == 0 or t == cfg.rounds):
            # after rank 0's row of round t: a checkpoint every rank holds always has its row
            ckpt.save(t, rank_state(cfg=cfg, world_size=comm.world_size, run_id=run_id, bases=bases,
                                    parameters=ft_params, global_state=global_state, adapter_config=adapter_config,
                                    planner=planner, prune_norms=prune_norms, eval_losses=eval_losses,
                                    profiles=profiles),
                      results=writer.path if rank0 else None)
    log.close()

    # ---- finish: export the merged model, mark the file finished --------------------------------------------
    if global_state and cfg.method != "fedadapter":  # a kept LoRA global adapter joins the base once
        bases.merge(global_state, site_by_key, measure=False)
        global_state = {}
    final_dir = None
    if rank0:
        if cfg.output.save_final:
            final_dir = out_dir / "final"
            tmp = out_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            bases.export(eval_precision).save_pretrained(tmp)  # plain HF modules: dequant(W0) + D
            tok.save_pretrained(tmp)
            if cfg.method == "fedadapter":  # bottleneck adapters do not merge into weights: saved beside
                save_adapter_state(tmp, global_state, adapter_config.depth, adapter_config.width)
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
    if cfg.generation.enabled:
        _generate_and_score(cfg, comm, model, tok, bases, eval_precision, points, global_state, gen_mrs, gen_refs,
                            out_dir, log)
    if rank0:
        writer.finish({"loss": eval_losses[-1], "ppl": math.exp(min(eval_losses[-1], 50.0))})
        log(f"done: eval loss {eval_losses[0]:.4f} -> {eval_losses[-1]:.4f}; results in {out_dir}")
    comm.barrier()
    return RunSummary(out_dir / "results.h5", final_dir, eval_losses) if rank0 else None


def _generate_and_score(cfg, comm, model, tok, bases, eval_precision, points, global_state, mrs, refs, out_dir,
                        log) -> None:
    """Beam search on every distinct MR (a strided share per rank), scored at rank 0 against all references
    of each MR; generations.txt beside results.h5 and the scores in eval/generation/."""
    from contextlib import nullcontext

    from ..comm.audit import public_payload
    from ..io.hdf5 import write_generation
    from ..metrics.e2e import all_metrics, score_e2e

    bases.use(eval_precision)
    hooks = HoulsbyAdapters(points, global_state, device=comm.device, trainable=False).attach(model) \
        if cfg.method == "fedadapter" else nullcontext()
    mine = list(range(comm.rank, len(mrs), comm.world_size))
    log(f"generation: beam {cfg.generation.num_beams} on {len(mrs)} meaning representations")
    t0 = time.perf_counter()
    with hooks:
        texts = generate(model, tok, [mrs[i] for i in mine], cfg.generation, device=comm.device)
    by_index: dict[int, str] = {}
    # model outputs for the public eval split, not a server's data (the wire audit logs them under this label)
    with public_payload(comm, "generations for the public eval split"):
        for part in comm.all_gather_object(dict(zip(mine, texts))):
            by_index.update(part)
    if comm.rank != 0:
        return
    hyps = [by_index[i] for i in range(len(mrs))]
    write_generations(out_dir / "generations.txt", hyps)
    scores = all_metrics(score_e2e(hyps, refs, meteor=cfg.generation.meteor))
    g = cfg.generation
    write_generation(out_dir / "results.h5", scores, {
        "source": g.data_path or "eval split", "n_mrs": len(mrs), "num_beams": g.num_beams,
        "length_penalty": g.length_penalty, "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "generate_s": time.perf_counter() - t0})
    log("E2E scores: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" ({out_dir / 'generations.txt'})")


# ---- exchange: how updates travel to rank 0 and back ------------------------------------------------------


def _exchange_factored(comm, sites, plans: list[ClientPlan], contributors, updates, owner, aggregator, shard_sizes,
                       claims: dict[int, float] | None = None):
    """Clients send (B, A); rank 0 runs the method's aggregator and broadcasts its result.

    Merging methods (fedpipe, flora): the stack [w_i B_i], [A_i] (exact, Eqn 12), or its dense product when
    that is smaller; returns the update to merge. Global-adapter methods: lora / hetlora broadcast factors
    at the largest contributing rank per weight, flexlora the dense dW_g; returns that global adapter.
    Weights are formed at rank 0 from each received update (raw_weight: |D_i|, |D_i|/b_i, or HetLoRA's
    norm) and normalized at the end. `claims`: the norms the servers reported; an update whose norm at rank 0
    differs (or is not finite) is folded in with weight 0, so the downlink's layout stays as planned, and is
    reported back in traffic["rejected_late"]."""
    layouts = {c: factor_layout(sites, plans[c].ranks) for c in contributors}
    client_bytes = {c: layout_numel(layouts[c]) * 4 for c in contributors}  # fp32 payload
    if aggregator.keeps_global_adapter:
        keys = {k for c in contributors for k, r in plans[c].ranks.items() if r > 0}
        if aggregator.name == "flexlora":
            down_layout, dense_down = [], dense_layout(sites, keys)
        else:  # factors at the largest rank of any contributor, per weight
            r_max = {k: max(plans[c].ranks.get(k, 0) for c in contributors) for k in keys}
            down_layout, dense_down = factor_layout(sites, r_max), None
    else:
        down_layout = stacked_layout(sites, [plans[c].ranks for c in contributors])
        # The merged update goes down in whichever exact form is smaller (see downlink_is_dense).
        dense_down = dense_layout(sites, {k for k, _, _ in down_layout}) if downlink_is_dense(down_layout) else None
    wait_s = agg_s = 0.0
    held, late = 0, []
    if comm.rank == 0:
        # Streamed: each update is folded into the running sum as it arrives and dropped, so rank 0 holds
        # one update and the sum (bounded by the downlink's size), never all N updates.
        acc, total, held, late = None, 0.0, 0, []
        for c in contributors:  # per-source order matches each sender's ascending client order
            if owner(c) == 0:
                u = updates.pop(c)
            else:
                buf = torch.empty(layout_numel(layouts[c]), device=comm.device)
                t0 = time.perf_counter()
                comm.recv(buf, src=owner(c))
                wait_s += time.perf_counter() - t0
                u = _update_meta(c, shard_sizes, plans, unpack(buf, layouts[c]))
                del buf
            t0 = time.perf_counter()
            w = aggregator.raw_weight(u)
            if claims is not None:
                n = update_norm(u.factors)
                if not (math.isfinite(n) and abs(n - claims[c]) <= 1e-4 * max(claims[c], 1e-12)):
                    late.append(c)
                    w = 0.0
            acc = aggregator.accumulate(acc, u, w, dense=dense_down is not None)
            total += w
            agg_s += time.perf_counter() - t0
            held = max(held, _tree_bytes(acc) + _tree_bytes(u.factors))  # the running sum + this update
            del u
        t0 = time.perf_counter()
        agg = aggregator.finish(acc, total / aggregator.round_scale(
            [_update_meta(c, shard_sizes, plans) for c in contributors]))
        del acc
        result = agg.state if aggregator.keeps_global_adapter else agg.merge
        if dense_down:
            down = pack_dense({k: to_dense(v) for k, v in result.items()}, dense_down, device=comm.device)
        else:
            down = pack(result, down_layout, device=comm.device)
        agg_s += time.perf_counter() - t0
    else:
        for c in contributors:
            if owner(c) == comm.rank:
                comm.send(pack(updates[c].factors, layouts[c], device=comm.device), dst=0)
        numel = sum(o * i for _, (o, i) in dense_down) if dense_down else layout_numel(down_layout)
        down = torch.empty(numel, device=comm.device)
    comm.broadcast(down, src=0)
    if dense_down:
        deltas = unpack_dense(down, dense_down)
    else:
        deltas = unpack(down, down_layout)  # factors (B, A): a low-rank residual keeps them as they are
    traffic = {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(down), "wait_s": wait_s,
               "agg_s": agg_s, "agg_held_bytes": held,
               "rejected_late": comm.broadcast_object(late if comm.rank == 0 else None)}
    return deltas, traffic


def _update_meta(c: int, shard_sizes, plans: list[ClientPlan], factors=None) -> ClientUpdate:
    """Server c's update as the plans describe it (|D_i|, b_i, K_i: what weights are formed from), with
    `factors` when they have arrived."""
    return ClientUpdate(c, shard_sizes[c], plans[c].batch_size, factors or {}, plans[c].local_steps or 1)


def _inject_faults(cfg: JobConfig, c: int, update: ClientUpdate) -> None:
    """faults.*: turn a server's update into NaN or scale it (drills and tests of the sanitization)."""
    f = cfg.faults
    factor = math.nan if c in f.nan_clients else f.scale if c in f.scale_clients else None
    if factor is None:
        return
    for key, v in update.factors.items():
        if isinstance(v, dict):
            update.factors[key] = {part: t * factor for part, t in v.items()}
        elif torch.is_tensor(v):
            update.factors[key] = v * factor
        else:
            update.factors[key] = (v[0] * factor, v[1])  # scaling B scales the product


def _tree_bytes(tree) -> int:
    """Bytes of the tensors in a dict of tensors or (B, A) pairs."""
    return sum(nbytes(t) for v in tree.values() for t in ((v,) if torch.is_tensor(v) else v))


def _exchange_dense(comm, sites, plans: list[ClientPlan], contributors, weights, updates, owner):
    """Each rank forms sum_i w_i B_i A_i for its own clients; a SUM reduce to rank 0, then a broadcast."""
    keys = {k for c in contributors for k, r in plans[c].ranks.items() if r > 0}
    layout = dense_layout(sites, keys)
    numel_of = {s.key: s.numel for s in sites}
    client_bytes = {c: 4 * sum(numel_of[k] for k, r in plans[c].ranks.items() if r > 0 and k in numel_of)
                    for c in contributors}
    w = dict(zip(contributors, weights))
    mine = [c for c in contributors if owner(c) == comm.rank]
    t0 = time.perf_counter()
    buf = pack_dense(dense_sum([updates[c] for c in mine], [w[c] for c in mine]), layout, device=comm.device)
    agg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    comm.reduce_sum(buf, dst=0)
    wait_s = time.perf_counter() - t0 if comm.rank == 0 else 0.0
    comm.broadcast(buf, src=0)
    deltas = unpack_dense(buf, layout)
    traffic = {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(buf), "wait_s": wait_s,
               "agg_s": agg_s}
    return deltas, traffic


def _flat_items(d: dict, prefix: tuple = ()):
    """(path, tensor) for every tensor in a nested dict, in the dict's order."""
    for k, v in d.items():
        if torch.is_tensor(v):
            yield prefix + (k,), v
        else:
            yield from _flat_items(v, prefix + (k,))


def _tensor_layout(d: dict) -> list[tuple[tuple, torch.Size]]:
    return [(path, t.shape) for path, t in _flat_items(d)]


def _exchange_fedavg(comm, groups: list[list[int]], layouts, updates, owner, aggregator, plans, shard_sizes):
    """FedAvg of whole tensors (ft: every parameter; fedadapter: every adapter), one average per group.

    The method's weighted sum is linear, so each rank forms it over its own servers of each group, the
    partial sums travel in one buffer (the groups side by side) through a SUM reduce to rank 0, and the
    result is broadcast. Returns one nested dict per group (None for a group nobody finished in)."""
    weight_of: dict[int, float] = {}
    for members in groups:
        if members:
            ws = aggregator.weights([_update_meta(c, shard_sizes, plans) for c in members])
            weight_of.update(zip(members, ws))
    t0 = time.perf_counter()
    chunks = []
    for members, layout in zip(groups, layouts):
        mine = [c for c in members if owner(c) == comm.rank]
        partial = {}
        if mine:
            agg = aggregator.aggregate([updates[c] for c in mine], [weight_of[c] for c in mine])
            partial = dict(_flat_items(agg.merge or agg.state))
        for path, shape in layout:
            t = partial.get(path)
            chunks.append(t.reshape(-1).float() if t is not None else torch.zeros(shape.numel()))
    buf = torch.cat(chunks).to(comm.device)
    agg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    comm.reduce_sum(buf, dst=0)
    wait_s = time.perf_counter() - t0 if comm.rank == 0 else 0.0
    comm.broadcast(buf, src=0)
    buf = buf.cpu()
    results, offset = [], 0
    for members, layout in zip(groups, layouts):
        out: dict = {}
        for path, shape in layout:
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = buf[offset:offset + shape.numel()].reshape(shape).clone()
            offset += shape.numel()
        results.append(out if members else None)
    numel_of = [sum(shape.numel() for _, shape in layout) for layout in layouts]
    client_bytes = {c: 4 * numel_of[g] for g, members in enumerate(groups) for c in members}
    traffic = {"client_bytes_up": client_bytes, "bytes_down_payload": nbytes(buf), "wait_s": wait_s,
               "agg_s": agg_s}
    return results, traffic


@torch.no_grad()
def _add_to_parameters(model, delta: dict[str, torch.Tensor]) -> None:
    """ft: every parameter moves by the averaged change (a tied embedding / LM head once)."""
    for name, p in model_parameters(model).items():
        p.add_(delta[name].to(device=p.device, dtype=p.dtype))


# ---- FedAdapter's progressive configuration (algorithm/aggregation/fedadapter.py) -----------------------------


def _generator(seed: int, round_idx: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_idx, salt]).generate_state(1)[0]))


def _fedadapter_round(cfg: JobConfig, points, L: int, current: AdapterConfig, global_state: dict,
                      selected: list[int], t: int):
    """The configurations trained this round (a trial round: current, deeper, wider), each sampled
    server's group, and each group's starting adapters (the global adapter grown to the configuration)."""
    fa = cfg.fedadapter
    trial = fa.period > 0 and t % fa.period == 0
    configs = trial_configs(current, L, fa.depth_step, fa.width_mult, fa.max_width) if trial else [current]
    groups = trial_groups(selected, len(configs))
    configs = [cf for cf, members in zip(configs, groups) if members]  # fewer servers than configurations
    groups = [members for members in groups if members]
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    starts = [init_state(points, L, cf.depth, cf.width, _generator(cfg.seed, t, 0xFADA + g), base=global_state)
              for g, cf in enumerate(configs)]
    return configs, group_of, starts


def _fedadapter_choose(cfg: JobConfig, configs, results, global_state, current, run_eval, trial_slice, shape,
                       log, t: int):
    """After the exchange: a normal round keeps its average; a trial round scores every group's average on
    the trial examples and keeps the configuration with the best loss reduction per training FLOP."""
    if len(configs) == 1:
        return (results[0] if results[0] is not None else global_state), current
    before = run_eval(global_state, trial_slice)["loss"]
    losses = [run_eval(r, trial_slice)["loss"] if r is not None else math.nan for r in results]
    cost = [houlsby_flops_per_sample(shape, cf.depth, cf.width, cfg.model.max_length) for cf in configs]
    g = pick_config(before, losses, cost)
    log(f"round {t}: fedadapter trial from loss {before:.4f}: " + ", ".join(
        f"depth {cf.depth} width {cf.width} -> {loss:.4f}" for cf, loss in zip(configs, losses))
        + f"; keeping depth {configs[g].depth} width {configs[g].width}")
    if results[g] is None:
        return global_state, current
    return results[g], configs[g]


# ---- HDF5 rows --------------------------------------------------------------------------------------------


def _round_row(t: int, *, eval: dict | None, n_selected: int, n_clients: int = 0, stats: dict | None = None,
               traffic: dict | None = None, wall_s: float = 0.0) -> dict:
    stats = stats or {}
    done = [s for s in stats.values() if s.completed]
    row = {
        "round": t,
        "absorbed_min": math.nan,
        "agg_peak_bytes": 0,
        "agg_held_bytes": traffic.get("agg_held_bytes", 0) if traffic else 0,
        "n_rejected": 0,
        "wall_s": wall_s,
        "eval_s": 0.0,
        "agg_s": traffic["agg_s"] if traffic else 0.0,
        "wait_s": traffic["wait_s"] if traffic else 0.0,
        "train_loss": float(np.mean([s.train_loss for s in done])) if done else math.nan,
        "eval_loss": eval["loss"] if eval else math.nan,
        "eval_ppl": eval["ppl"] if eval else math.nan,
        "bytes_up": int(sum(traffic["client_bytes_up"].values())) if traffic else 0,
        "bytes_down": 0,
        "n_selected": n_selected,
        "under_training_rate": (1.0 - len(done) / n_selected) if n_selected else math.nan,
    }
    if traffic:
        # Every server (selected or not) must receive the merged update to stay in sync.
        row["bytes_down"] = int(traffic["bytes_down_payload"]) * n_clients
    return row


def _client_arrays(n: int, L: int, sites: list[Site], plans: list[ClientPlan], selected: list[int],
                   stats: dict[int, ClientStats]) -> dict[str, np.ndarray]:
    a = {name: np.zeros(n, dtype=np.int64) for name in
         ("selected", "completed", "batch_size", "local_steps", "samples", "peak_mem_bytes", "trainable_params",
          "quant_bits", "bytes_up", "adapter_depth", "adapter_width")}
    a["local_s"] = np.full(n, np.nan)
    a["wait_s"] = np.full(n, np.nan)
    a["train_loss"] = np.full(n, np.nan)
    a["update_norm"] = np.full(n, np.nan)
    a["ranks"] = np.zeros((n, L, 4), dtype=np.int32)
    a["importance"] = np.full((n, L, 4), np.nan)
    for c in range(n):
        a["quant_bits"][c] = PRECISION_BITS.get(plans[c].precision, 32)
        a["batch_size"][c] = plans[c].batch_size
        a["ranks"][c] = plans[c].rank_matrix(sites) if c in selected else 0
    for c in selected:
        a["selected"][c] = 1
        s = stats.get(c)
        if s is None:
            continue
        a["completed"][c] = int(s.completed)
        a["local_steps"][c] = s.local_steps
        a["samples"][c] = s.samples
        a["local_s"][c] = s.local_s
        a["peak_mem_bytes"][c] = s.peak_mem_bytes
        a["trainable_params"][c] = s.trainable_params
        a["bytes_up"][c] = s.bytes_up
        a["train_loss"][c] = s.train_loss
        a["update_norm"][c] = s.update_norm
    # Straggler wait: how long each server idles until the slowest selected one has finished.
    t_max = max((s.local_s for s in stats.values()), default=0.0)
    for c, s in stats.items():
        a["wait_s"][c] = t_max - s.local_s
    return a
