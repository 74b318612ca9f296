"""Layer: the `fedpipe run` command line end to end (a subprocess per case): bad input exits with code 2.

Each case checks the exit code, that stderr names the offending key or path and says how to fix it, and
that no Python traceback leaks out. Nothing reaches training (each fails during start-up), so every case
takes a few seconds, mostly interpreter and torch import.

Run: .venv/bin/python -m pytest tests/test_input_errors.py -q
"""

import os
import re
import subprocess
import sys
import time

import pytest

# Where training could start, keep it tiny.
FAST = ["rounds=1", "train.local_steps=1", "data.synthetic_train_size=16", "data.synthetic_eval_size=8",
        "eval.max_samples=8", "model.max_length=64"]


@pytest.fixture
def fedpipe(REPO_ROOT, tmp_path):
    """Run `python -m fedpipe_dist run JOB ...` from the repo root; output.dir defaults to tmp_path/out."""

    def run(*overrides, job="jobs/quickstart.yaml", out=None):
        out = out if out is not None else tmp_path / "out"
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1")
        cmd = [sys.executable, "-m", "fedpipe_dist", "run", str(job), "--no-progress", *FAST, *overrides,
               f"output.dir={out}"]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    return run


def assert_bad_input(proc, *must_contain):
    """Exit code 2, one clean error message (no traceback) holding every expected fragment."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "fedpipe: error:" in proc.stderr, proc.stderr
    for fragment in must_contain:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr}"


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_mistyped_key(fedpipe, tmp_path):
    proc = fedpipe("train.lrr=1")
    assert_bad_input(proc, "'train.lrr'", "did you mean 'train.lr'?")
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_job_file(fedpipe, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("rounds: 1\nmodel: {name_or_path: tiny-gpt2}\ntrain:\n  local_step: 2\n  lr: 1.0e-2\n")
    proc = fedpipe(job=job)
    assert_bad_input(proc, "'train.local_step'", "did you mean 'train.local_steps'?", str(job))


def test_missing_data_file(fedpipe, tmp_path):
    missing = tmp_path / "nope.csv"
    proc = fedpipe("data.name=e2e", f"data.train_path={missing}")
    assert_bad_input(proc, "data.train_path", str(missing), "does not exist", "point data.train_path at")
    assert not (tmp_path / "out" / "results.h5").exists()


def test_missing_model_path(fedpipe, tmp_path):
    missing = tmp_path / "no_model_here"
    proc = fedpipe(f"model.name_or_path={missing}")
    assert_bad_input(proc, "model.name_or_path", str(missing), "does not exist",
                     "point model.name_or_path at", "tiny-gpt2")


def test_a_relative_model_path_beside_its_folder_is_a_path_not_a_hub_name(tmp_path, monkeypatch):
    """`models/llama-7b` where a models/ folder exists (but not llama-7b in it): an error at once, no hub retries."""
    from fedpipe_dist.config import UserInputError
    from fedpipe_dist.models import check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    t0 = time.monotonic()
    with pytest.raises(UserInputError, match="folder 'models/llama-7b' does not exist"):
        check_model_path("models/llama-7b")
    assert time.monotonic() - t0 < 5  # no network retries (a bound on a refusal, not a speed claim)


@pytest.mark.parametrize("contents, what", [({}, "is empty"), ({"notes.txt": "hi"}, "has no config.json")],
                         ids=["empty-folder", "not-a-model"])
def test_model_folder_that_is_not_a_model(fedpipe, tmp_path, contents, what):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    proc = fedpipe(f"model.name_or_path={folder}")
    assert_bad_input(proc, "model.name_or_path", str(folder), what, "point model.name_or_path at")


@pytest.mark.parametrize("text, what", [
    ("mr,ref\n", "has a header row but no data rows"),
    ("mr,ref\nname[The Eagle],\n\"name[Alimentum], food[Thai]\",   \n", "every one has an empty mr or ref"),
], ids=["header-only", "all-refs-empty"])
def test_empty_training_set(fedpipe, tmp_path, text, what):
    csv_path = write_csv(tmp_path / "train.csv", text)
    proc = fedpipe("data.name=e2e", f"data.train_path={csv_path}")
    assert_bad_input(proc, "data.train_path", str(csv_path), what, "training set would be empty",
                     "add rows with both mr and ref filled in")


def test_empty_training_set_by_max_train_samples(fedpipe):
    proc = fedpipe("data.max_train_samples=0")
    assert_bad_input(proc, "data.max_train_samples", "must be >= 1, or null")


def test_csv_without_ref_column(fedpipe, tmp_path):
    csv_path = write_csv(tmp_path / "train.csv", "mr,text\nname[The Eagle],The Eagle is a pub.\n")
    proc = fedpipe("data.name=e2e", f"data.train_path={csv_path}")
    assert_bad_input(proc, "data.train_path", str(csv_path), "lacks ref", "rename its columns to mr,ref")


def test_job_file_that_is_not_yaml(fedpipe, tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text("rounds: 1\ntrain:\n  lr: 1.0e-2\n   batch_max: [4\n")
    proc = fedpipe(job=job)
    assert_bad_input(proc, str(job), "is not valid YAML", "line 4", "Fix the syntax")


def test_existing_results_are_not_touched(fedpipe, tmp_path):
    out = tmp_path / "earlier"
    (out / "final").mkdir(parents=True)
    earlier = b"\x89HDF\r\n\x1a\n stand-in for an earlier run's results " + bytes(range(256))
    (out / "results.h5").write_bytes(earlier)
    (out / "final" / "config.json").write_text('{"model_type": "gpt2"}')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = fedpipe(out=out)
    assert_bad_input(proc, "output.dir", str(out), "results.h5", "choose a new output.dir",
                     "add resume=true", "output.overwrite=true to replace it")
    assert (out / "results.h5").read_bytes() == earlier
    assert (out / "final" / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_wrong_model_path_does_not_hide_behind_an_occupied_output_dir(fedpipe, tmp_path):
    """Issue 31: both mistakes in one message, the earlier run's file untouched."""
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "results.h5").write_bytes(b"an earlier run")
    missing = tmp_path / "models" / "llama-7b"
    proc = fedpipe(f"model.name_or_path={missing}", out=out)
    assert_bad_input(proc, "2 problems:", "1. model.name_or_path", str(missing), "2. output.dir", "results.h5")
    assert (out / "results.h5").read_bytes() == b"an earlier run"


