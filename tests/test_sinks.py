"""rounds.csv beside results.h5 (issue 31): the same rows as rounds/, one line per round, rewritten on resume
so it never holds a round results.h5 does not; output.tensorboard asks for its package by name."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest

from fedpipe_dist.config import ConfigError
from fedpipe_dist.io.schema import ROUND_FIELDS
from fedpipe_dist.job import load_job
from tests._util import run_small


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rounds_csv_equals_results_h5_also_across_a_resume(tmp_path):
    run_small(tmp_path, "run", "rounds=2")
    assert len(_rows(tmp_path / "run" / "rounds.csv")) == 3  # row 0 and two rounds
    _, r = run_small(tmp_path, "run", "rounds=4", "resume=true")
    rows = _rows(tmp_path / "run" / "rounds.csv")
    assert list(rows[0]) == list(ROUND_FIELDS) and len(rows) == 5
    for k in ("round", "eval_loss", "bytes_up", "wall_s"):
        want = r.rounds[k]
        got = np.array([float(x[k]) if x[k] != "" else np.nan for x in rows])
        np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_no_csv_when_turned_off(tmp_path):
    run_small(tmp_path, "run", "rounds=1", "output.csv=false")
    assert not (tmp_path / "run" / "rounds.csv").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tensorboard_without_its_package_is_refused_by_name():
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        load_job("jobs/quickstart.yaml", ["output.tensorboard=true"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard package")
def test_tensorboard_event_files_hold_the_eval_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, r = run_small(tmp_path, "run", "rounds=2", "output.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    got = [e.value for e in acc.Scalars("round/eval_loss")]
    np.testing.assert_allclose(got, r.rounds["eval_loss"], rtol=1e-6)
