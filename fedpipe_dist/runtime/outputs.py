"""What a run leaves on disk, at its start and its end: results.h5 opened (a fresh file with the untrained
base as row 0, or a resumed run's file put back as it was after its checkpoint), and at the end final/ (the
merged model, written atomically via final.tmp), E2E generations and their scores, and the finished mark.
"""

from __future__ import annotations

import math
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from ..io.checkpoint import CheckpointDir
from ..io.hdf5 import ResultsWriter
from ..io.owned import describe, foreign_files, publish_final, remove_checkpoints, remove_results
from ..io.sinks import open_sinks
from ..io.space import DiskError, disk_errors, require_space
from ..metrics.generate import generate, one_line, write_generations
from .agreement import raise_on_all_ranks
from .provenance import placement
from .record import own_losses, round_row
from .resume import apply_state
from .setup import Run


@dataclass
class RunSummary:
    """What a finished job leaves (rank 0): its results.h5, its final model folder, the eval losses per round."""

    results_path: Path
    final_dir: Path | None
    eval_loss: list[float]


def check_shared_dir(out: Path, comm, wait_s: float = 10.0) -> None:
    """Refuse an output.dir that the ranks do not share (a node-local path such as /tmp or a node's scratch on
    a multi-node job): every rank writes a probe file there that rank 0 must see, so the problem shows at the
    start (exit 2) instead of at the first resume, when the other nodes' checkpoints are nowhere rank 0 can read.
    Rank 0 looks again for up to `wait_s` seconds (a shared filesystem's client may cache a missing name)."""
    if comm.world_size == 1:
        return
    token = comm.broadcast_object(secrets.token_hex(6) if comm.rank == 0 else None)
    host = socket.gethostname()
    probe = out / f".fedpipe.probe-{token}-{comm.rank}"
    wrote = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(host)
    except OSError as e:
        wrote = e.strerror
    hosts = comm.all_gather_object((host, wrote))
    err = None
    if comm.rank == 0:
        unwritable = [f"rank {r} on {h} ({w})" for r, (h, w) in enumerate(hosts) if w]
        deadline = time.monotonic() + wait_s
        while True:
            unseen = [r for r, (_, w) in enumerate(hosts)
                      if not w and not (out / f".fedpipe.probe-{token}-{r}").exists()]
            if not unseen or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if unwritable:
            err = (f"output.dir: {', '.join(unwritable)} cannot write into {str(out)!r}; every rank needs write "
                   "access to output.dir")
        elif unseen:
            err = (f"output.dir: {str(out)!r} is not one folder shared by every rank: rank 0 on {hosts[0][0]} "
                   f"cannot see the file(s) written there by {', '.join(f'rank {r} on {hosts[r][0]}' for r in unseen)}"
                   ". A multi-node job needs output.dir on a filesystem every node mounts (a parallel or "
                   "network filesystem, not /tmp or node-local scratch)")
    err = comm.broadcast_object(err)
    comm.barrier()  # rank 0 has looked: every probe may go
    probe.unlink(missing_ok=True)
    if err:
        raise UserInputError(err)


def check_output_dir(out: Path, overwrite: bool, foreign: str = "refuse") -> None:
    """Refuse an output.dir whose results.h5 would be replaced without output.overwrite=true, that is a file,
    or that holds files the project did not write where a fresh run clears its own (io/owned.py)."""
    results = out / "results.h5"
    if results.exists() and not overwrite:
        raise UserInputError(f"output.dir: {str(out)!r} already holds results.h5 from an earlier run; add "
                             "resume=true to continue that run from its newest checkpoint, output.overwrite=true to "
                             "replace it, or choose a new output.dir")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output.dir: {str(out)!r} exists and is not a folder; choose another output.dir")
    found = foreign_files(out) if foreign != "keep" else []
    if found:
        raise UserInputError(f"output.dir: {str(out)!r} holds {len(found)} file(s) this project did not write where "
                             f"a run replaces its own: {describe(found)}; move them elsewhere, choose a new "
                             "output.dir, or add output.foreign_files=keep to run beside them (they are left in "
                             "place)")


def _say_placement(run: Run) -> None:
    """On a run over several hosts, which host holds rank 0 and where every rank runs (runtime/provenance)."""
    if (where := placement(run.provenance)):
        run.log(f"placement: {where}")