# ---- fedpipe check: what a queued job would trip over, before it is queued (issue 17) --------------------------


def _check(REPO_ROOT, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fedpipe_dist", "check", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_refuses_a_missing_model_folder(REPO_ROOT, tmp_path):
    missing = tmp_path / "models" / "Llama-2-7b-hf"
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", f"model.name_or_path={missing}", f"output.dir={tmp_path / 'o'}")
    assert_bad_input(proc, "model.name_or_path", str(missing), "does not exist")


def test_check_names_every_problem_at_once(REPO_ROOT, tmp_path):
    """A missing model folder, a missing data file and an occupied output.dir: one message naming the three."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.h5").write_bytes(b"x")
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", f"model.name_or_path={tmp_path / 'm'}", "data.name=e2e",
                  f"data.train_path={tmp_path / 'train.csv'}", f"output.dir={out}")
    assert_bad_input(proc, "3 problems:", "model.name_or_path", "data.train_path", "output.dir")


def test_check_refuses_a_csv_without_ref(REPO_ROOT, tmp_path):
    csv_path = write_csv(tmp_path / "train.csv", "mr,text\nname[The Eagle],The Eagle is a pub.\n")
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", "data.name=e2e", f"data.train_path={csv_path}",
                  f"data.eval_path={csv_path}", f"output.dir={tmp_path / 'o'}")
    assert_bad_input(proc, "data.train_path", str(csv_path), "lacks ref")


def test_check_refuses_too_few_rows_for_the_servers(REPO_ROOT, tmp_path):
    csv_path = write_csv(tmp_path / "train.csv", "mr,ref\nname[A],A is a pub.\nname[B],B is a cafe.\n")
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", "data.name=e2e", f"data.train_path={csv_path}",
                  f"data.eval_path={csv_path}", "clients.n=4", f"output.dir={tmp_path / 'o'}")
    assert_bad_input(proc, "data.train_path", "2 training example(s) for clients.n=4")


def _unwritable(tmp_path):
    """A folder this process cannot write into: chmod 500 for a normal user; root ignores permission bits,
    so /sys (sysfs refuses new files even to root) there."""
    if os.geteuid() != 0:
        d = tmp_path / "locked"
        d.mkdir()
        d.chmod(0o500)
        return d
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_create("/sys"):
        pytest.skip("running as root and /sys accepts new files here: no folder root cannot write into")
    return "/sys"


def _can_create(folder) -> bool:
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_check_refuses_an_unwritable_output_dir(REPO_ROOT, tmp_path):
    locked = _unwritable(tmp_path)
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", f"output.dir={locked}/run")
    assert_bad_input(proc, "output.dir", str(locked), "is not writable")


def test_check_passes_and_warns_about_idle_ranks(REPO_ROOT, tmp_path):
    proc = _check(REPO_ROOT, "jobs/quickstart.yaml", f"output.dir={tmp_path / 'o'}", "--nproc", "8")
    assert proc.returncode == 0, proc.stderr
    assert "fedpipe check: OK" in proc.stderr
    assert "8 ranks but clients.n=4: ranks 4..7 host no edge server" in proc.stderr


@pytest.mark.dist
def test_a_bad_override_under_torchrun_is_said_once_and_last(REPO_ROOT):
    """Four ranks all find the error; rank 0 alone reports it, through torchrun's error file, so it is the
    root cause at the end of torchrun's failure summary, and the other ranks exit quietly with code 2."""
    from ._util import subprocess_env, torchrun_cmd

    proc = subprocess.run(torchrun_cmd(4, "run", "jobs/quickstart.yaml", "rounds=abc"), cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    message = "rounds: expected an integer (got 'abc')"
    assert out.count(message) == 1, out
    assert message in "\n".join(out.strip().splitlines()[-3:]), out[-2000:]
    codes = re.findall(r"exitcode  : (-?\d+)", out)  # a rank still exiting when torchrun sees rank 0's exit
    assert codes.count("2") >= 1 and set(codes) <= {"2", "-15"}, out[-3000:]  # is stopped by its SIGTERM
    assert proc.returncode != 0
