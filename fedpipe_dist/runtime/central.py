"""The centralized limit of a federated job (`central=true`): the same model, adapter, optimizer, lr, rank,
targets, tokenization and eval sample, trained in one process on exactly the samples the job's servers train on.

    python -m fedpipe_dist run JOB.yaml central=true output.dir=runs/JOB-central

On iid data no federated method can beat it; every comparison draws it beside the methods (benchmarks/
federated_gap.py, time_to_quality.py). Its step schedule: round t's plans (the job's own: uniform for the
baselines, Algorithm 1's batch sizes for FedPipe) give server i a batch b_i and K_i local steps, and its batches
come from the stream server i would draw that round (runtime/client.batch_indices seeded by client_seed(seed,
t, i)). Central step k trains one batch: step k's batches of every server that trains this round (K_i > k),
concatenated. So it sees every sample the federation sees, in the same round and as often; one AdamW at
train.lr runs for the whole job (a centralized run keeps its optimizer), at round t's lr where train.lr_schedule
decays it. Adapter: for every PEFT method, LoRA at lora.rank on lora.targets, from the job's shared initial
adapter (the one FedAvg-LoRA starts from); for method ft, every parameter. It trains on the base the job
evaluates (eval.precision).

Set-up, row 0, evaluation, results.h5 (root attrs method=central, mirrors=the job's method) and final/ are the
engine's (runtime/setup.py, runtime/outputs.py). It keeps no checkpoints: a central run is a short reference,
and a stopped one is run again (resume=true is refused with that advice).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..adapters.lora import LoRAAdapters, shared_initial_adapter
from ..algorithm.planner import sample_clients
from ..config import JobConfig
from ..data.tokenize import IGNORE, Batch, collate
from ..errors import UserInputError
from ..io.checkpoint import CheckpointDir
from ..metrics.perplexity import lm_loss
from .agreement import agree
from .client import batch_indices, client_seed, model_parameters, round_lr
from .outputs import RunSummary, check_output_dir, finish, open_results
from .record import own_losses, round_row
from .resume import new_run_id
from .setup import Run, set_up


def check_central(cfg: JobConfig, world_size: int) -> None:
    """What a central run refuses, with the fix."""
    if world_size != 1:
        raise UserInputError(f"central=true trains in one process, but this job has {world_size} ranks; run it as "
                             "`python -m fedpipe_dist run JOB.yaml central=true` (world size 1)")
    if cfg.resume:
        raise UserInputError("central=true keeps no checkpoints to resume from (a central run is a short reference); "
                             "run it again without resume=true, with output.overwrite=true")


def round_steps(run: Run, t: int) -> list[list[tuple[int, np.ndarray]]]:
    """Round t's central steps: for step k, [(server, its step-k batch indices into its shard)] over the servers
    that train this round (selected, with a plan that fits) and have more than k local steps."""
    cfg = run.cfg
    selected = sample_clients(cfg.clients.n, cfg.clients.fraction, seed=cfg.seed, round_idx=t)
    plans, infos, _ = run.planner.plan(run.comm, t)
    streams = {}
    for c in selected:
        if infos[c].fits:
            steps = plans[c].local_steps or cfg.train.local_steps
            draws = batch_indices(len(run.shards[c]), plans[c].batch_size,
                                  np.random.default_rng(client_seed(cfg.seed, t, c)))
            streams[c] = [next(draws) for _ in range(steps)]
    depth = max((len(s) for s in streams.values()), default=0)
    return [[(c, s[k]) for c, s in streams.items() if k < len(s)] for k in range(depth)]


def union_batch(run: Run, parts: list[tuple[int, np.ndarray]]) -> Batch:
    """One batch of the servers' batches side by side (padded to the longest example of all)."""
    pieces = [collate(run.shards[c], idx, run.pad_id) for c, idx in parts]
    T = max(p.input_ids.shape[1] for p in pieces)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    return Batch(torch.cat([pad(p.input_ids, run.pad_id) for p in pieces]),
                 torch.cat([pad(p.attention_mask, 0) for p in pieces]),
                 torch.cat([pad(p.labels, IGNORE) for p in pieces]))


