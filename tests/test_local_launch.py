"""`fedpipe run JOB --nproc N` (issue 31): torchrun's agent in-process; a typo is one short message with exit
2, and Ctrl-C ends with one line naming the round reached and the resume command (with --nproc)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, kill_job, subprocess_env

SMALL = ["train.local_steps=2", "train.batch_max=4", "data.synthetic_train_size=96", "data.synthetic_eval_size=24",
         "model.max_length=96", "eval.max_samples=24", "clients.slowdown=1", "--no-progress"]


def test_a_typo_under_nproc_is_at_most_three_lines_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "run", "jobs/quickstart.yaml", "--nproc", "2",
                        "data.partiton=iid", f"output.dir={tmp_path / 'x'}"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2 and 1 <= len(lines) <= 3, (p.returncode, lines)
    assert "did you mean 'data.partition'?" in lines[-1]


def test_an_error_inside_the_ranks_is_one_line_with_the_jobs_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "run", "jobs/quickstart.yaml", "--nproc", "2",
                        f"model.name_or_path={tmp_path / 'no-model'}", f"output.dir={tmp_path / 'x'}"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) <= 3, (p.returncode, lines)
    assert "does not exist" in lines[-1] and "Traceback" not in p.stderr


def test_ctrl_c_under_nproc_says_where_it_stopped_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedpipe_dist", "run", "jobs/quickstart.yaml", "--nproc", "2",
                             "rounds=300", *SMALL, f"output.dir={out}"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            try:
                if Results(out / "results.h5").n_rounds >= 2:
                    break
            except Exception:  # not there yet, or being written this instant
                pass
            time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the launching process
        text, _ = proc.communicate(timeout=120)
    finally:
        kill_job(proc)
    stops = [ln for ln in text.splitlines() if "fedpipe: stopped by" in ln]
    assert len(stops) == 1 and proc.returncode == 130, (proc.returncode, text[-3000:])
    assert re.search(r"after round \d+ of 300 .*resume with: fedpipe run jobs/quickstart.yaml --nproc 2 .*resume=true",
                     stops[0]), stops[0]
    assert "Traceback" not in text and "SignalException" not in text
