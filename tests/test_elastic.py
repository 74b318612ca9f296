"""Layer: elastic resume (runtime/resume.py compose_state, io/checkpoint.py): a run continues on another number
of ranks, as a resubmitted Slurm job that got fewer or more nodes does (issue 17).

A run on 4 gloo ranks stopped after round 2 is resumed on 1 rank and on 2 ranks; a run on 1 rank is resumed on 4.
Each ends with the eval losses of the run that never stopped. The servers train at four base precisions (fp32,
fp16, NF8, NF4), so a new rank needs the fp32 weights from one old rank's file, the merged residuals from
another's and its servers' importance state from the ranks that hosted them.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_elastic.py -q      (about 3 minutes on 2 cores)
"""

import shutil
import subprocess

import numpy as np
import pytest

from fedpipe_dist.cli import main
from fedpipe_dist.io.checkpoint import complete_rounds, scan
from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, subprocess_env, torchrun_cmd

pytestmark = [pytest.mark.dist, pytest.mark.slow]

JOB = ["jobs/quickstart.yaml", "train.local_steps=4", "model.max_length=96", "data.synthetic_train_size=160",
       "eval.max_samples=24", "clients.slowdown=1", "clients.tflops=[1,2,3,4]",
       "clients.precision=[fp32,fp16,nf8,nf4]", "--no-progress",
       "lora.ranks=[2]", "lora.rank=2"]  # factored downlinks: checkpoints hold the merged updates (runtime/chain.py)
ATOL = 1e-6


def _run(nproc: int, out, *extra: str) -> None:
    args = ["run", *JOB, f"output.dir={out}", *extra]
    if nproc == 1:
        assert main(args) == 0
        return
    p = subprocess.run(torchrun_cmd(nproc, *args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic")
    _run(4, d / "whole4", "rounds=4")
    _run(4, d / "stopped4", "rounds=2")
    _run(1, d / "whole1", "rounds=4")
    _run(1, d / "stopped1", "rounds=2")
    return d


def _resume(runs, stopped: str, nproc: int, tmp_path) -> Results:
    out = tmp_path / f"{stopped}-on-{nproc}"
    shutil.copytree(runs / stopped, out)
    _run(nproc, out, "rounds=4", "resume=true")
    return Results(out / "results.h5")


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_four_rank_run_resumes_on_fewer_ranks(runs, tmp_path, nproc):
    whole = Results(runs / "whole4" / "results.h5")
    r = _resume(runs, "stopped4", nproc, tmp_path)
    assert list(r.rounds["round"]) == [0, 1, 2, 3, 4] and r.attrs["finished"]
    assert list(r.attrs["resumed_from"]) == [2]
    np.testing.assert_allclose(r.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(r.clients["ranks"], whole.clients["ranks"])
    np.testing.assert_array_equal(r.clients["quant_bits"], whole.clients["quant_bits"])


def test_a_one_rank_run_resumes_on_four_ranks(runs, tmp_path):
    r = _resume(runs, "stopped1", 4, tmp_path)
    assert list(r.rounds["round"]) == [0, 1, 2, 3, 4] and r.attrs["finished"]
    for whole in ("whole1", "whole4"):
        np.testing.assert_allclose(r.rounds["eval_loss"], Results(runs / whole / "results.h5").rounds["eval_loss"],
                                   rtol=0, atol=ATOL, err_msg=whole)
    # the new ranks' checkpoints replaced the old world size's once this attempt held two of its own
    out = tmp_path / "stopped1-on-4"
    assert complete_rounds(out) == [3, 4]
    assert {w for by_w in scan(out / "checkpoint").values() for w in by_w} == {4}


def test_the_old_world_sizes_checkpoint_stays_until_the_new_ranks_hold_two(runs, tmp_path):
    """After a resume on another number of ranks, the first new checkpoint may not be on every rank yet when a
    job dies: the old world size's round must still be there to resume from."""
    out = tmp_path / "one-more"
    shutil.copytree(runs / "stopped4", out)
    _run(1, out, "rounds=3", "resume=true")
    by_round = scan(out / "checkpoint")
    assert set(by_round[2]) == {4} and set(by_round[3]) == {1}, by_round
    assert complete_rounds(out) == [1, 2, 3]  # the old attempt's two, and the new one
