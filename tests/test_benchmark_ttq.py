"""Checks benchmarks/time_to_quality.py's bookkeeping (no training): time to a target, loss at a time, the
memory budgets that force each base precision, the table, and its refusal to run without the data.

    .venv/bin/python -m pytest tests/test_benchmark_ttq.py -q        (a few seconds)
"""

from __future__ import annotations

import math

import pytest

from ._util import REPO, load_benchmark, run_without_data, shared_data

SCRIPT = REPO / "benchmarks" / "time_to_quality.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("time_to_quality")


CURVE = {"time_s": [0.0, 1.0, 2.5, 4.0], "eval_loss": [4.0, 3.0, float("nan"), 2.0]}


def test_time_to_and_loss_at_by_hand(bench):
    assert bench.time_to(CURVE, 3.0) == 1.0
    assert bench.time_to(CURVE, 2.5) == 4.0  # round 2 was not evaluated
    assert math.isnan(bench.time_to(CURVE, 1.0))  # never reached
    assert bench.time_to(CURVE, 3.0 - bench.TOLERANCE / 2) == 1.0  # within the tolerance: reached
    assert bench.time_to(CURVE, 3.0 - 2 * bench.TOLERANCE) == 4.0
    assert bench.time_to(CURVE, 4.0) == 1.0  # row 0 (the untrained base) never counts
    assert bench.loss_at(CURVE, 0.5) == 4.0  # before the first round: the base
    assert bench.loss_at(CURVE, 3.0) == 3.0  # round 2 has no eval: the last evaluated one
    assert bench.loss_at(CURVE, 10.0) == 2.0


def test_markdown_means_and_spread(bench):
    row = {"speedup": 2.0, "loss_at_equal_time": 2.1, "loss_at_round_R": 2.3, "rounds": 10, "samples_per_s": 100.0,
           "idle_fraction": 0.1, "bytes_per_round": 2048.0, "under_training": 0.0}
    seeds = {s: {"target": 2.2, "methods": {"lora": dict(row, speedup=1.0), "fedpipe": dict(row, speedup=sp)}}
             for s, sp in ((0, 2.0), (1, float("nan")), (2, 3.0))}
    text = bench.markdown({"profiles": {"p4": {"slowdown": [1, 1.5, 2, 3], "compute_bound": 1.875, "seeds": seeds}}})
    fedpipe = [line for line in text.splitlines() if line.startswith("| fedpipe |")][0]
    assert "2.500 ± 0.500 (1 not reached)" in fedpipe  # mean and std of the seeds that reached it
    assert "| 2 |" in fedpipe  # 2048 bytes = 2 KiB per round


def test_worst_own_data_loss_and_its_table_by_hand(bench):
    cv = dict(CURVE, work=CURVE["time_s"], own=[[4.0, 4.5], [3.0, 3.4], [9.0, 9.0], [2.0, 2.2]])
    assert bench.worst_own_at(cv, 0.5, "work") == 4.5  # the base
    assert bench.worst_own_at(cv, 3.0, "work") == 3.4  # round 2 was not evaluated
    assert bench.worst_own_at(cv, 10.0, "work") == 2.2
    assert math.isnan(bench.worst_own_at(dict(cv, own=None), 10.0, "work"))  # written before the column
    row = {"speedup": 1.0, "loss_at_equal_time": 2.1, "loss_at_round_R": 2.3, "rounds": 10, "samples_per_s": 1.0,
           "idle_fraction": 0.1, "bytes_per_round": 1.0, "under_training": 0.0, "loss_at_equal_work": 2.0,
           "worst_own_at_equal_work": 2.4, "loss_at_equal_flat": 2.5, "worst_own_at_equal_flat": 2.9}
    p = {"slowdown": [1, 2], "compute_bound": 1.5, "seeds": {0: {"target": 2.2, "methods": {"lora": row}}}}
    text = bench.markdown({"profiles": {"p4-alpha0.1": p}})
    assert "| lora | 2.000 | 2.400 | 2.500 | 2.900 |" in text.splitlines()
    # with held-out own examples (data.own_eval_samples): their worst server beside each clock's own-data column
    cv_held = dict(cv, heldout=[[5.0, 4.0], [3.0, 3.1], [9.0, 9.0], [2.6, 2.1]])
    assert bench.worst_own_at(cv_held, 3.0, "work", "heldout") == 3.1
    held = dict(row, worst_heldout_at_equal_work=3.1, worst_heldout_at_equal_flat=3.3)
    text = bench.markdown({"profiles": {"p4-alpha0.1": dict(p, seeds={0: {"target": 2.2, "methods": {"lora": held}}})}})
    assert "| lora | 2.000 | 2.400 | 3.100 | 2.500 | 2.900 | 3.300 |" in text.splitlines()
    assert "worst server's held-out own loss" in text
    iid = dict(row, worst_own_at_equal_work=math.nan, worst_own_at_equal_flat=math.nan)
    assert "own-data" not in bench.markdown({"profiles": {"p4": dict(p, seeds={0: {"target": 2.2,
                                                                                  "methods": {"lora": iid}}})}})


