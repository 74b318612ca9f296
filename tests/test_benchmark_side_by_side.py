"""Checks benchmarks/side_by_side.py's bookkeeping (no training): seconds per sample with the slowdown taken out,
the job arguments it shares with time_to_quality, and its refusal to run without the data.

    .venv/bin/python -m pytest tests/test_benchmark_side_by_side.py -q        (a few seconds)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ._util import REPO, load_benchmark, run_without_data, shared_data


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("side_by_side")


def test_seconds_per_sample_by_hand(bench):
    class FakeResults:  # row 0 is the base (no training), NaN where a server did not train
        clients = {"local_s": np.array([[np.nan, np.nan], [8.0, 12.0], [4.0, np.nan]]),
                   "samples": np.array([[0, 0], [80, 20], [40, 0]])}
        profile = {"slowdown": np.array([1.0, 3.0])}

    # server 0: 8 / 80 and 4 / 40 -> 0.1 s a sample; server 1: 12 / (20 x 3) = 0.2, its NaN round left out
    assert np.allclose(bench.per_sample_s(FakeResults()), [0.1, 0.2])


def test_without_the_data_it_says_what_is_missing(tmp_path):
    p = run_without_data(REPO / "benchmarks" / "side_by_side.py", tmp_path)
    assert p.returncode != 0 and "needs the pretrained stories260K" in p.stderr and "Traceback" not in p.stderr


def test_job_args_are_time_to_qualitys(bench):
    data = shared_data()
    if data is None:
        pytest.skip("needs ../shared/data (stories260K's config, for the memory budgets) or FEDPIPE_SHARED_DATA")
    args = bench.job_args(data, "p4", alpha=0.1)
    assert args[0] == "jobs/e2e_stories260k.yaml" and "clients.slowdown=[1, 1.5, 2, 3]" in args
    assert "data.dirichlet_alpha=0.1" in args and "data.own_eval_samples=32" in args  # held out with --alpha
    mem = json.loads(next(x for x in args if x.startswith("clients.memory_gb=")).split("=", 1)[1])
    assert len(mem) == 4 and all(m > 0 for m in mem)
    assert not any(x.startswith("data.") and "dirichlet" in x for x in bench.job_args(data, "h4"))
    assert not any(x.startswith("data.own_eval_samples") for x in bench.job_args(data, "h4"))


def test_clock_over_the_first_rounds(bench, monkeypatch):
    # round rows: 0 is the base (no training); --b-rounds 2 sums rounds 1 and 2 only
    monkeypatch.setattr(bench, "round_train_s", lambda r: np.array([0.0, 3.0, 4.0, 5.0]))
    assert bench.clock_s(None) == 12.0 and bench.clock_s(None, 2) == 7.0 and bench.clock_s(None, 3) == 12.0


def test_b_rounds_past_the_run_is_refused(tmp_path):
    import subprocess
    import sys

    # checked before the data: no --stories-path needed
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "side_by_side.py"),
                        "--rounds", "4", "--b-rounds", "5", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0 and "--b-rounds 5 must lie in 1..--rounds (4)" in p.stderr