def open_results(run: Run, ckpt: CheckpointDir, point, run_id: str) -> tuple[ResultsWriter | None, list[float]]:
    """The writer (rank 0; None elsewhere) and the eval losses so far: a resumed run's state is put back and
    its results.h5 restored to the checkpoint's round; a fresh run evaluates the untrained base as row 0."""
    if point:
        err = None
        try:
            eval_losses = apply_state(point.state, bases=run.bases, method=run.method, planner=run.planner)
        except UserInputError as e:
            err = str(e)
        raise_on_all_ranks(run.comm, err)
        point.state = None
        if not run.rank0:
            return None, eval_losses
        ckpt.restore_results(point.round, run.out_dir / "results.h5")
        writer = ResultsWriter.reopen(run.out_dir / "results.h5", n_clients=run.cfg.clients.n, n_layers=run.L,
                                      resumed_from=point.round)
        for sink in open_sinks(run.cfg.output, run.out_dir, point.round):
            writer.attach(sink)
        run.log(f"fedpipe: resuming {run.cfg.method} in {run.out_dir} after round {point.round} of {run.cfg.rounds} "
                f"(eval loss {eval_losses[-1]:.4f}); results.h5 continues from there")
        _say_placement(run)
        return writer, eval_losses
    # an earlier run's files here (overwrite=true, or an attempt that died in round 1) go now that this run is
    # set up (a run refused on bad input deletes nothing), and no other file: its checkpoints on every rank (a
    # node's own disk may hold them), its results.h5 and final/ on rank 0
    remove_checkpoints(run.out_dir)
    ev0 = run.evaluate()  # the untrained base, on every rank (the eval is shared)
    writer, err = None, None
    if run.rank0:
        try:
            require_space(run.out_dir, 0, "results.h5")
            with disk_errors(run.out_dir, "results.h5"):
                writer = _fresh_results(run, run_id, ev0)
        except DiskError as e:
            err = str(e)
    raise_on_all_ranks(run.comm, err)
    return writer, [ev0["loss"]]


def _fresh_results(run: Run, run_id: str, ev0: dict) -> ResultsWriter:
    cfg, out = run.cfg, run.out_dir
    remove_results(out)
    writer = ResultsWriter(out / "results.h5", n_clients=cfg.clients.n, n_layers=run.L, attrs={
        "method": "central" if cfg.central else cfg.method, "mirrors": cfg.method,
        "model": cfg.model.name_or_path, "dataset": cfg.data.name,
        "world_size": run.comm.world_size, "n_clients": cfg.clients.n, "config_json": cfg.to_json(),
        "eval_precision": run.eval_precision, "base_params": run.bases.base_params, "run_id": run_id,
        **{f"dropped_rows_{part}": n for part, n in run.dropped_rows.items()}})
    profiles, precisions = run.profiles, run.precisions
    writer.write_profile({"tflops": [p.tflops for p in profiles],
                          "mem_budget_bytes": [p.mem_budget_bytes for p in profiles],
                          "slowdown": [p.slowdown for p in profiles],
                          "base_weight_bytes": [run.view_bytes[p] for p in precisions]})
    writer.append_round(round_row(0, eval=ev0, n_selected=0), own_losses(ev0, cfg.clients.n))
    for sink in open_sinks(cfg.output, out, 0):
        writer.attach(sink)
    what = f"the centralized limit of {cfg.method}" if cfg.central else cfg.method
    run.log(f"fedpipe: {what} on {cfg.model.name_or_path} ({len(run.sites)} adapter sites), {cfg.clients.n} "
            f"servers on {run.comm.world_size} rank(s), {cfg.rounds} rounds -> {out / 'results.h5'}")
    _say_placement(run)
    counts = {p: precisions.count(p) for p in dict.fromkeys(precisions)}
    run.log("bases: " + ", ".join(f"{k} x {p} ({run.view_bytes[p] / 2**20:.1f} MiB)" for p, k in counts.items())
            + f"; evaluated and exported at {run.eval_precision}")
    run.log(f"round 0 (base model at {run.eval_precision}): eval loss {ev0['loss']:.4f}, ppl {ev0['ppl']:.2f}")
    return writer