@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data (stories260K-hf) or FEDPIPE_SHARED_DATA")
def test_memory_budgets_force_each_precision_for_rank8_lora(bench):
    """The p8 profile's budgets: precision=auto picks fp32, fp32, fp16, fp16, nf8, nf8, nf4, nf4 for rank-8
    LoRA at batch 8 and T 256, through the engine's own planner."""
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import model_shape
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.job import load_job
    from fedpipe_dist.models import meta_model
    from fedpipe_dist.runtime.heterogeneity import ServerProfile
    from fedpipe_dist.runtime.planning import RoundPlanner

    want = bench.PROFILES["p8"]["precisions"]
    gb = bench.memory_budgets(shared_data(), want, batch=8, rank=8, seq_len=256)
    model = meta_model(str(shared_data() / "models" / "stories260K-hf"), log=lambda *_: None)
    sites = find_sites(model)
    cfg = load_job(None, ["method=lora", "lora.rank=8", "model.max_length=256", "train.batch_max=8", "clients.n=8"])
    profiles = [ServerProfile(c, 0.1, int(g * 2**30), 1.0) for c, g in enumerate(gb)]
    planner = RoundPlanner(cfg, model_shape(model, sites), sites, profiles, hosted=list(range(8)))
    plans, infos, _ = planner.plan(LocalComm(), 1)
    assert [p.precision for p in plans] == want and all(i.fits for i in infos)


def test_without_the_data_it_says_what_is_missing(tmp_path):
    p = run_without_data(SCRIPT, tmp_path)
    assert p.returncode != 0 and "needs the pretrained stories260K" in p.stderr and "Traceback" not in p.stderr


def test_work_units_by_hand(bench, tmp_path):
    """A round's work: the largest steps x batch x slowdown over the servers that trained; central's: its samples."""
    import numpy as np

    class FakeResults:
        def __init__(self, method, samples, slowdown):
            self.attrs = {"method": method}
            self.clients = {"samples": np.array(samples)}
            self.profile = {"slowdown": np.array(slowdown)}

    r = FakeResults("lora", [[0, 0, 0], [80, 80, 0], [80, 40, 20]], [1.0, 2.0, 3.0])
    assert bench.work_units(r).tolist() == [0.0, 160.0, 80.0]  # row 0 is the base; round 2: max(80, 80, 60)
    c = FakeResults("central", [[0, 0, 0], [80, 80, 0], [80, 40, 20]], [1.0, 2.0, 3.0])
    assert bench.work_units(c).tolist() == [0.0, 160.0, 140.0]

    # a step of batch b costing o + b: round 2's servers took 10, 10, 10 steps of batch 8, 4, 2 (slowdowns 1, 2, 3)
    steps = [[0, 0, 0], [10, 10, 0], [10, 10, 10]]
    r.clients["local_steps"], c.clients["local_steps"] = np.array(steps), np.array(steps)
    assert bench.affine_units(r, 0.0).tolist() == bench.work_units(r).tolist()  # o = 0: the work-unit clock
    # o = 4: round 1 max(1 (40 + 80), 2 (40 + 80)) = 240; round 2 max(120, 2 (40 + 40), 3 (40 + 20)) = 180
    assert bench.affine_units(r, 4.0).tolist() == [0.0, 240.0, 180.0]
    big = 1e6  # o -> inf: o x the flat-step clock
    assert np.allclose(bench.affine_units(r, big) / big, [0.0, 20.0, 30.0], rtol=1e-3)
    assert bench.affine_units(c, 4.0).tolist() == [0.0, 200.0, 180.0]  # central: 10 steps x 4 + its samples


def test_interleaved_orders_differ_by_seed(bench):
    names = ["a", "b", "c"]
    orders = [bench.interleaved(names, i) for i in range(3)]
    assert orders == [["a", "b", "c"], ["a", "c", "b"], ["c", "a", "b"]]
    assert all(sorted(o) == names for o in orders) and orders[0][0] != orders[2][0]


def test_time_to_on_the_work_clock(bench):
    cv = dict(CURVE, work=[0.0, 10.0, 30.0, 50.0])
    assert bench.time_to(cv, 3.0, "work") == 10.0 and bench.loss_at(cv, 40.0, "work") == 3.0


def test_the_step_cost_shape_table(bench):
    """Speedups by o (affine_units) between the work-unit and flat-step columns; none for runs without them."""
    row = {"speedup": 1.0, "loss_at_equal_time": 2.1, "loss_at_round_R": 2.3, "rounds": 10, "samples_per_s": 1.0,
           "idle_fraction": 0.1, "bytes_per_round": 1.0, "under_training": 0.0, "speedup_work": 2.4,
           "speedup_flat": 0.8}
    seeds = {s: {"target": 2.2, "methods": {"lora_hb": dict(row, speedup_affine={"1": 2.0 + s, "32": 0.9})}}
             for s in (0, 1)}
    text = bench.markdown({"profiles": {"p4": {"slowdown": [1, 2], "compute_bound": 1.5, "seeds": seeds}}})
    assert "| lora_hb | 2.400 ± 0.000 | 2.500 ± 0.500 | 0.900 ± 0.000 | 0.800 ± 0.000 |" in text.splitlines()
    assert "o = 0 (work units) | o = 1 | o = 32 | flat steps" in text
    old = {0: {"target": 2.2, "methods": {"lora_hb": row}}}
    assert "step-cost shape" not in bench.markdown({"profiles": {"p4": {"slowdown": [1, 2], "compute_bound": 1.5,
                                                                        "seeds": old}}})


def test_every_row_is_a_valid_job(bench):
    """Each method and ablation row's overrides make a job that passes every check (a misspelt key or value
    would otherwise fail only after the rows before it had trained, up to an hour into a run)."""
    from fedpipe_dist.job import load_job

    rows = {**bench.METHODS, **bench.ABLATION}
    for name, overrides in rows.items():
        cfg = load_job(REPO / "jobs" / "e2e_stories260k.yaml", list(overrides))  # raises ConfigError, naming the key
        methods = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
        assert not methods or cfg.method == methods[-1], name
