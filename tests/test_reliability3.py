"""Issue 28, items 4 and 6: an eval sample smaller than the world size (ranks with no share of it add nothing
to the loss's sums; an empty share used to end rank 1 with an IndexError in the tokenizer, and `fedpipe check`
says what each rank evaluates), and rows with an empty mr or ref counted, not dropped silently.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability3.py -q      (about 30 s on 2 cores)
"""

import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpipe_dist.cli import main
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.preflight import eval_shares

from ._util import REPO, SMALL_RUN, subprocess_env, torchrun_cmd

ONE = ["jobs/quickstart.yaml", *SMALL_RUN, "rounds=1", "eval.max_samples=1", "--no-progress"]


def test_one_eval_example_on_two_ranks_equals_one_process(tmp_path):
    p = subprocess.run(torchrun_cmd(2, "run", *ONE, f"output.dir={tmp_path / 'two'}"), cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main(["run", *ONE, f"output.dir={tmp_path / 'one'}"]) == 0
    two, one = Results(tmp_path / "two" / "results.h5"), Results(tmp_path / "one" / "results.h5")
    assert np.isfinite(two.rounds["eval_loss"]).all()
    np.testing.assert_allclose(two.rounds["eval_loss"], one.rounds["eval_loss"], rtol=1e-6)


def test_check_says_what_each_rank_evaluates(tmp_path, capsys):
    assert main(["check", *ONE[:-1], f"output.dir={tmp_path / 'x'}", "--nproc", "2"]) == 0
    out = capsys.readouterr()
    assert "eval: 1 example(s) each round over 2 rank(s), 0-1 per rank; rank 1 has none" in out.out + out.err


def test_eval_shares_by_hand():
    assert eval_shares(24, 4) == "eval: 24 example(s) each round over 4 rank(s), 6-6 per rank"
    assert eval_shares(2, 4).endswith("rank(s) 2..3 have none and add nothing (raise eval.max_samples to spread "
                                      "the eval)")


def test_rows_with_an_empty_mr_or_ref_are_counted_in_the_log_and_results(tmp_path, capsys):
    rows = ["mr,ref", *[f'"name[A{i}], food[Thai]",A{i} serves Thai food.' for i in range(12)], '"name[B]",',
            ',Only a reference.', '"name[C], food[Thai]",C serves Thai food.']
    train = tmp_path / "train.csv"
    train.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["run", "jobs/quickstart.yaml", *SMALL_RUN, "rounds=1", "data.name=e2e", f"data.train_path={train}",
                 f"data.eval_path={train}", "eval.max_samples=4", f"output.dir={out}", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 row(s) of data.train_path with an empty mr or ref" in err, err
    attrs = Results(out / "results.h5").attrs
    assert attrs["dropped_rows_train"] == 2 and attrs["dropped_rows_eval"] == 2


# ---- issue 28, item 2 and the foreign newest checkpoint: files of another run are never used ------------------
FOREIGN_JOB = ["jobs/quickstart.yaml", *SMALL_RUN, "clients.tflops=[1,2,3,4]", "lora.ranks=[2]", "lora.rank=2",
               "checkpoint.full_every=10", "--no-progress"]  # factored updates: each checkpoint a chain link


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A (seed 0) stopped after 3 rounds, the same run uninterrupted to 5, and run B (seed 1) to 3."""
    d = tmp_path_factory.mktemp("foreign")
    assert main(["run", *FOREIGN_JOB, "rounds=5", f"output.dir={d / 'whole'}"]) == 0
    assert main(["run", *FOREIGN_JOB, "rounds=3", f"output.dir={d / 'a'}"]) == 0
    assert main(["run", *FOREIGN_JOB, "rounds=3", "seed=1", f"output.dir={d / 'b'}"]) == 0
    return d


def _swap(run, other, names):
    """Put `other`'s checkpoint files `names` (with their checksums) in place of `run`'s."""
    for name in names:
        for n in (name, name + ".sha256"):
            shutil.copyfile(other / "checkpoint" / n, run / "checkpoint" / n)


def _resume(out) -> int:
    return main(["run", *FOREIGN_JOB, "rounds=5", "resume=true", f"output.dir={out}"])


def _equal_to_whole(two_runs, out):
    got, want = Results(out / "results.h5"), Results(two_runs / "whole" / "results.h5")
    np.testing.assert_allclose(got.rounds["eval_loss"], want.rounds["eval_loss"], rtol=0, atol=0)
    assert got.attrs["run_id"] == Results(two_runs / "a" / "results.h5").attrs["run_id"]


@pytest.mark.parametrize("swapped, falls_back_to", [
    (["round000003.rank0000of0001.pt"], 2),  # the newest checkpoint is another run's: the round before
    (["round000003.results.h5"], 2),  # its results snapshot is another run's
])
def test_another_runs_files_are_never_used_and_the_resume_falls_back(two_runs, tmp_path, capsys, swapped,
                                                                      falls_back_to):
    out = tmp_path / "a"
    shutil.copytree(two_runs / "a", out)
    _swap(out, two_runs / "b", swapped)
    assert _resume(out) == 0
    err = capsys.readouterr().err
    assert "holds another run's files" in err and swapped[0] in err, err[-3000:]
    assert f"after round {falls_back_to} of 5" in err, err[-3000:]
    _equal_to_whole(two_runs, out)


def test_a_file_of_this_run_with_other_settings_inside_is_not_used(two_runs, tmp_path, capsys):
    """Round 3's rank file carries this run's id but another settings fingerprint (rewritten with a valid
    checksum, as no run of this project writes it): the resume names it and falls back to round 2."""
    import torch

    from fedpipe_dist.io.checkpoint import checksum_path, sha256_of

    out = tmp_path / "a"
    shutil.copytree(two_runs / "a", out)
    path = out / "checkpoint" / "round000003.rank0000of0001.pt"
    state = torch.load(path, weights_only=False)
    state["settings"] = {**state["settings"], "train.lr": "0.5"}
    torch.save(state, path)
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")
    assert _resume(out) == 0
    err = capsys.readouterr().err
    assert "round000003.rank0000of0001.pt' was written with other settings (train.lr differ)" in err, err[-3000:]
    assert "after round 2 of 5" in err, err[-3000:]
    _equal_to_whole(two_runs, out)


def test_a_foreign_chain_link_with_nothing_older_to_resume_exits_2_naming_it(two_runs, tmp_path, capsys):
    """Round 3 continues round 2's link, which is another run's (and round 1 kept no results snapshot): exit 2
    naming the file, and nothing changed."""
    out = tmp_path / "a"
    shutil.copytree(two_runs / "a", out)
    _swap(out, two_runs / "b", ["round000002.rank0000of0001.pt"])
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".fedpipe.lock"}
    assert _resume(out) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint of this run" in err and "round000002.rank0000of0001.pt' belongs to run" in err
    assert {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".fedpipe.lock"} \
        == before


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.sampled_from(["round000001.rank0000of0001.pt", "round000002.rank0000of0001.pt",
                                "round000003.rank0000of0001.pt", "round000002.results.h5",
                                "round000003.results.h5"]), min_size=1))
def test_random_foreign_files_resume_bitwise_or_exit_2_naming_a_file(two_runs, tmp_path_factory, capsys, swapped):
    capsys.readouterr()
    out = tmp_path_factory.mktemp("prop") / "a"
    shutil.copytree(two_runs / "a", out)
    present = {p.name for p in (out / "checkpoint").iterdir()}
    _swap(out, two_runs / "b", [n for n in swapped if n in present])
    rc = _resume(out)
    assert rc in (0, 2)
    if rc == 0:
        _equal_to_whole(two_runs, out)
    else:
        err = capsys.readouterr().err
        assert any(f"{name}' belongs to run" in err for name in swapped), err[-2000:]
