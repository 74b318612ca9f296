"""Layer: per-round checkpoints and resume (io/checkpoint.py, runtime/resume.py), in one process and under
torchrun with --max-restarts (issue 8, acceptance 1).

A run stopped after round k and resumed must be the run that never stopped: same plans, same eval losses,
same final weights, and results.h5 with every round exactly once. Plans use declared speeds
(clients.tflops) so that two runs plan alike; local training is seeded per (job, round, server).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_resume.py -q
"""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from fedpipe_dist.cli import main
from fedpipe_dist.io.checkpoint import CheckpointDir
from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, SMALL_RUN, run_small, subprocess_env, torchrun_cmd, worker_pids

DECLARED = ["clients.tflops=[1,2,3,4]"]

METHOD_ARGS = {
    "fedpipe": ["clients.precision=[fp32,fp16,nf8,nf4]"],  # the fp32 view and the merged residuals
    "fedpipe+carry": ["clients.precision=[fp32,fp16,nf8,nf4]", "lora.carry=adapter",  # the kept adapter, and
                      "train.optimizer_state=kept"],  # each server's AdamW moments
    "lora": [],
    "flora": [],
    "flexlora": [],
    "hetlora": ["hetlora.gamma=0.9"],  # rank self-pruning: planner.client_ranks and the pruned norms go on
    "ft": [],
    "ft+moments": ["train.optimizer_state=kept"],  # each server's AdamW moments of every parameter
    "fedadapter": ["fedadapter.period=2"],  # trial rounds 2 (before the stop) and 4 (after)
}


def _final_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "final" / "model.safetensors")


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_stop_after_round_2_and_resume_equals_the_run_that_never_stopped(tmp_path, method):
    extra = [f"method={method.split('+')[0]}", *METHOD_ARGS[method], *DECLARED, "rounds=4"]
    _, whole = run_small(tmp_path, "whole", *extra)
    _, first = run_small(tmp_path, "split", *extra[:-1], "rounds=2")
    assert first.n_rounds == 2 and first.attrs["finished"]
    _, resumed = run_small(tmp_path, "split", *extra[:-1], "rounds=4", "resume=true")
    assert list(resumed.rounds["round"]) == [0, 1, 2, 3, 4]
    assert list(resumed.attrs["resumed_from"]) == [2] and resumed.attrs["finished"]
    # bitwise: the resumed run does the same operations on the same state
    np.testing.assert_allclose(resumed.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)
    for key in ("ranks", "batch_size", "selected", "completed", "quant_bits", "adapter_depth", "adapter_width"):
        np.testing.assert_array_equal(resumed.clients[key], whole.clients[key], err_msg=key)
    np.testing.assert_allclose(resumed.clients["train_loss"], whole.clients["train_loss"], rtol=0, atol=0)
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0
    # two checkpoints kept per rank; rank 0's with their results.h5 snapshots
    assert CheckpointDir(tmp_path / "split", 0, 1).rounds() == [3, 4]


def test_checkpoint_every_two_rounds_resumes_from_the_last_one(tmp_path):
    extra = [*DECLARED, "checkpoint.every=2"]
    _, whole = run_small(tmp_path, "whole", *extra, "rounds=3")
    run_small(tmp_path, "split", *extra, "rounds=3")
    ckpt = CheckpointDir(tmp_path / "split", 0, 1)
    assert ckpt.rounds() == [2, 3]  # every 2nd round and the last
    ckpt.path(3).unlink()  # as if the job died during round 3: the newest complete checkpoint is round 2
    _, resumed = run_small(tmp_path, "split", *extra, "rounds=3", "resume=true")
    assert list(resumed.rounds["round"]) == [0, 1, 2, 3]  # round 3's old row was dropped, then redone
    np.testing.assert_allclose(resumed.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)


# rank-2 adapters on 4 servers: the stacked update (rank 8) is smaller than dense, so checkpoints between full
# snapshots hold only the merged updates (runtime/chain.py); with full_every=2 rounds 2 and 4 are full ones
# the paper's fresh adapters: the merged update is the stack alone (lora.carry=adapter also checkpoints the kept
# adapter and merges the cross terms, so its deltas are larger; its resume is tested in tests/test_carry.py)
CHAIN = [*METHOD_ARGS["fedpipe"], *DECLARED, "lora.ranks=[2]", "lora.rank=2", "checkpoint.full_every=2",
         "lora.carry=none"]


