"""Layer: nothing lost, nothing silently wrong (issue 18): verified checkpoints, resume that never destroys
what it cannot rebuild, one writer per output.dir, workers that die with their launcher, bounded job files,
and runs in which no server can train.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_integrity.py -q      (about 3 minutes on 2 cores)
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedpipe_dist.cli import main
from fedpipe_dist.io.checkpoint import CheckpointDir
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.io.lock import NAME as LOCK_NAME
from fedpipe_dist.io.lock import RunLock

from ._util import REPO, SMALL_RUN, subprocess_env, torchrun_cmd, worker_pids

DECLARED = ["clients.tflops=[1,2,3,4]"]


def _cli(out, *extra) -> list[str]:
    return ["run", "jobs/quickstart.yaml", *SMALL_RUN, *DECLARED, f"output.dir={out}", "--no-progress", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    assert main(_cli(d / "whole", "rounds=3")) == 0
    assert main(_cli(d / "two", "rounds=2")) == 0
    return d


def _copy(runs, tmp_path, name="two"):
    out = tmp_path / name
    shutil.copytree(runs / name, out)
    return out


def _files(out) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _flip_tensor_bytes(path, offset_from_end=4096, n=4):
    """Flip a few bytes inside the tensor data of a torch.save file (its zip holds the storages near the end,
    before the central directory), which torch.load itself does not notice."""
    data = bytearray(path.read_bytes())
    at = len(data) - offset_from_end
    for i in range(n):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- checksums: a damaged checkpoint is found before it is used ------------------------------------------------


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_one_before(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    newest = CheckpointDir(out, 0, 1).path(2)
    _flip_tensor_bytes(newest)
    assert main(_cli(out, "resume=true", "rounds=3")) == 0
    err = capsys.readouterr().err
    assert f"round 2's checkpoint is damaged ('{newest}': its SHA-256 differs" in err, err[-2000:]
    assert "after round 1 of 3" in err
    r, whole = Results(out / "results.h5"), Results(runs / "whole" / "results.h5")
    assert list(r.rounds["round"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(r.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)


def test_both_checkpoints_damaged_exit_2_naming_the_files(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    for t in (1, 2):
        _flip_tensor_bytes(CheckpointDir(out, 0, 1).path(t))
    before = _files(out)
    assert main(_cli(out, "resume=true", "rounds=3")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and str(CheckpointDir(out, 0, 1).path(1)) in err, err[-2000:]
    assert _files(out) == before


def test_a_damaged_results_header_without_a_complete_checkpoint_keeps_every_file(runs, tmp_path, capsys):
    """Issue 18, item 2: results.h5's header damaged and the rank's checkpoint files gone (the snapshots
    intact): nothing can be continued automatically, and nothing that is there may be deleted."""
    out = _copy(runs, tmp_path)
    results = out / "results.h5"
    data = bytearray(results.read_bytes())
    data[:64] = b"\0" * 64
    results.write_bytes(bytes(data))
    for t in (1, 2):
        CheckpointDir(out, 0, 1).path(t).unlink()
    before = _files(out)
    assert main(_cli(out, "resume=true", "rounds=3")) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "round000002.results.h5" in err and "output.overwrite=true" in err, err
    assert _files(out) == before


# ---- a crash during round 1's checkpoint ---------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc (Linux)")
def test_rank_0_killed_while_round_1s_snapshot_is_a_tmp_file_then_resume_completes(runs, tmp_path):
    out = tmp_path / "crashed"
    env = subprocess_env(FEDPIPE_DRILL_SNAPSHOT_STALL_S=120)
    proc = subprocess.Popen(torchrun_cmd(2, *_cli(out, "rounds=3")), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    tmp = CheckpointDir(out, 0, 2).results_path(1).with_suffix(".h5.tmp")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not tmp.exists():
            time.sleep(0.05)
        assert tmp.exists(), "rank 0 never reached round 1's snapshot"
        os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode != 0 and tmp.exists()
    assert main(_cli(out, "resume=true", "rounds=3")) == 0  # the leftovers of round 1 are replaced, the run starts
    r, whole = Results(out / "results.h5"), Results(runs / "whole" / "results.h5")
    assert list(r.rounds["round"]) == [0, 1, 2, 3] and r.attrs["finished"]
    np.testing.assert_allclose(r.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=1e-6)
    assert not tmp.exists()


# ---- one writer per output.dir; workers die with their launcher -------------------------------------------------


def test_a_second_job_into_a_locked_output_dir_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "busy"
    holder = RunLock(out)
    holder.acquire(print)
    try:
        p = subprocess.run([sys.executable, "-m", "fedpipe_dist", *_cli(out, "rounds=1")], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
    finally:
        holder.release()
    assert p.returncode == 2, p.stderr[-2000:]
    assert "is being written by another job" in p.stderr and f"pid {os.getpid()}" in p.stderr, p.stderr
    assert not (out / "results.h5").exists()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "node17", "pid": 999999, "job": "4242", "since": "yesterday"}))
    assert main(_cli(out, "rounds=1")) == 0
    err = capsys.readouterr().err
    assert "taking over the lock of a job that is gone (host node17, pid 999999, job 4242" in err, err[-2000:]
    assert not (out / LOCK_NAME).exists()  # released at the end: the file goes


def test_a_failed_run_leaves_no_lock_file_and_a_waiting_job_locks_the_new_file(tmp_path, capsys):
    out = tmp_path / "failed"
    assert main(_cli(out, "rounds=1", "model.name_or_path=" + str(tmp_path / "no-such-model"))) == 2
    assert not (out / LOCK_NAME).exists()



def test_a_lock_file_unlinked_between_open_and_lock_is_not_the_one_locked(tmp_path, monkeypatch):
    """The holder's release unlinks the file; a job that opened it just before must lock the new file instead
    (else two jobs would hold locks on two files of one name)."""
    import fcntl

    out = tmp_path / "race"
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not calls:  # first try: the holder releases between our open and our lock
            calls.append(os.fstat(fd).st_ino)
            os.unlink(out / LOCK_NAME)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = RunLock(out)
    lock.acquire(print)
    try:
        now = os.stat(out / LOCK_NAME).st_ino
        assert calls and os.fstat(lock.fd).st_ino == now  # the new file, not the unlinked one
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


@pytest.mark.dist
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_the_launchers_process_group_leaves_no_worker(tmp_path):
    out = tmp_path / "orphans"
    proc = subprocess.Popen(torchrun_cmd(2, *_cli(out, "rounds=50", "train.local_steps=20")), cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        workers = {}
        while time.time() < deadline and len(workers) < 2:
            workers = worker_pids(proc.pid)
            time.sleep(0.2)
        assert len(workers) == 2, "torchrun started no workers"
        while time.time() < deadline and not (out / "results.h5").exists():
            time.sleep(0.2)  # the workers are past start-up (their parent-death signal is armed by then)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        alive = list(workers.values())
        while time.time() < deadline and alive:
            alive = [pid for pid in alive if _alive(pid)]
            time.sleep(0.2)
    finally:
        for pid in worker_pids(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


# ---- bounded input ---------------------------------------------------------------------------------------------

BOMB = """a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
rounds: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_an_alias_bomb_job_file_exits_2_before_expanding(tmp_path):
    """The alias count is taken on the composed YAML graph, each shared node once, so the bomb is refused without
    being expanded (expanded, it holds 9^7 values). No timing here (a loaded CI machine took 6.6 s for this
    check's whole process once; the 120 s timeout only guards against a hang)."""
    job = tmp_path / "bomb.yaml"
    job.write_text(BOMB)
    assert len(BOMB) < 400
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "check", str(job)], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "expands to more than" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_alias_bomb_override_and_a_huge_job_file_exit_2(tmp_path, capsys):
    levels = ["&l0 [" + ",".join(["1"] * 9) + "]"] + \
        [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 7)]
    assert main(["check", "jobs/quickstart.yaml", "rounds=[" + ", ".join(levels) + "]"]) == 2
    assert "expands to more than" in capsys.readouterr().err
    huge = tmp_path / "huge.yaml"
    huge.write_text("rounds: 1\n" + "# padding\n" * 200_000)
    assert main(["check", str(huge)]) == 2
    assert "a job file holds at most" in capsys.readouterr().err


