"""Layer: planning inside real runs (world size 1) and the `fedpipe plan` command; seconds to a minute.

Run: .venv/bin/python -m pytest tests/test_planning_run.py -q
"""

import subprocess
import sys

import numpy as np
import pytest

from fedpipe_dist.adapters.sites import KINDS
from fedpipe_dist.algorithm.planner import TIE_ORDER
from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.config import UserInputError
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.job import load_job
from fedpipe_dist.runtime.engine import run_job

from ._util import REPO, subprocess_env


def test_plan_command_for_llama2_7b_without_weights():
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "plan", "jobs/alpaca_llama2_7b.yaml"], cwd=REPO,
                       env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| server")]
    assert len(rows) == 16
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "yes"  # every plan fits its memory and FLOPs budget
        assert cells[5] in ("bf16", "nf8", "nf4") and int(cells[4]) >= 1  # loaded in bf16: no fp32 base
        assert float(cells[-2]) <= float(cells[3])  # predicted memory within the server's budget (GB)


def test_run_records_plans_and_weights_follow_importance(tmp_path):
    # the paper's greedy allocation: the variant where importance picks the weights
    cfg = load_job("jobs/quickstart.yaml", [
        "plan.variant=paper", "rounds=4", "train.local_steps=4", "data.synthetic_train_size=160",
        "data.synthetic_eval_size=16",
        "model.max_length=96", "eval.max_samples=16", "eval.every=4", f"output.dir={tmp_path}"])
    run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "results.h5")
    c = r.clients
    rounds = slice(1, None)
    for name in ("batch_size", "ranks", "importance", "quant_bits", "local_s", "completed", "wait_s"):
        assert name in c
    assert (c["batch_size"][rounds] == [8, 5, 4, 2]).all()  # floor(8 / slowdown) for slowdowns 1, 1.5, 2, 3
    assert (c["quant_bits"][rounds] == 32).all() and (c["completed"][rounds] == 1).all()
    assert np.isfinite(c["local_s"][rounds]).all() and (c["wait_s"][rounds] >= 0).all()
    # Round 1 has no measurements: equal scores, so the tie order (q, v first) decides.
    assert (c["importance"][1] == 0).all()
    assert (c["ranks"][1][:, :, 0] > 0).all() and (c["ranks"][1][:, :, 2] > 0).all()
    # Later rounds: the weight types chosen are the most important ones (type granularity: layer means).
    changed = False
    for t in range(2, r.rounds["round"].shape[0]):
        for k in range(cfg.clients.n):
            imp = c["importance"][t, k].mean(axis=0)  # per type q, k, v, o
            chosen = {KINDS[j] for j in range(4) if c["ranks"][t, k][:, j].max() > 0}
            order = sorted(KINDS, key=lambda m: (-imp[KINDS.index(m)], TIE_ORDER[m]))
            assert chosen == set(order[: len(chosen)]), (t, k, imp, chosen)
            prev = {KINDS[j] for j in range(4) if c["ranks"][t - 1, k][:, j].max() > 0}
            changed |= chosen != prev
    assert changed, "the importance order never changed the chosen weights"


SMALL = ["rounds=2", "train.local_steps=3", "data.synthetic_train_size=96", "data.synthetic_eval_size=16",
         "model.max_length=96", "eval.max_samples=16"]


def test_server_whose_plan_does_not_fit_memory_under_trains(tmp_path):
    cfg = load_job("jobs/quickstart.yaml", [*SMALL, "clients.memory_gb=[24, 24, 24, 0.0001]", f"output.dir={tmp_path}"])
    run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "results.h5")
    assert (r.clients["selected"][1:] == 1).all()
    assert (r.clients["completed"][1:] == [1, 1, 1, 0]).all()
    assert (r.rounds["under_training_rate"][1:] == 0.25).all()
    assert (r.clients["bytes_up"][1:, 3] == 0).all() and (r.clients["bytes_up"][1:, :3] > 0).all()
    assert r.rounds["eval_loss"][-1] < r.rounds["eval_loss"][0]  # the other three still train the model


def test_missed_deadline_is_under_training_and_leaves_the_base_alone(tmp_path):
    # A deadline shorter than one step: every server stops early and counts as under-trained.
    cfg = load_job("jobs/quickstart.yaml", [*SMALL, "train.deadline_s=1e-6", f"output.dir={tmp_path}"])
    with pytest.raises(UserInputError, match="train.deadline_s cut every server short"):  # exit 2, after results
        run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "results.h5")
    assert (r.clients["completed"][1:] == 0).all() and (r.clients["local_steps"][1:] < 3).all()
    assert (r.rounds["under_training_rate"][1:] == 1.0).all() and (r.rounds["bytes_up"][1:] == 0).all()
    np.testing.assert_allclose(r.rounds["eval_loss"], r.rounds["eval_loss"][0], rtol=1e-6)


@pytest.mark.dist
def test_rounds_wait_s_is_the_straggler_wait_servers_really_had(tmp_path):
    """Two servers on two gloo ranks, the second 3x slower: each round the fast rank waits for the slow one
    where the servers' reports are all-gathered; rounds/wait_s is that wait, so it matches the difference of
    the two servers' local training times (clients/local_s) within 20 %."""
    from ._util import torchrun_cmd

    out = tmp_path / "run"
    job = ["run", "jobs/quickstart.yaml", "rounds=3", "clients.n=2", "clients.slowdown=[1,3]", "clients.tflops=[1,1]",
           "clients.memory_gb=24",
           "plan.mode=uniform", "train.local_steps=20", "data.synthetic_train_size=64", "data.synthetic_eval_size=16",
           "eval.max_samples=16", "model.max_length=96", f"output.dir={out}", "--no-progress"]
    p = subprocess.run(torchrun_cmd(2, *job),
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = Results(out / "results.h5")
    local = r.clients["local_s"][1:]
    gap = local.max(axis=1) - local.min(axis=1)
    wait = r.rounds["wait_s"][1:]
    assert (gap > 0.2).all(), gap  # the slow server really is slower (same batch: plan.mode=uniform)
    np.testing.assert_allclose(wait, gap, rtol=0.2)
