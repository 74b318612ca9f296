"""Time to quality under heterogeneity: every method, the same servers, several seeds (issue 14).

Run on demand from the repository root (the full default set took 77 min on 2 cores):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/time_to_quality.py --stories-path ../shared/data
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/time_to_quality.py --stories-path ../shared/data \\
        --profiles p4 --seeds 0 --methods lora fedpipe fedpipe-paper          # one profile, quick look
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/time_to_quality.py --stories-path ../shared/data \\
        --ablation --profiles p4 --seeds 0 1 2                                 # docs/planner.md's switch table

Every run is a real `fedpipe run` of jobs/e2e_stories260k.yaml (the pretrained stories260K on E2E) in one
process that hosts every edge server, with clients.throttle=clock: a server with slowdown s is charged s x
its measured step times instead of waiting them out. On 2 cores, 4-8 servers training at once would fight
over the cores, and the method that keeps every server busy (FedPipe) would pay for our machine's lack of
cores; trained one at a time, each server's local time is what it would be on a machine of its own. A
round's time is then the slowest server's local time plus the process's time outside local training and
evaluation (fedpipe_dist.analysis.runs.round_train_s); evaluation is left out of every clock. Every method is
evaluated on the fp32 base plus its merged updates (eval.precision=fp32), whatever bases its servers trained on.

Per profile and seed: fixed-rank LoRA runs --target-rounds rounds first; its eval loss after them is the
target, its summed round time T_R the reference. Every other method then runs (extended round by round
through resume=true) until it has reached the target and passed T_R / bound, or spent 1.25 T_R. Reported per
method: time to the target and the speedup T_R / that time, the eval loss at T_R / bound (the time an ideal
method would need: the equal wall-clock column), rounds, samples, idle fraction and bytes.

The compute bound of a profile: a method that leaves no server idle processes at most
sum_i (1/s_i) / (N / max_i s_i) times fixed-rank LoRA's samples per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _jobs import CENTRAL, process_job, write_json  # noqa: E402
from _jobs import METHODS as _METHODS  # noqa: E402

from fedpipe_dist.analysis.runs import compute_bound, round_train_s  # noqa: E402
from fedpipe_dist.io.hdf5 import Results  # noqa: E402

# Heterogeneity profiles. p8's memory budgets are derived from the cost model (memory_budgets) so that a
# rank-8 LoRA plan at batch_max fits fp32 on servers 0-1, fp16 on 2-3, nf8 on 4-5 and nf4 on 6-7 only.
PROFILES = {
    "p4": {"slowdown": [1, 1.5, 2, 3], "precisions": ["fp32"] * 4},
    "p8": {"slowdown": [1, 1, 1.5, 2, 2, 3, 4, 6], "precisions": ["fp32", "fp32", "fp16", "fp16", "nf8", "nf8",
                                                                   "nf4", "nf4"]},
    "h4": {"slowdown": [1, 1, 1, 1], "precisions": ["fp32"] * 4},  # homogeneous: nothing to adapt to
    "s4": {"slowdown": [1, 1, 1, 4], "precisions": ["fp32"] * 4},  # one straggler
    # issue 27: a graded profile whose slower servers also have less memory
    "p6": {"slowdown": [1, 1.2, 1.5, 2, 3, 5], "precisions": ["fp32", "fp32", "fp16", "fp16", "nf8", "nf4"]},
}
# The rows: LoRA (the reference), the centralized limit of its job, then every other method (_jobs.METHODS).
METHODS = {"lora": _METHODS["lora"], "central": CENTRAL, **_METHODS}
# The tuned variant with the kept adapter as first built (lora.rebalance=none; the default before orth); rows that
# change one more switch extend it.
KEPT = ["method=fedpipe", "plan.variant=tuned", "lora.carry=adapter", "lora.rebalance=none"]
# docs/planner.md's switch table: the paper's variant with one switch changed at a time, then combinations.
ABLATION = {
    "paper": ["method=fedpipe", "plan.variant=paper"],
    "paper+weights=data": ["method=fedpipe", "plan.variant=paper", "aggregation.weights=data"],
    "paper+weights=samples": ["method=fedpipe", "plan.variant=paper", "aggregation.weights=samples"],
    "paper+lr=sqrt": ["method=fedpipe", "plan.variant=paper", "plan.lr_scaling=sqrt"],
    "paper+t0=15ms": ["method=fedpipe", "plan.variant=paper", "plan.step_overhead_s=0.015"],
    "paper+ranks=spread": ["method=fedpipe", "plan.variant=paper", "plan.rank_alloc=spread"],
    "paper+split=steps": ["method=fedpipe", "plan.variant=paper", "plan.split=steps"],
    "steps+weights=samples": ["method=fedpipe", "plan.variant=paper", "plan.split=steps",
                              "aggregation.weights=samples"],
    "steps+weights=fednova": ["method=fedpipe", "plan.variant=paper", "plan.split=steps",
                              "aggregation.weights=fednova"],
    "spread+steps+samples": ["method=fedpipe", "plan.variant=paper", "plan.rank_alloc=spread", "plan.split=steps",
                             "aggregation.weights=samples"],
    "spread+weights=data": ["method=fedpipe", "plan.variant=paper", "plan.rank_alloc=spread",
                            "aggregation.weights=data"],
    "spread+weights=samples": ["method=fedpipe", "plan.variant=paper", "plan.rank_alloc=spread",
                               "aggregation.weights=samples"],
    # issue 27: what the next round starts from (lora.carry), against the heterogeneity-aware LoRA
    "lora_hb": ["method=lora_hb"],
    "tuned": ["method=fedpipe", "plan.variant=tuned", "lora.carry=none"],
    "tuned+carry=adapter": [*KEPT],
    "tuned+carry+moments": [*KEPT, "train.optimizer_state=kept"],
    "tuned+svd": [*KEPT, "lora.rebalance=svd"],  # the kept adapter split by its SVD each round (FlexLoRA's split)
    "tuned+orth": [*KEPT, "lora.rebalance=orth"],  # the same SVD, A's rows orthonormal at a fresh draw's norm
    "lora_hb+orth": ["method=lora_hb", "lora.rebalance=orth"],  # the same on lora_hb's global adapter
    "lora_hb+moments": ["method=lora_hb", "train.optimizer_state=kept"],
    # non-iid: FedAvg's weights by shard size |D_i| in place of samples trained (slow servers' data not tilted
    # away from); run with --alpha and read the worst server's held-out loss
    "tuned+weights=data": [*KEPT, "aggregation.weights=data"],
    "lora_hb+weights=data": ["method=lora_hb", "aggregation.weights=data"],
    # one frozen A shared by every server, only B trains and travels (B's change at the top rank both ways)
    "tuned+shared_a": ["method=fedpipe", "plan.variant=tuned", "lora.carry=shared_a"],
    # planned for a flat step cost (t0 far above a step's FLOPs time): read its flat-step clock only
    "carry+auto@flat": [*KEPT, "plan.split=auto", "plan.step_overhead_s=10"],
    # issue 27: the step-cost shape measured in round 1 (plan.step_cost=measured), not given; run it with a
    # simulated fixed step cost (extra override clients.step_delay_s=...) and read the measured clock
    # (the tuned default's lora.rebalance applies: orth since 2026-12-05; the H200 table predates it)
    "tuned+measured": ["method=fedpipe", "plan.variant=tuned", "plan.step_cost=measured"],
    # the same, fitted as first built: least squares on round 1's steps only (plan.step_fit=round1)
    "tuned+measured@round1": ["method=fedpipe", "plan.variant=tuned", "plan.step_cost=measured",
                              "plan.step_fit=round1"],
    # issue 27, importance that matters or an honest no: Algorithm 1's greedy placement per (layer, weight) in
    # importance order (Eqn 3-7), a seeded random order, or the fixed q, v, k, o order; run them with a step
    # budget under which only part of the adapters fit (extra overrides: plan.step_time_s=... clients.tflops=...)
    # beside tuned+carry=adapter (spread: every weight at the rank all fit at); all at lora.rebalance=none, as measured
    "greedy@layer": ["method=fedpipe", "plan.variant=tuned", "plan.rank_alloc=greedy", "plan.granularity=layer",
                     "lora.rebalance=none"],
    "greedy@layer+random": ["method=fedpipe", "plan.variant=tuned", "plan.rank_alloc=greedy",
                            "plan.granularity=layer", "plan.importance=random", "lora.rebalance=none"],
    "greedy@layer+fixed": ["method=fedpipe", "plan.variant=tuned", "plan.rank_alloc=greedy",
                           "plan.granularity=layer", "plan.importance=fixed", "lora.rebalance=none"],
    # the default's own allocator (spread) with a budget a little above the default's: every weight at the rank
    # all fit at, the leftover placed by importance (tuned+carry=adapter), a seeded random order, or the fixed
    # q, v, k, o order, per weight type or per (layer, weight) (run with plan.step_time_s=... clients.tflops=...)
    "spread+random": [*KEPT, "plan.importance=random"],
    "spread+fixed": [*KEPT, "plan.importance=fixed"],
    "spread@layer": [*KEPT, "plan.granularity=layer"],
    "spread@layer+random": [*KEPT, "plan.granularity=layer", "plan.importance=random"],
    # capacity: the heterogeneous-rank baselines tier ranks from max(lora.ranks) = 16 (so every equal server
    # gets 16), the others train lora.rank = 8. The baselines with their top rank at 8, and the default and
    # lora_hb at rank 16 (the default's budget is uniform LoRA at lora.rank, so spread gives 16 everywhere)
    "hetlora@r8": ["method=hetlora", "lora.ranks=[8,6,4,2]"],
    "flexlora@r8": ["method=flexlora", "lora.ranks=[8,6,4,2]"],
    "flora@r8": ["method=flora", "lora.ranks=[8,6,4,2]"],
    "tuned@r16": [*KEPT, "lora.rank=16"],
    "lora_hb@r16": ["method=lora_hb", "lora.rank=16"],
}  # plan.variant=tuned is spread+weights=samples (config.PLAN_VARIANTS)


def memory_budgets(stories: Path, precisions: list[str], *, batch: int, rank: int, seq_len: int) -> list[float]:
    """GB budgets under which precision=auto picks `precisions` for a rank-`rank` LoRA plan at `batch`: a
    quarter of the way from that precision's predicted peak to the next-more-bits one's (fp32: 24 GB)."""
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import memory_bytes, model_shape
    from fedpipe_dist.algorithm.planner import PRECISION_ORDER
    from fedpipe_dist.models import meta_model

    model = meta_model(str(stories / "models" / "stories260K-hf"), log=lambda *_: None)
    sites = find_sites(model)
    shape = model_shape(model, sites)
    ranks = {s.key: rank for s in sites}
    need = {p: memory_bytes(shape, precision=p, ranks=ranks, batch=batch, seq_len=seq_len)
            for p in PRECISION_ORDER}
    out = []
    for p in precisions:
        i = PRECISION_ORDER.index(p)
        out.append(24.0 if i == 0 else (need[p] + 0.25 * (need[PRECISION_ORDER[i - 1]] - need[p])) / 2**30)
    return out


def work_units(r: Results) -> np.ndarray:
    """Per round row, the work-unit clock in samples' worth of the fastest server's time: the largest
    steps x batch x slowdown over the servers that trained (they run in parallel; a slowdown-s server takes s
    times as long per sample). The centralized limit has one machine at the fastest speed: its samples."""
    c = r.clients
    if r.attrs.get("method") == "central":
        out = c["samples"].sum(axis=1).astype(float)
    else:
        slow = np.asarray(r.profile["slowdown"], dtype=float)
        out = (c["samples"] * slow[None, :]).max(axis=1).astype(float)  # samples = steps x batch
    out[0] = 0.0
    return out


def step_units(r: Results) -> np.ndarray:
    """Per round row, the flat-step clock in steps of the fastest server: a step costs the same at any batch
    (a GPU on a small model, or a large fixed cost per step), so a round takes the largest steps x slowdown over
    the servers that trained. The centralized limit: its steps (one union batch per step)."""
    c = r.clients
    steps = np.where(c["samples"] > 0, c["local_steps"], 0).astype(float)
    if r.attrs.get("method") == "central":
        out = steps.max(axis=1)
    else:
        out = (steps * np.asarray(r.profile["slowdown"], dtype=float)[None, :]).max(axis=1)
    out[0] = 0.0
    return out


def affine_units(r: Results, o: float) -> np.ndarray:
    """Per round row, the clock where a step of batch b costs o + b samples' worth of the fastest server's time
    (t(b) = t0 + c b with o = t0 / c): a round takes the largest slowdown x (steps x o + samples) over the servers
    that trained. o = 0 is the work-unit clock; as o grows it tends to o x the flat-step clock. The centralized
    limit: one machine, its steps x o plus its samples."""
    c = r.clients
    steps = np.where(c["samples"] > 0, c["local_steps"], 0).astype(float)
    if r.attrs.get("method") == "central":
        out = steps.max(axis=1) * o + c["samples"].sum(axis=1)
    else:
        slow = np.asarray(r.profile["slowdown"], dtype=float)[None, :]
        out = (slow * (steps * o + c["samples"])).max(axis=1)
    out = out.astype(float)
    out[0] = 0.0
    return out


# The step-cost shapes between the two deterministic clocks (o: a step's fixed cost in samples' worth), read from
# the same runs. For scale: a GPU of 156 TFLOP/s (half an A100's bf16 peak) computes a stories260K sample (5.4e8
# FLOPs) in 3.5 us, so any fixed step cost above ~0.1 ms (launches, the optimizer) puts it at o > 30.
AFFINE_O = (1.0, 4.0, 32.0)


def curve(path: Path) -> dict:
    """Cumulative training time (measured, and in work units) and eval loss per round, and the per-round
    counters, from results.h5."""
    r = Results(path)
    rows, c = r.rounds, r.clients
    t = np.cumsum(round_train_s(r))
    local = c["local_s"][1:]
    idle = [float(np.sum(np.nanmax(x) - x[np.isfinite(x)]) / (np.isfinite(x).sum() * np.nanmax(x)))
            if np.isfinite(x).any() else math.nan for x in local]
    return {"time_s": t.tolist(), "work": np.cumsum(work_units(r)).tolist(),
            "flat": np.cumsum(step_units(r)).tolist(), "eval_loss": rows["eval_loss"].tolist(),
            **{f"o={o:g}": np.cumsum(affine_units(r, o)).tolist() for o in AFFINE_O},
            "samples": c["samples"][1:].sum(axis=1).tolist(), "idle_fraction": idle,
            "bytes": (rows["bytes_up"][1:] + rows["bytes_down"][1:]).tolist(),
            "batch_size": c["batch_size"][1].tolist(), "local_steps": c["local_steps"][1].tolist(),
            "quant_bits": c["quant_bits"][1].tolist(), "under_training": rows["under_training_rate"][1:].tolist(),
            # each server's own-data eval loss per round (a results.h5 written before the column: none)
            "own": c["eval_loss_own"].tolist() if "eval_loss_own" in c else None,
            # ... and on its held-out own examples (data.own_eval_samples; none before the column or without them)
            "heldout": (c["eval_loss_heldout"].tolist() if "eval_loss_heldout" in c
                        and np.isfinite(c["eval_loss_heldout"]).any() else None)}


TOLERANCE = 1e-3  # nats: a loss this close to the target reaches it (far below the eval sample's se, ~0.01), so a
# method that trains as LoRA does (lora_hb on equal servers) is not sent one round further by float rounding


def time_to(cv: dict, target: float, clock: str = "time_s") -> float:
    """Training time (`clock`: time_s measured, work in work units) at the first evaluated round whose eval
    loss is at or below `target` (NaN: never)."""
    for t, loss in zip(cv[clock][1:], cv["eval_loss"][1:]):
        if np.isfinite(loss) and loss <= target + TOLERANCE:
            return float(t)
    return math.nan


def loss_at(cv: dict, when: float, clock: str = "time_s") -> float:
    """Eval loss of the last evaluated round finished by training time `when` on `clock` (the base's loss
    before any)."""
    best = cv["eval_loss"][0]
    for t, loss in zip(cv[clock], cv["eval_loss"]):
        if t <= when + 1e-12 and np.isfinite(loss):
            best = loss
    return float(best)


def worst_own_at(cv: dict, when: float, clock: str, key: str = "own") -> float:
    """The highest own-data eval loss over the servers (key own: clients/eval_loss_own, the eval sample reweighted
    to each server's keys; heldout: clients/eval_loss_heldout, its held-out own examples) at the last evaluated
    round finished by `when` on `clock` (the base's before any); NaN without the column."""
    if not cv.get(key):
        return math.nan
    best = float(np.nanmax(cv[key][0]))
    for t, loss, own in zip(cv[clock], cv["eval_loss"], cv[key]):
        if t <= when + 1e-12 and np.isfinite(loss):
            best = float(np.nanmax(own))
    return best


CLOCKS = ("time_s", "work", "flat")  # measured seconds (clients.throttle=clock), work units (work_units: a step's
# time grows with its batch, as on one CPU thread), flat steps (step_units: a step costs the same at any batch)


def interleaved(names: list[str], i: int) -> list[str]:
    """The methods' order for seed i: rotated by i and reversed on odd i, so that no method always runs
    in the same place of the sequence (machine load drifts; the work-unit clock does not see it anyway)."""
    k = i % len(names) if names else 0
    order = names[k:] + names[:k]
    return order[::-1] if i % 2 else order


def profile_memory(data: Path, prof: str) -> list[float]:
    """The profile's memory budgets in GB (memory_budgets at batch 8, rank 8, 256 tokens)."""
    return memory_budgets(data, PROFILES[prof]["precisions"], batch=8, rank=8, seq_len=256)


def job_args(data: Path, prof: str, *, local_steps: int = 10, train_samples: int = 4000, eval_samples: int = 200,
             alpha: float | None = None, own_eval_samples: int | None = None, extra=()) -> list[str]:
    """The job file and overrides every run of profile `prof` shares (before its method's and its seed)."""
    slow = PROFILES[prof]["slowdown"]
    common = ["jobs/e2e_stories260k.yaml", f"model.name_or_path={data / 'models' / 'stories260K-hf'}",
              f"data.train_path={data / 'e2e' / 'trainset.csv'}", f"data.eval_path={data / 'e2e' / 'devset.csv'}",
              f"clients.n={len(slow)}", f"clients.slowdown={json.dumps(slow)}",
              f"clients.memory_gb={json.dumps(profile_memory(data, prof))}",
              "clients.throttle=clock", f"train.local_steps={local_steps}",
              f"data.max_train_samples={train_samples}", f"eval.max_samples={eval_samples}", "eval.every=1",
              "eval.precision=fp32", "output.save_final=false", *extra]
    if alpha is not None:
        common += ["data.partition=dirichlet", f"data.dirichlet_alpha={alpha}", "data.rare_to_slow=true"]
    own_eval = own_eval_samples if own_eval_samples is not None else (32 if alpha is not None else 0)
    if own_eval:
        common.append(f"data.own_eval_samples={own_eval}")
    return common


def run_method(name: str, overrides: list[str], common: list[str], out: Path, *, first_rounds: int,
               stop, max_rounds: int, reuse: bool | str = False, resumable: bool = True) -> dict:
    """Run a method for `first_rounds`, then extend it one chunk at a time (resume=true) until stop(curve).
    `reuse`: a finished run already in `out` is read (and extended if it must be) instead of run again;
    "only": read it as it is, run nothing. Not `resumable` (central=true keeps no checkpoints): an extension
    runs the longer job again from the start."""
    old = out / "results.h5"
    if reuse == "only":
        if not old.exists():
            raise SystemExit(f"time_to_quality: --report-only, but {old} does not exist")
        return curve(old)
    if reuse and old.exists() and bool(Results(old).attrs.get("finished", False)):
        rounds = len(Results(old).rounds["round"]) - 1
    else:
        rounds = first_rounds
        process_job([*common, *overrides, f"rounds={rounds}", f"output.dir={out}", "output.overwrite=true"], name)
    cv = curve(out / "results.h5")
    while not stop(cv) and rounds < max_rounds:
        rounds = min(max_rounds, rounds + max(2, rounds // 3))
        more = ["resume=true"] if resumable else ["output.overwrite=true"]
        process_job([*common, *overrides, f"rounds={rounds}", f"output.dir={out}", *more], f"{name} (extended)")
        cv = curve(out / "results.h5")
    return cv


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories-path", default=os.environ.get("FEDPIPE_SHARED_DATA"),
                    help="folder holding models/stories260K-hf and e2e/ (default $FEDPIPE_SHARED_DATA)")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=None, help=f"from {list(METHODS)} (default: all)")
    ap.add_argument("--ablation", action="store_true", help=f"run docs/planner.md's switch set {list(ABLATION)}")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows of the ablation set")
    ap.add_argument("--reuse", action="store_true",
                    help="read finished runs already in --workdir instead of running them again (same settings!)")
    ap.add_argument("--report-only", action="store_true", help="read the runs in --workdir as they are; run nothing")
    ap.add_argument("--stop-clocks", nargs="+", default=list(CLOCKS), choices=list(CLOCKS),
                    help="the clocks a run is extended on until it has reached the target past T_R / bound (or spent "
                         "1.25 T_R): leave out time_s when the machine is not quiet (its noise decides the length)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="non-iid: a Dirichlet(alpha) split over E2E's food type, dealt so that the slower a server, "
                         "the rarer its keys (data.rare_to_slow); adds each server's own-data loss to the table")
    ap.add_argument("--own-eval-samples", type=int, default=None,
                    help="per server, examples of its shard held out and scored every round (data.own_eval_samples; "
                         "default 32 with --alpha, else 0): adds the worst server's held-out loss to the table")
    ap.add_argument("--target-rounds", type=int, default=8, help="R: the target is LoRA's eval loss after R rounds")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / "out" / "time_to_quality"))
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/out/time_to_quality[_ablation].json)")
    ap.add_argument("extra", nargs="*", help="more dotted overrides for every run")
    a = ap.parse_args(argv)
    if not a.stories_path or not (Path(a.stories_path) / "models" / "stories260K-hf").is_dir():
        raise SystemExit("time_to_quality: needs the pretrained stories260K and E2E data; pass --stories-path DIR "
                         "(the folder holding models/stories260K-hf and e2e/) or set FEDPIPE_SHARED_DATA")
    data = Path(a.stories_path).resolve()
    table = {m: ABLATION[m] for m in (a.rows or ABLATION)} if a.ablation else \
        {m: METHODS[m] for m in (a.methods or METHODS)}
    out_json = Path(a.out or REPO / "benchmarks" / "out" / f"time_to_quality{'_ablation' if a.ablation else ''}.json")
    work = Path(a.workdir)
    results: dict = {"args": vars(a), "profiles": {}}
    for seed, prof in ((seed, prof) for seed in a.seeds for prof in a.profiles):  # every profile early on
        slow = PROFILES[prof]["slowdown"]
        mem, bound = profile_memory(data, prof), compute_bound(slow)
        common = job_args(data, prof, local_steps=a.local_steps, train_samples=a.train_samples,
                          eval_samples=a.eval_samples, alpha=a.alpha, own_eval_samples=a.own_eval_samples,
                          extra=a.extra)
        label = prof if a.alpha is None else f"{prof}-alpha{a.alpha:g}"  # its own folder: a non-iid run
        pres = results["profiles"].setdefault(label, {"slowdown": slow, "memory_gb": mem, "compute_bound": bound,
                                                      "seeds": {}})
        seed_args = [*common, f"seed={seed}"]
        t0 = time.perf_counter()
        lora = run_method("lora", METHODS["lora"], seed_args, work / label / f"seed{seed}" / "lora",
                          first_rounds=a.target_rounds, stop=lambda cv: True, max_rounds=a.target_rounds,
                          reuse="only" if a.report_only else a.reuse)
        target = lora["eval_loss"][a.target_rounds]
        refs = {clock: lora[clock][a.target_rounds] for clock in CLOCKS}  # T_R on each clock
        o_refs = {o: lora[f"o={o:g}"][a.target_rounds] for o in AFFINE_O}
        stop_refs = {k: refs[k] for k in a.stop_clocks}
        t_ref = refs["time_s"]
        equal = t_ref / bound  # the ideal method's time to LoRA's R-round loss: the equal wall-clock column
        runs = {"lora": lora}
        for name in interleaved([m for m in table if m != "lora"], seed):
            def stop(cv, refs=stop_refs, target=target):  # on each stop clock: reached and past T_R / bound,
                return all((math.isfinite(time_to(cv, target, k)) and cv[k][-1] >= ref / bound)  # or 1.25 T_R
                           or cv[k][-1] >= 1.25 * ref for k, ref in refs.items())
            runs[name] = run_method(name, table[name], seed_args, work / label / f"seed{seed}" / name,
                                    first_rounds=a.target_rounds, stop=stop, max_rounds=12 * a.target_rounds,
                                    reuse="only" if a.report_only else a.reuse, resumable=name != "central")
        rows = {}
        for name, cv in runs.items():
            ttt = time_to(cv, target)
            ttw = time_to(cv, target, "work")
            rows[name] = {"time_to_target_s": ttt, "speedup": t_ref / ttt if math.isfinite(ttt) else math.nan,
                          "time_to_target_work": ttw,
                          "speedup_work": refs["work"] / ttw if math.isfinite(ttw) else math.nan,
                          "speedup_flat": (refs["flat"] / ttf if math.isfinite(ttf := time_to(cv, target, "flat"))
                                           else math.nan),
                          "loss_at_equal_work": loss_at(cv, refs["work"] / bound, "work"),
                          "loss_at_equal_time": loss_at(cv, equal), "rounds": len(cv["time_s"]) - 1,
                          "loss_at_equal_flat": loss_at(cv, refs["flat"] / bound, "flat"),
                          "speedup_affine": {f"{o:g}": (o_refs[o] / tto if math.isfinite(tto := time_to(
                              cv, target, f"o={o:g}")) else math.nan) for o in AFFINE_O},
                          "worst_own_at_equal_work": worst_own_at(cv, refs["work"] / bound, "work"),
                          "worst_own_at_equal_flat": worst_own_at(cv, refs["flat"] / bound, "flat"),
                          "worst_heldout_at_equal_work": worst_own_at(cv, refs["work"] / bound, "work", "heldout"),
                          "worst_heldout_at_equal_flat": worst_own_at(cv, refs["flat"] / bound, "flat", "heldout"),
                          "loss_at_round_R": cv["eval_loss"][min(a.target_rounds, len(cv["eval_loss"]) - 1)],
                          "samples_per_s": float(np.sum(cv["samples"]) / cv["time_s"][-1]),
                          "idle_fraction": float(np.nanmean(cv["idle_fraction"])),
                          "bytes_per_round": float(np.mean(cv["bytes"])),
                          "under_training": float(np.nanmean(cv["under_training"])), "curve": cv}
        pres["seeds"][seed] = {"target": target, "t_ref_s": t_ref, "t_ref_work": refs["work"], "equal_time_s": equal,
                               "order": list(runs), "methods": rows}
        print(f"[{label} seed {seed}] target {target:.4f} (lora after {a.target_rounds} rounds, {t_ref:.1f} s); "
              f"bound {bound:.3f}; {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for name, row in rows.items():
            print(f"  {name:24s} speedup {row['speedup']:.3f} (work units {row['speedup_work']:.3f}; flat steps "
                  f"{row['speedup_flat']:.3f}; "
                  f"{row['speedup'] / bound:.2f} of bound)  "
                  f"loss@{equal:.1f}s {row['loss_at_equal_time']:.4f}  rounds {row['rounds']}",
                  file=sys.stderr, flush=True)
        write_json(out_json, results, default=float)  # after every seed: nothing lost
    print(markdown(results))
    return results


def _mean_spread(vals: list[float]) -> str:
    v = np.asarray([x for x in vals if math.isfinite(x)], dtype=float)
    if len(v) < len(vals):
        return f"{np.mean(v):.3f} ± {np.std(v):.3f} ({len(vals) - len(v)} not reached)" if len(v) else "not reached"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def markdown(results: dict) -> str:
    """One table per profile: mean ± std over seeds of each method's numbers."""
    out = []
    for prof, p in results["profiles"].items():
        seeds = list(p["seeds"].values())
        bound = p["compute_bound"]
        out.append(f"\n{prof}: slowdowns {p['slowdown']}, compute bound {bound:.3f}, {len(seeds)} seed(s); target "
                   f"{_mean_spread([s['target'] for s in seeds])} (LoRA's eval loss after its R rounds)\n")
        out.append("| method | speedup to target (x LoRA), measured | in work units | in flat steps | "
                   "share of bound (measured) | "
                   "eval loss at T_R/bound, measured | in work units | eval loss after R rounds | rounds run | "
                   "samples/s | idle fraction | KiB/round | under-training |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in [m for m in {**METHODS, **ABLATION} if any(m in s["methods"] for s in seeds)]:
            rows = [s["methods"][name] for s in seeds if name in s["methods"]]
            sp = [r["speedup"] for r in rows]
            work = [r.get("speedup_work", math.nan) for r in rows]
            flat = [r.get("speedup_flat", math.nan) for r in rows]
            out.append(f"| {name} | {_mean_spread(sp)} | {_mean_spread(work)} | {_mean_spread(flat)} | "
                       f"{_mean_spread([x / bound for x in sp])} | "
                       f"{_mean_spread([r['loss_at_equal_time'] for r in rows])} | "
                       f"{_mean_spread([r.get('loss_at_equal_work', math.nan) for r in rows])} | "
                       f"{_mean_spread([r['loss_at_round_R'] for r in rows])} | "
                       f"{np.mean([r['rounds'] for r in rows]):.1f} | "
                       f"{np.mean([r['samples_per_s'] for r in rows]):.1f} | "
                       f"{np.mean([r['idle_fraction'] for r in rows]):.2f} | "
                       f"{np.mean([r['bytes_per_round'] for r in rows]) / 1024:.0f} | "
                       f"{np.mean([r['under_training'] for r in rows]):.2f} |")
        out.extend(_affine_table(seeds))
        out.extend(_own_table(p, seeds))
    return "\n".join(out)


def _affine_table(seeds: list[dict]) -> list[str]:
    """Speedup x LoRA where a step of batch b costs o + b samples' worth (affine_units), from work units (o = 0) to
    flat steps (o -> inf), mean ± std over the seeds (none for runs recorded before these clocks)."""
    names = [m for m in {**METHODS, **ABLATION} if any("speedup_affine" in s["methods"].get(m, {}) for s in seeds)]
    if not names:
        return []
    os_ = list(next(s["methods"][m]["speedup_affine"] for s in seeds for m in names
                    if "speedup_affine" in s["methods"].get(m, {})))
    out = ["", "Speedup x LoRA by step-cost shape (a step of batch b costs o + b samples' worth of the fastest "
           "server):", "", "| method | o = 0 (work units) | " + " | ".join(f"o = {o}" for o in os_) + " | flat steps |",
           "|---" * (len(os_) + 3) + "|"]
    for name in names:
        rows = [s["methods"][name] for s in seeds if "speedup_affine" in s["methods"].get(name, {})]
        cells = [_mean_spread([r["speedup_work"] for r in rows]),
                 *(_mean_spread([r["speedup_affine"][o] for r in rows]) for o in os_),
                 _mean_spread([r["speedup_flat"] for r in rows])]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _own_table(p: dict, seeds: list[dict]) -> list[str]:
    """Where servers hold different data: the global eval loss and the worst server's own-data loss at
    T_R / bound on the work-unit and flat-step clocks (none when no run recorded own-data losses)."""
    names = [m for m in {**METHODS, **ABLATION} if any(m in s["methods"] for s in seeds)]
    if not any(math.isfinite(s["methods"][m].get("worst_own_at_equal_work", math.nan))
               for s in seeds for m in names if m in s["methods"]):
        return []
    held = any(math.isfinite(s["methods"][m].get("worst_heldout_at_equal_work", math.nan))
               for s in seeds for m in names if m in s["methods"])
    cols = ["loss_at_equal_work", "worst_own_at_equal_work", *(["worst_heldout_at_equal_work"] if held else []),
            "loss_at_equal_flat", "worst_own_at_equal_flat", *(["worst_heldout_at_equal_flat"] if held else [])]
    heads = {"loss_at_equal_work": "global eval loss at T_R/bound, work units",
             "loss_at_equal_flat": "global, flat steps",
             "worst_own_at_equal_work": "worst server's own-data loss", "worst_own_at_equal_flat": "worst own-data",
             "worst_heldout_at_equal_work": "worst server's held-out own loss",
             "worst_heldout_at_equal_flat": "worst held-out own"}
    out = ["", "| method | " + " | ".join(heads[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        rows = [s["methods"][name] for s in seeds if name in s["methods"]]
        out.append(f"| {name} | " + " | ".join(_mean_spread([r.get(k, math.nan) for r in rows]) for k in cols) + " |")
    return out


if __name__ == "__main__":
    main()