def test_a_synthetic_set_too_large_to_generate_is_refused_up_front(capsys):
    assert main(["check", "jobs/quickstart.yaml", "data.synthetic_train_size=1e10"]) == 2
    assert "data.synthetic_train_size" in capsys.readouterr().err


def test_max_length_above_the_models_position_limit_exits_2(tmp_path, capsys):
    assert main(_cli(tmp_path / "long", "rounds=1", "model.max_length=100000")) == 2
    assert "position limit" in capsys.readouterr().err


# ---- a run in which no server can train -------------------------------------------------------------------------


def test_no_server_can_train_warns_every_round_and_exits_2(tmp_path, capsys):
    out = tmp_path / "idle"
    assert main(_cli(out, "rounds=2", "plan.mode=uniform", "lora.rank=1000000000")) == 2
    err = capsys.readouterr().err
    assert err.count("has a plan that fits its budgets") == 2 and "no server trained in any of rounds 1..2" in err
    r = Results(out / "results.h5")
    assert r.n_rounds == 2 and len(r.attrs["warnings"]) == 2


# ---- property: random damage to a checkpoint is found, never used --------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0.0, 1.0), n=st.integers(1, 16), which=st.sampled_from(["checkpoint", "snapshot"]))
def test_random_damage_to_the_newest_checkpoint_is_never_used(runs, tmp_path_factory, where, n, which):
    """Whatever bytes are flipped in round 2's checkpoint or snapshot, a resume falls back to round 1 and ends
    equal to the uninterrupted run; never a traceback, never a silently different model."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("prop") / "two"
    shutil.copytree(runs / "two", out)
    ckpt = CheckpointDir(out, 0, 1)
    path = ckpt.path(2) if which == "checkpoint" else ckpt.results_path(2)
    data = bytearray(path.read_bytes())
    at = min(int(where * len(data)), len(data) - n)
    for i in range(at, at + n):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(_cli(out, "resume=true", "rounds=3"))
    assert code == 0 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    assert "round 2's checkpoint is damaged" in err.getvalue()
    r, whole = Results(out / "results.h5"), Results(runs / "whole" / "results.h5")
    np.testing.assert_allclose(r.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)


# ---- a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root and mount(8) needed), grown to 64 MiB by calling the returned function."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs for output.dir needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not allowed here ({r.stderr.strip()})")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)

    yield mnt, grow
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.dist
def test_a_full_disk_exits_2_once_and_resume_continues_to_the_uninterrupted_result(small_disk, tmp_path):
    mnt, grow = small_disk
    job = [*_cli(mnt / "run", "rounds=4")]
    p = subprocess.run(torchrun_cmd(2, *job), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and out.count("fedpipe: error: output.dir:") == 1, out[-3000:]
    assert "free space there" in out and "resume=true" in out
    # the workers exit 2 (torchrun itself exits 1); one that is still finishing when torchrun sees the first
    # exit is stopped by torchrun's SIGTERM (-15)
    codes = re.findall(r"exitcode  : (-?\d+)", out)
    assert "2" in codes and set(codes) <= {"2", "-15"}, out[-3000:]
    assert "Segmentation" not in out and "SIGSEGV" not in out
    assert not list(mnt.rglob("*.tmp")), list(mnt.rglob("*"))
    grow()
    p = subprocess.run(torchrun_cmd(2, *job, "resume=true"), cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = tmp_path / "whole"
    p = subprocess.run(torchrun_cmd(2, *_cli(whole, "rounds=4")), cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r, w = Results(mnt / "run" / "results.h5"), Results(whole / "results.h5")
    assert list(r.rounds["round"]) == [0, 1, 2, 3, 4] and r.attrs["finished"]
    np.testing.assert_allclose(r.rounds["eval_loss"], w.rounds["eval_loss"], rtol=0, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(width=st.integers(1, 12), depth=st.integers(1, 9), key=st.sampled_from(["rounds", "lora", "clients", "extra"]),
       garbage=st.binary(max_size=64))
@example(width=1, depth=1, key="rounds", garbage=b"0")  # valid JSON, not a holder's note (found by this test)
@example(width=1, depth=1, key="rounds", garbage=b'["host"]')
def test_alias_structures_and_lock_garbage_never_hang_or_crash(tmp_path_factory, width, depth, key, garbage):
    """Any nesting of aliases under any key is answered within seconds with exit 0 or 2; a lock file holding
    any bytes (no live holder) is taken over."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("alias")
    lines = ["l0: &l0 [" + ", ".join(["1"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    lines.append(f"{key}: *l{depth - 1}")
    job = d / "job.yaml"
    job.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        code = main(["check", str(job), f"output.dir={d / 'out'}"])
    assert code in (0, 2) and "Traceback" not in err.getvalue()
    assert time.monotonic() - t0 < 5
    (d / "out").mkdir()
    (d / "out" / LOCK_NAME).write_bytes(garbage)
    lock = RunLock(d / "out")
    lock.acquire(lambda m: None)
    lock.release()
    assert not (d / "out" / LOCK_NAME).exists()
