"""Layer: update sanitization (algorithm/sanitize.py) and the engine leaving bad updates out: a NaN update,
a 1000x update, and a server that misreports its norm, against a run without those servers. Issue 8,
acceptance 3.

Run: .venv/bin/python -m pytest tests/test_sanitize.py -q      (about 20 s)
"""

import math

import numpy as np
import pytest
import torch

from fedpipe_dist.algorithm.sanitize import screen, update_norm
from fedpipe_dist.config import ConfigError
from fedpipe_dist.job import load_job

from ._util import run_small


def test_screen_by_hand():
    assert screen([1.0, 1.2, 0.9, 1.1], max_ratio=10) == ["ok"] * 4
    # median of the finite norms [1, 1.1, 1.2, 1000] is 1.15: 1000 > 11.5 is an outlier, NaN and Inf are not finite
    assert screen([1.0, float("nan"), 1.2, 1000.0, 1.1, float("inf")], max_ratio=10) == \
        ["ok", "nonfinite", "ok", "outlier", "ok", "nonfinite"]
    assert screen([float("nan")], max_ratio=10) == ["nonfinite"]
    assert screen([0.0, 0.0, 5.0], max_ratio=10) == ["ok", "ok", "ok"]  # median 0: no ratio to judge by


def test_update_norm_of_factors_dense_and_adapter_states():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    d = torch.randn(3, 3, generator=g)
    assert update_norm({"0.q": (b, a)}) == pytest.approx(float((b @ a).norm()), rel=1e-6)
    assert update_norm({"w": d, "0.q": (b, a)}) == pytest.approx(math.hypot(float(d.norm()), float((b @ a).norm())),
                                                               rel=1e-6)
    start = {"1.mlp": {"up": torch.ones(2, 2)}}
    assert update_norm({"1.mlp": {"up": torch.ones(2, 2) * 3}}, start) == pytest.approx(4.0)  # ||3 - 1|| over 4
    assert math.isnan(update_norm({"0.q": (b * float("nan"), a)}))


def test_nan_and_huge_updates_are_rejected_recorded_and_harmless(tmp_path):
    """Server 1 sends NaN, server 2 sends 1000x its update: both are left out every round and recorded; the
    final eval loss matches a run in which servers 1 and 2 never take part (their plans do not fit)."""
    common = ["clients.precision=fp32", "rounds=3"]
    _, bad = run_small(tmp_path, "poisoned", *common, "faults.nan_clients=[1]", "faults.scale_clients=[2]")
    _, ref = run_small(tmp_path, "without", *common, "clients.memory_gb=[24,0.001,0.001,24]")
    c = bad.clients
    assert (c["rejected"][1:, 1] == 1).all() and (c["rejected"][1:, 2] == 1).all()
    assert (c["rejected"][1:, [0, 3]] == 0).all() and (bad.rounds["n_rejected"][1:] == 2).all()
    assert np.isnan(c["update_norm"][1:, 1]).all()
    assert (c["update_norm"][1:, 2] > 100 * c["update_norm"][1:, 0]).all()
    assert (c["completed"][1:] == 1).all()  # the servers did their work; their updates were left out
    assert np.isfinite(bad.last_eval_loss())
    assert abs(bad.last_eval_loss() - ref.last_eval_loss()) <= 0.02 * ref.last_eval_loss()
    assert bad.last_eval_loss() < bad.rounds["eval_loss"][0]


def test_a_server_misreporting_its_norm_is_caught_at_rank_0(tmp_path):
    """Server 2 sends a 1000x update but reports a normal norm: it passes the screen, and rank 0's own
    measurement of what arrived rejects it."""
    _, r = run_small(tmp_path, "liar", "clients.precision=fp32", "faults.scale_clients=[2]",
                     "faults.misreport_clients=[2]")
    assert (r.clients["rejected"][1:, 2] == 1).all() and (r.clients["rejected"][1:, [0, 1, 3]] == 0).all()
    assert np.isfinite(r.last_eval_loss()) and r.last_eval_loss() < r.rounds["eval_loss"][0]


def test_sanitization_settings_are_checked():
    with pytest.raises(ConfigError, match="faults.nan_clients"):
        load_job("jobs/quickstart.yaml", ["faults.nan_clients=[7]"])
    with pytest.raises(ConfigError, match="aggregation.max_norm_ratio"):
        load_job("jobs/quickstart.yaml", ["aggregation.max_norm_ratio=0.5"])


def test_without_sanitization_a_nan_update_poisons_the_model_but_nothing_crashes(tmp_path):
    """The control: sanitize=false lets server 1's NaN into the merge; every later loss is NaN (the run still
    finishes and records it: a diverged server's importance scores are NaN, not an SVD error)."""
    _, r = run_small(tmp_path, "open", "clients.precision=fp32", "rounds=2", "faults.nan_clients=[1]",
                     "aggregation.sanitize=false")
    assert np.isnan(r.rounds["eval_loss"][1:]).all() and (r.clients["rejected"][1:] == 0).all()
