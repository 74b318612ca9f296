"""Checks benchmarks/heldout_pairs.py: its paired difference and standard error by hand, the records matched to
their rounds, the process hook's per-example losses against the engine's own held-out means (a 2-round in-process
run), and its refusal to run without the data.

    .venv/bin/python -m pytest tests/test_benchmark_heldout_pairs.py -q        (about 15 s)
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from ._util import REPO, load_benchmark, run_small, run_without_data


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("heldout_pairs")


def test_paired_difference_and_its_standard_error_by_hand(bench):
    a = (np.array([4.0, 9.0, 2.0]), np.array([2.0, 3.0, 1.0]))  # summed losses, tokens
    b = (np.array([3.0, 9.0, 3.0]), np.array([2.0, 3.0, 1.0]))
    gap, se = bench.paired(a, b)
    # d = (1, 0, -1), 6 tokens: gap 0; residuals d - 0 n = d, so se = sqrt(2 x 3 / 2) / 6
    assert gap == pytest.approx(0.0) and se == pytest.approx(math.sqrt(3.0) / 6)
    with pytest.raises(AssertionError, match="different examples"):
        bench.paired(a, (b[0], np.array([2.0, 3.0, 2.0])))


def test_records_are_matched_to_rounds_by_their_held_out_means(bench, tmp_path):
    ex = {0: (np.ones(2), np.ones(2))}
    recs = [{"dir": str((tmp_path / "a").resolve()), "heldout": np.array([2.0, 3.0]), "examples": ex},
            {"dir": str((tmp_path / "b").resolve()), "heldout": np.array([1.0, 1.5]), "examples": {}},
            {"dir": str((tmp_path / "a").resolve()), "heldout": np.array([1.0, 1.5]), "examples": ex}]
    got = bench.by_round(recs, tmp_path / "a", [[2.0, 3.0], [1.0, 1.5], [0.5, 0.7]])
    assert sorted(got) == [0, 1] and got[1] is ex  # round 2 has no record; b's record is another run's


def test_runs_with_different_plans_are_paired_at_equal_time_not_at_equal_round(bench, tmp_path):
    """fedpipe's rounds cost half of lora_hb's on the flat clock: lora_hb's round t is paired with fedpipe's round 2t,
    and the equal-time point (LoRA's flat time to target over the bound) picks each method's own round there."""
    def ex(v):  # two servers, two one-token examples each, losses v and v + 1
        return {0: (np.array([v, v]), np.ones(2)), 1: (np.array([v + 1, v + 1]), np.ones(2))}

    held = {"lora_hb": [[3.0, 4.0], [2.0, 3.0], [1.5, 2.5]],
            "fedpipe": [[3.0, 4.0], [2.5, 3.5], [2.2, 3.2], [1.8, 2.8], [1.2, 2.2]]}
    records, methods = [], {}
    for k, rows in held.items():
        step = 2.0 if k == "lora_hb" else 1.0
        records += [{"dir": str((tmp_path / k).resolve()), "heldout": np.array(r), "examples": ex(r[0])} for r in rows]
        methods[k] = {"curve": {"flat": [step * t for t in range(len(rows))], "eval_loss": [1.0] * len(rows),
                                "heldout": rows}}
    methods["lora_hb"]["worst_heldout_at_equal_flat"] = 3.0  # its round 1 (flat 2.0 <= 4.0 / 1.6 = 2.5)
    methods["lora"] = {"curve": {"flat": [0.0, 2.0, 4.0], "eval_loss": [3.0, 2.0, 1.0]}}
    cell = {"target": 1.0, "t_ref_s": 8.0, "equal_time_s": 5.0, "methods": methods}  # bound 1.6
    res = bench.compare(cell, tmp_path, records, clock="flat")
    assert res["fedpipe_round_at"] == {"1": 2, "2": 4} and (res["equal_work_round"], res["fedpipe_round"]) == (1, 2)
    assert res["worst_server"] == res["fedpipe_worst_server"] == 1
    assert res["worst_gap"] == pytest.approx(3.2 - 3.0) and res["fedpipe_worst"] == 3.2
    assert res["fedpipe_lower"] == [2, 4]  # round 2 against fedpipe's 4: lower on both servers; round 1: higher


def test_the_hook_records_the_engines_held_out_losses(bench, tmp_path):
    from fedpipe_dist.runtime import setup

    original = setup.Run.evaluate
    try:
        bench.install(str(tmp_path / "examples"))
        cfg, res = run_small(tmp_path, "run", "rounds=2", "data.own_eval_samples=4")
    finally:
        setup.Run.evaluate = original
    records = [pickle.load(open(f, "rb")) for f in sorted((tmp_path / "examples").glob("*.pkl"))]
    curve = res.clients["eval_loss_heldout"].tolist()
    got = bench.by_round(records, tmp_path / "run", curve)
    assert sorted(got) == [0, 1, 2]
    for t, examples in got.items():
        assert sorted(examples) == list(range(cfg.clients.n))
        for c, (loss, tokens) in examples.items():
            assert len(loss) == 4 and tokens.min() > 0
            assert loss.sum() / tokens.sum() == pytest.approx(curve[t][c], rel=1e-6)  # the engine's mean


def test_without_the_data_it_says_what_is_missing(tmp_path):
    p = run_without_data(REPO / "benchmarks" / "heldout_pairs.py", tmp_path)
    assert p.returncode != 0 and "needs the pretrained stories260K" in p.stderr and "Traceback" not in p.stderr