def run_central(cfg: JobConfig, comm, log, lock):
    """The whole central run on this (only) rank; returns the engine's RunSummary."""
    check_central(cfg, comm.world_size)
    t_start = time.perf_counter()
    agree(comm, lambda: check_output_dir(Path(cfg.output.dir), cfg.output.overwrite, cfg.output.foreign_files))
    agree(comm, lambda: lock.acquire(log))
    ckpt = CheckpointDir(cfg.output.dir, comm.rank, comm.world_size)
    run = set_up(cfg, comm, log, None)
    writer, eval_losses = open_results(run, ckpt, None, new_run_id(comm))
    writer.add_setup(time.perf_counter() - t_start, run.setup_phases, run.provenance)
    trainer = _Trainer(run)
    log.open_bar(cfg.rounds)
    for t in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        steps = round_steps(run, t)
        trainer.set_round_lr(t)
        losses = [trainer.step(union_batch(run, parts), t, k) for k, parts in enumerate(steps)]
        train_s = time.perf_counter() - t0
        ev, t_eval = None, time.perf_counter()
        if t % cfg.eval.every == 0 or t == cfg.rounds:
            ev = trainer.evaluate()
            eval_losses.append(ev["loss"])
        row = round_row(t, eval=ev, n_selected=len({c for parts in steps for c, _ in parts}))
        row.update(train_loss=float(np.mean(losses)) if losses else float("nan"), train_s=train_s,
                   eval_s=time.perf_counter() - t_eval, wall_s=time.perf_counter() - t0, under_training_rate=0.0)
        samples = _samples(cfg.clients.n, steps)
        writer.append_round(row, {"samples": samples, "selected": (samples > 0).astype(np.int64),
                                  "local_steps": _steps(cfg.clients.n, steps),
                                  **own_losses(ev, cfg.clients.n)})
        log.step(row)
    log.close()
    trainer.fold()
    final_dir = finish(run, writer, eval_losses)
    return RunSummary(run.out_dir / "results.h5", final_dir, eval_losses)


def _samples(n: int, steps) -> np.ndarray:
    """Per server, the samples of its shard central trained on this round (what the server would have)."""
    out = np.zeros(n, dtype=np.int64)
    for parts in steps:
        for c, idx in parts:
            out[c] += len(idx)
    return out


def _steps(n: int, steps) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    for parts in steps:
        for c, _ in parts:
            out[c] += 1
    return out


class _Trainer:
    """One optimizer for the whole run over LoRA at lora.rank (every PEFT method) or every parameter (ft)."""

    def __init__(self, run: Run):
        cfg = self.cfg = run.cfg
        self.run = run
        run.bases.use(run.eval_precision)
        self.full = run.method.central_trains == "full"
        if self.full:
            self.adapters = None
            params = list(model_parameters(run.model).values())
            for p in params:
                p.requires_grad_(True)
        else:
            ranks = {s.key: cfg.lora.rank for s in run.sites}
            start = shared_initial_adapter(run.sites, cfg.lora.rank, cfg.seed)
            self.adapters = LoRAAdapters(run.sites, ranks, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                         device=run.comm.device, init=start)
            params = list(self.adapters.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def set_round_lr(self, t: int) -> None:
        """Round t's lr under train.lr_schedule, the servers' own (runtime/client.round_lr)."""
        tr = self.cfg.train
        for group in self.opt.param_groups:
            group["lr"] = round_lr(tr.lr, tr.lr_schedule, tr.lr_min, t, self.cfg.rounds)

    def attached(self):
        """The adapter on the model (nothing to attach for ft, which trains the weights themselves)."""
        return nullcontext() if self.adapters is None else self.adapters.attach(self.run.model)

    def evaluate(self) -> dict:
        if self.adapters is not None:
            self.adapters.eval()  # no adapter dropout
        with self.attached():
            return self.run.evaluate()

    def step(self, batch: Batch, t: int, k: int) -> float:
        """One AdamW step on `batch`, clipped as the servers clip; returns its loss."""
        run, cfg = self.run, self.cfg
        batch = batch.to(run.comm.device)
        if self.adapters is not None:
            self.adapters.train()
        run.model.train()
        try:
            with torch.random.fork_rng(devices=[]), self.attached():
                torch.manual_seed(client_seed(cfg.seed, t, 10_000 + k))  # dropout masks: one stream per step
                loss = lm_loss(run.model, batch)
                loss.backward()
        finally:
            run.model.eval()
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.item())

    def fold(self) -> None:
        """The trained adapter joins the base once, at the end (ft: the weights are trained in place)."""
        if self.full:
            for p in self.params:
                p.requires_grad_(False)
            return
        self.run.bases.merge(self.adapters.factors(), self.run.site_by_key, measure=False)

