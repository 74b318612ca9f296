"""Layer: a peer that stops answering, under torchrun with 4 gloo ranks: one rank is SIGSTOPped in the middle
of a run; the others must end the job within comm.timeout_s (plus slack) with an error that names the
stopped rank, and results.h5 must still open with every round completed before it. Issue 8, acceptance 2.

Run: .venv/bin/python -m pytest tests/test_failures.py -q      (about a minute)
"""

import subprocess
import time
from pathlib import Path

import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, kill_job, stop_and_wait, subprocess_env, torchrun_cmd

pytestmark = pytest.mark.dist


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launcher's child whose environment says RANK=<rank> (torchrun's worker for that rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _rounds_done(path: Path) -> int:
    try:
        return Results(path).n_rounds
    except Exception:  # not created yet, or being written this instant
        return 0


def test_a_stopped_rank_ends_the_job_with_its_name(tmp_path):
    out = tmp_path / "run"
    timeout_s = 15
    cmd = torchrun_cmd(4, "run", "jobs/quickstart.yaml", "rounds=200", "train.local_steps=2", "train.batch_max=4",
                       "data.synthetic_train_size=96", "model.max_length=64", "eval.max_samples=8",
                       "clients.slowdown=1", f"comm.timeout_s={timeout_s}", f"output.dir={out}", "--no-progress")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while _rounds_done(out / "results.h5") < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, "the job ended before a rank could be stopped"
        stopped = _worker_pid(proc.pid, 2)
        assert stopped is not None, "could not find rank 2's worker process"
    except BaseException:
        kill_job(proc)
        raise
    err, elapsed = stop_and_wait(proc, stopped, timeout_s + 90)
    assert proc.returncode != 0
    assert elapsed < timeout_s + 90
    print(f"ended {elapsed:.1f} s after SIGSTOP:", next(x for x in err.splitlines() if "no heartbeat" in x)[:400])
    assert "rank 2 on " in err and "no heartbeat for" in err, err[-3000:]
    assert "fedpipe: error:" in err and "results.h5 holds rounds 1-" in err
    done = Results(out / "results.h5")
    assert done.n_rounds >= 2 and not done.attrs["finished"]
    assert list(done.rounds["round"]) == list(range(done.n_rounds + 1))  # whole rounds only, in order