def _bases_of(out, t):
    return CheckpointDir(out, 0, 1).load(t)["base"]


@pytest.mark.parametrize("stop", [1, 3])
def test_resume_across_a_full_snapshot_replays_the_updates_since(tmp_path, stop):
    """Stopped after round 1 (its chain: the pretrained base + round 1's update) or round 3 (round 2's full
    snapshot + round 3's update), the resumed run is bitwise the run that never stopped."""
    _, whole = run_small(tmp_path, "whole", *CHAIN, "rounds=4")
    assert [_bases_of(tmp_path / "whole", t)["full"] is not None for t in (2, 3, 4)] == [True, False, True]
    run_small(tmp_path, "split", *CHAIN, f"rounds={stop}")
    last = _bases_of(tmp_path / "split", stop)
    assert last["full"] is None and last["prev"] == (None if stop == 1 else 2)
    assert [t for t, _ in last["deltas"]] == [stop]
    if stop == 3:  # an update is far smaller than the fp32 weights and residuals of a full one
        ckpt = CheckpointDir(tmp_path / "split", 0, 1)
        assert ckpt.path(3).stat().st_size < ckpt.path(2).stat().st_size / 3
    _, resumed = run_small(tmp_path, "split", *CHAIN, "rounds=4", "resume=true")
    assert list(resumed.attrs["resumed_from"]) == [stop]
    np.testing.assert_allclose(resumed.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)
    np.testing.assert_allclose(resumed.clients["train_loss"], whole.clients["train_loss"], rtol=0, atol=0)
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0
    # the first checkpoint after a resume is a full one; a chain's files stay while a kept checkpoint needs them
    assert _bases_of(tmp_path / "split", stop + 1)["full"] is not None
    # the two newest, and round 2: round 3's chain starts at its full snapshot, kept whole to fall back to
    assert CheckpointDir(tmp_path / "whole", 0, 1).rounds() == [2, 3, 4]
    assert sorted(p.name[:11] for p in (tmp_path / "whole" / "checkpoint").glob("*.pt")) == \
        ["round000002", "round000003", "round000004"]


def test_a_damaged_file_in_the_chain_is_named_and_nothing_changes(tmp_path, capsys):
    run_small(tmp_path, "run", *CHAIN, "rounds=3")  # round 3's checkpoint continues round 2's full one
    path = CheckpointDir(tmp_path / "run", 0, 1).path(2)
    path.write_bytes(path.read_bytes()[:100])
    before = _snapshot(tmp_path / "run")
    assert main(["run", "jobs/quickstart.yaml", *SMALL_RUN, *CHAIN, f"output.dir={tmp_path / 'run'}",
                 "--no-progress", "resume=true", "rounds=3"]) == 2
    assert _snapshot(tmp_path / "run") == before
    err = capsys.readouterr().err
    assert "round 3's checkpoint continues" in err and "Traceback" not in err, err[-2000:]


def test_a_damaged_link_falls_back_to_the_full_snapshot_it_continues(tmp_path, capsys):
    """full_every=3: round 3 is full, 4 and 5 continue it. Round 4's link damaged leaves 4 and 5 unusable;
    the rotation kept round 3's results snapshot with its full one, so the resume falls back to round 3 and
    ends bitwise equal to the run that never stopped."""
    chain = [*CHAIN, "checkpoint.full_every=3"]
    _, whole = run_small(tmp_path, "whole", *chain, "rounds=6")
    run_small(tmp_path, "run", *chain, "rounds=5")
    ckpt = CheckpointDir(tmp_path / "run", 0, 1)
    assert ckpt.rounds() == [3, 4, 5] and _bases_of(tmp_path / "run", 3)["full"] is not None
    path = ckpt.path(4)
    path.write_bytes(path.read_bytes()[:100])
    _, resumed = run_small(tmp_path, "run", *chain, "rounds=6", "resume=true")
    assert list(resumed.attrs["resumed_from"]) == [3]
    np.testing.assert_allclose(resumed.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=0)
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "run")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0


