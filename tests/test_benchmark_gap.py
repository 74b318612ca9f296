"""Checks benchmarks/federated_gap.py's bookkeeping (no training): the paired gap and its standard error by hand,
the table, and its refusal to run without the data.

    .venv/bin/python -m pytest tests/test_benchmark_gap.py -q        (a few seconds)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ._util import REPO, load_benchmark, run_without_data

SCRIPT = REPO / "benchmarks" / "federated_gap.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("federated_gap")


def test_paired_gap_by_hand(bench):
    """Two examples of 10 and 30 tokens: a sums 12 and 33 nats, the limit 10 and 30, so D = 5 / 40 = 0.125;
    residuals d_i - D n_i = 2 - 1.25 and 3 - 3.75 = +0.75 and -0.75, se = sqrt(2 * 0.5625 * 2 / 1) / 40."""
    n = np.array([10.0, 30.0])
    gap, se = bench.paired_gap((np.array([12.0, 33.0]), n), (np.array([10.0, 30.0]), n))
    assert gap == pytest.approx(0.125)
    assert se == pytest.approx(math.sqrt(2 * 0.5625 * 2) / 40)
    same, zero = bench.paired_gap((np.array([12.0, 33.0]), n), (np.array([12.0, 33.0]), n))
    assert same == 0.0 and zero == 0.0
    with pytest.raises(AssertionError, match="different examples"):
        bench.paired_gap((np.array([1.0]), np.array([3.0])), (np.array([1.0]), np.array([4.0])))


def test_markdown_rows(bench):
    runs = {"S1": {"central": {"0": {"loss": 2.70}, "1": {"loss": 2.72}},
                   "lora": {"0": {"loss": 2.72, "gap": 0.02, "se": 0.01},
                            "1": {"loss": 2.76, "gap": 0.04, "se": 0.01}}}}
    text = bench.markdown({"runs": runs})
    assert "| centralized limit (loss) | 2.7100 |" in text
    assert "| lora | +0.0300 ± 0.0100 (0.0100) |" in text


def test_without_the_data_it_says_what_is_missing(tmp_path):
    p = run_without_data(SCRIPT, tmp_path)
    assert p.returncode != 0 and "needs the pretrained stories260K" in p.stderr and "Traceback" not in p.stderr


def test_every_run_is_a_valid_job(bench):
    """Each method, variant and limit's overrides make a job that passes every check (a misspelt key or value
    would otherwise fail only after the runs before it had trained), and every note names a run the table has."""
    from fedpipe_dist.job import load_job

    rows = {**bench.RUNS, "central": bench.CENTRAL, "central-ft": ["method=ft", "central=true"]}
    for name, overrides in rows.items():
        cfg = load_job(REPO / "jobs" / "e2e_stories260k.yaml", ["train.local_steps=5", *overrides])
        methods = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
        assert methods and cfg.method == methods[-1], name
    assert load_job(REPO / "jobs" / "e2e_stories260k.yaml", bench.CENTRAL).central
    assert set(bench.NOTES) <= set(bench.RUNS) | {"peft-fedavg"}
    assert [n for n in bench.RUNS if bench.full_ft(n)] == ["ft", "ft+moments"]  # the runs scored against ft's limit
