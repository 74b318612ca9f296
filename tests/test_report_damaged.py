"""Issue 28, item 5: `fedpipe report` on a folder where some results.h5 are damaged names each one it cannot
read (path and reason), reports the rest and exits 0; with none readable it exits 2 naming them.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_report_damaged.py -q      (about 1 minute on 2 cores)
"""

import json
import shutil

import h5py
import numpy as np
import pytest

from fedpipe_dist.cli import main

from ._util import SMALL_RUN


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    for seed in (0, 1):
        assert main(["run", "jobs/quickstart.yaml", *SMALL_RUN, "rounds=2", f"seed={seed}",
                     f"output.dir={d / f'good{seed}'}", "output.save_final=false", "--no-progress"]) == 0
    return d


def _flip(path, at: int, n: int = 16):
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage(kind: str, path):
    if kind == "flipped header":
        _flip(path, 0)
    elif kind == "flipped metadata":
        _flip(path, 800, 64)
    elif kind == "missing dataset":
        with h5py.File(path, "a") as f:
            del f["rounds"]["eval_loss"]
    elif kind == "bad config_json":
        with h5py.File(path, "a") as f:
            f.attrs["config_json"] = "{not json"
    elif kind == "all-NaN loss":
        with h5py.File(path, "a") as f:
            f["rounds"]["eval_loss"][...] = np.nan
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "empty":
        path.write_bytes(b"")


KINDS = ["flipped header", "flipped metadata", "missing dataset", "bad config_json", "all-NaN loss", "truncated",
         "empty"]


@pytest.mark.parametrize("kind", KINDS)
def test_report_names_the_damaged_run_and_reports_the_rest(good, tmp_path, capsys, kind):
    root = tmp_path / "runs"
    shutil.copytree(good, root)
    bad = root / "bad" / "results.h5"
    bad.parent.mkdir()
    shutil.copyfile(good / "good0" / "results.h5", bad)
    _damage(kind, bad)
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr()
    assert "report: 2 run(s)" in out.out, out.out
    assert f"left out 1 run(s) that cannot be read: {bad}" in out.err, out.err
    assert (root / "report" / "tables.md").is_file()


def test_report_with_no_readable_run_exits_2_naming_them(good, tmp_path, capsys):
    root = tmp_path / "runs"
    for kind in ("empty", "bad config_json"):
        path = root / kind.replace(" ", "_") / "results.h5"
        path.parent.mkdir(parents=True)
        shutil.copyfile(good / "good0" / "results.h5", path)
        _damage(kind, path)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 results.h5" in err and "empty/results.h5" in err and "bad_config_json" in err, err
    assert "no results.h5 below" not in err


def test_config_json_that_is_not_a_mapping_is_named(good, tmp_path, capsys):
    path = tmp_path / "runs" / "x" / "results.h5"
    path.parent.mkdir(parents=True)
    shutil.copyfile(good / "good0" / "results.h5", path)
    with h5py.File(path, "a") as f:
        f.attrs["config_json"] = json.dumps([1, 2])
    assert main(["report", str(tmp_path / "runs")]) == 2
    assert "config_json is not a mapping" in capsys.readouterr().err
