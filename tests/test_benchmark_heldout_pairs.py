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
