"""Issue 28, items 4 and 6: an eval sample smaller than the world size (ranks with no share of it add nothing
to the loss's sums; an empty share used to end rank 1 with an IndexError in the tokenizer, and `fedpipe check`
says what each rank evaluates), and rows with an empty mr or ref counted, not dropped silently.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability3.py -q      (about 30 s on 2 cores)
"""

import subprocess

import numpy as np

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