def test_resume_with_nothing_to_resume_starts_the_run(tmp_path):
    _, r = run_small(tmp_path, "fresh", "resume=true", "rounds=1")
    assert r.n_rounds == 1 and r.attrs["finished"] and "resumed_from" not in r.attrs


# ---- bad checkpoints and mismatched jobs: exit 2, a message, nothing on disk changed ----------------------------


def _cli(out, *extra) -> list[str]:
    return ["run", "jobs/quickstart.yaml", *SMALL_RUN, *DECLARED, f"output.dir={out}", "--no-progress", *extra]


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(_cli(out, "rounds=2")) == 0
    return out


def _snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _refused(out, capsys, *extra) -> str:
    before = _snapshot(out)
    assert main(_cli(out, "resume=true", "rounds=3", *extra)) == 2
    assert _snapshot(out) == before, "a refused resume changed files on disk"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_resume_with_other_settings_is_refused_naming_them(two_round_run, capsys):
    err = _refused(two_round_run, capsys, "train.lr=0.5")
    assert "train.lr" in err and "start a new output.dir" in err


def test_a_scheduled_run_keeps_its_rounds_on_resume(tmp_path, capsys):
    """train.lr_schedule=cosine sets every round's lr from `rounds`: more rounds on resume would change them all."""
    out = tmp_path / "cosine"
    assert main(_cli(out, "rounds=2", "train.lr_schedule=cosine")) == 0
    capsys.readouterr()
    err = _refused(out, capsys, "train.lr_schedule=cosine")
    assert "rounds: 2 then, 3 now" in err and "train.lr_schedule decays the lr over `rounds`" in err


def test_resume_past_the_requested_rounds_is_refused(two_round_run, capsys):
    before = _snapshot(two_round_run)
    assert main(_cli(two_round_run, "resume=true", "rounds=1")) == 2
    assert _snapshot(two_round_run) == before
    assert "set rounds >= 2" in capsys.readouterr().err