def finish(run: Run, writer: ResultsWriter | None, eval_losses: list[float], checkpoint_s: float = 0.0,
           flush_s: float = 0.0) -> Path | None:
    """The final eval on the whole eval set, export of the merged model to final/ (rank 0), generation and
    scores (every rank), the file marked finished (with this attempt's checkpoint seconds, and this finish's,
    which include `flush_s`: the wait for the last checkpoint's background write). Returns final/ (None when
    not saved or not rank 0)."""
    t_finish = time.perf_counter()
    run.method.finish()
    full = None
    if run.cfg.eval.final_full and run.eval_full is not None:  # before export, which ends the bases' views
        t0 = time.perf_counter()
        full = run.evaluate(data=run.eval_full())
        run.log(f"final eval on the whole eval set: loss {full['loss']:.4f} (se {full['se']:.4f}, {full['tokens']:,} "
                f"tokens) in {time.perf_counter() - t0:.1f} s")
    final_dir, err = None, None
    if run.rank0 and run.cfg.output.save_final:
        final_dir, tmp = run.out_dir / "final", run.out_dir / "final.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            require_space(run.out_dir, 4 * run.bases.base_params, "final/")  # fp32 weights, at most
            with disk_errors(run.out_dir, "final/"):
                run.bases.export(run.eval_precision).save_pretrained(tmp)  # plain HF modules: dequant(W0) + D
                run.tok.save_pretrained(tmp)
                run.method.export(tmp)  # what does not merge into weights is saved beside them
                publish_final(tmp, final_dir)
        except DiskError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # no final.tmp left behind
            err = str(e)
    raise_on_all_ranks(run.comm, err)
    if run.cfg.generation.enabled:
        generate_and_score(run)
    if run.rank0:
        try:
            with disk_errors(run.out_dir, "results.h5's final metrics"):
                final = {"loss": eval_losses[-1], "ppl": math.exp(min(eval_losses[-1], 50.0))}
                if full is not None:
                    final.update(full_loss=full["loss"], full_ppl=full["ppl"], full_loss_se=full["se"],
                                 full_tokens=full["tokens"])
                writer.finish(final, timing={"checkpoint_s": checkpoint_s,
                                             "finish_s": flush_s + time.perf_counter() - t_finish},
                              attrs=_planner_attrs(run))
        except DiskError as e:
            err = str(e)
    raise_on_all_ranks(run.comm, err)
    if run.rank0:
        run.log(f"done: eval loss {eval_losses[0]:.4f} -> {eval_losses[-1]:.4f}; results in {run.out_dir}")
    return final_dir


def _planner_attrs(run: Run) -> dict[str, str]:
    """plan.step_cost=measured (or auto, where it measured): the step cost the planner fitted (root attribute
    step_fit_json: the medians t0_s, per_token_s, tokens_per_sample and overhead_samples planned with, steps,
    estimator, and each fit in fits; "null" where the steps could not be fitted or none were timed)."""
    import json

    if run.planner is None or not run.planner.measures:
        return {}
    return {"step_fit_json": json.dumps(run.planner.step_fit_record())}


def generate_and_score(run: Run) -> None:
    """Beam search on every distinct MR (a strided share per rank), scored at rank 0 against all references
    of each MR; generations.txt beside results.h5 and the scores in eval/generation/."""
    from ..comm.audit import public_payload
    from ..io.hdf5 import write_generation
    from ..metrics.e2e import all_metrics, score_e2e

    cfg, comm, mrs = run.cfg, run.comm, run.gen_mrs
    run.bases.use(run.eval_precision)
    mine = list(range(comm.rank, len(mrs), comm.world_size))
    run.log(f"generation: beam {cfg.generation.num_beams} on {len(mrs)} meaning representations")
    t0 = time.perf_counter()
    with run.method.attach():
        texts = generate(run.model, run.tok, [mrs[i] for i in mine], cfg.generation, device=comm.device)
    by_index: dict[int, str] = {}
    # model outputs for the public eval split, not a server's data (the wire audit logs them under this label)
    with public_payload(comm, "generations for the public eval split"):
        for part in comm.all_gather_object(dict(zip(mine, texts))):
            by_index.update(part)
    if comm.rank != 0:
        return
    hyps = [one_line(by_index[i]) for i in range(len(mrs))]  # scored as generations.txt holds them
    write_generations(run.out_dir / "generations.txt", hyps)
    scores = all_metrics(score_e2e(hyps, run.gen_refs, meteor=cfg.generation.meteor))
    g = cfg.generation
    write_generation(run.out_dir / "results.h5", scores, {
        "source": g.data_path or "eval split", "n_mrs": len(mrs), "num_beams": g.num_beams,
        "length_penalty": g.length_penalty, "no_repeat_ngram_size": g.no_repeat_ngram_size,
        "generate_s": time.perf_counter() - t0})
    run.log("E2E scores: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + f" ({run.out_dir / 'generations.txt'})")