def test_a_checkpoint_cut_short_falls_back_to_the_one_before(two_round_run, capsys, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_round_run, out)
    path = CheckpointDir(out, 0, 1).path(2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    assert main(_cli(out, "resume=true", "rounds=3")) == 0
    err = capsys.readouterr().err
    assert f"round 2's checkpoint is damaged ('{path}'" in err and "after round 1 of 3" in err, err[-2000:]


def test_a_checkpoint_that_would_run_code_is_refused(two_round_run, capsys, tmp_path):
    """weights_only loading: a pickle naming an arbitrary callable is data it refuses, not code it runs, even
    when whoever planted it also rewrote its checksum (both rounds, so no intact one is left to fall back to)."""
    import shutil

    from fedpipe_dist.io.checkpoint import checksum_path, sha256_of

    out = tmp_path / "copy"
    shutil.copytree(two_round_run, out)
    marker = tmp_path / "pwned"
    for t in (1, 2):
        path = CheckpointDir(out, 0, 1).path(t)
        torch.save({"format": 2, "round": t, "rank": 0, "x": _Exploit(str(marker))}, path)
        checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")
    err = _refused(out, capsys)
    assert "cannot be read" in err and not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_results_without_a_checkpoint_is_refused(two_round_run, capsys, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_round_run, out)
    shutil.rmtree(out / "checkpoint")
    err = _refused(out, capsys)
    assert "no round that every rank checkpointed" in err and "output.overwrite=true" in err


def test_a_sigterm_during_an_append_waits_for_the_file_to_close(tmp_path):
    """torchrun and Slurm stop workers with SIGTERM; one that lands inside an HDF5 write is held until the
    file is closed, so the file stays whole, and the process then dies of it."""
    path = tmp_path / "t.h5"
    code = ("import os, signal\nfrom fedpipe_dist.io.hdf5 import _open\n"
            f"with _open({str(path)!r}, 'w') as f:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    f.create_dataset('x', data=[1, 2, 3])\n"
            "print('survived', flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -signal.SIGTERM and "survived" not in p.stdout
    with h5py.File(path, "r") as f:
        assert list(f["x"][()]) == [1, 2, 3]


# ---- acceptance 1: a rank SIGKILLed in round 3 of 6; torchrun restarts the job, which resumes by itself ----------


TORCHRUN_JOB = ["run", "jobs/quickstart.yaml", "rounds=4", "train.local_steps=20", "model.max_length=96",
                "data.synthetic_train_size=160", "eval.max_samples=24", "clients.slowdown=1", *DECLARED,
                "--no-progress"]


def _rows(results) -> int:
    try:
        with h5py.File(results, "r", locking=False) as f:
            return f["rounds"]["round"].shape[0]
    except (OSError, KeyError):
        return 0  # not there yet, or caught mid-append


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc (Linux)")
def test_sigkill_in_round_3_restarts_and_resumes_to_the_uninterrupted_result(tmp_path):
    whole = tmp_path / "whole"
    p = subprocess.run(torchrun_cmd(4, *TORCHRUN_JOB, f"output.dir={whole}"), cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = torchrun_cmd(4, *TORCHRUN_JOB, f"output.dir={out}")
    cmd.insert(cmd.index("--nnodes=1"), "--max-restarts=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        # round 3 is running once every rank holds its checkpoint of round 2 and round 3's row is not written
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                not all(2 in CheckpointDir(out, r, 4).rounds() for r in range(4)):
            time.sleep(0.05)
        assert _rows(out / "results.h5") == 3, "the job is not in round 3"  # rows of rounds 0, 1, 2
        victim = worker_pids(proc.pid).get(2)
        assert victim is not None, "found no worker with RANK=2 below torchrun"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming fedpipe" in err and "after round 2 of 4" in err, err[-3000:]  # restarted, from round 2
    a, b = Results(whole / "results.h5"), Results(out / "results.h5")
    assert list(b.rounds["round"]) == [0, 1, 2, 3, 4] and b.attrs["finished"]
    assert list(b.attrs["resumed_from"]) == [2]
    assert abs(b.last_eval_loss() - a.last_eval_loss()) <= 1e-5
    np.testing.assert_allclose(b.rounds["eval_loss"], a.rounds["eval_loss"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(b.clients["ranks"], a.clients["ranks"])


def test_a_damaged_results_file_is_put_back_from_the_snapshot(two_round_run, tmp_path):
    """results.h5 cut in half (a SIGKILL in mid-append, a full disk): the resume restores the copy saved with
    the checkpoint and finishes the run."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_round_run, out)
    results = out / "results.h5"
    results.write_bytes(results.read_bytes()[:2048])
    assert main(_cli(out, "resume=true", "rounds=3")) == 0
    r = Results(results)
    assert list(r.rounds["round"]) == [0, 1, 2, 3] and r.attrs["finished"]


def test_a_damaged_snapshot_falls_back_to_the_round_before(two_round_run, capsys, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_round_run, out)
    snap = CheckpointDir(out, 0, 1).results_path(2)
    snap.write_bytes(b"not hdf5")
    assert main(_cli(out, "resume=true", "rounds=3")) == 0
    err = capsys.readouterr().err
    assert f"'{snap}': its SHA-256 differs" in err and "after round 1 of 3" in err, err[-2000:]


def test_a_background_checkpoint_is_whole_after_wait_and_its_error_comes_from_wait(tmp_path):
    ckpt = CheckpointDir(tmp_path, 1, 2)  # rank 1 of 2: no results snapshot
    ckpt.save(1, {"x": torch.ones(3)})
    ckpt.wait()
    assert ckpt.rounds() == [1] and torch.equal(ckpt.load(1)["x"], torch.ones(3))
    ckpt.save(2, {"x": lambda: 0})  # torch.save cannot pickle a function: the write fails
    with pytest.raises(Exception, match="pickle"):
        ckpt.wait()
    ckpt.wait()  # raised once
    assert ckpt.rounds() == [1] and not [p for p in ckpt.dir.iterdir() if p.name.endswith(".tmp")]
