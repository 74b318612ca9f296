"""Provenance (issue 31): every attempt of a run records where it came from in results.h5, and the report lists
it and marks wall-clock numbers from runs made under different conditions."""

from __future__ import annotations

import json
import socket

import h5py
import numpy as np

from fedpipe_dist.analysis.figures import tables_markdown
from fedpipe_dist.analysis.runs import conditions_note, load_runs
from tests._util import REPO, run_small


def test_every_attempt_records_its_provenance(tmp_path):
    _, r = run_small(tmp_path, "run", "rounds=1")
    _, r = run_small(tmp_path, "run", "rounds=2", "resume=true")
    attempts = [json.loads(str(x)) for x in r.attrs["provenance_json"]]
    assert len(attempts) == 2  # the first attempt and the resume
    p = attempts[0]
    assert p["hosts"] == [socket.gethostname()] and p["world_size"] == 1 and len(p["devices"]) == 1
    assert p["devices"][0].startswith("cpu")
    assert p["packages"]["torch"] == __import__("torch").__version__
    assert p["fedpipe_dist"] and p["python"] and p["started_at"].endswith("+00:00")
    head = __import__("subprocess").run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                         text=True)
    if head.returncode == 0:  # a git checkout: the commit, + dirty when tracked files differ
        assert p["commit"].split("+")[0] == head.stdout.strip()
    assert isinstance(p["load_avg_1m"], float) and p["cpus"] >= 1
    assert r.attrs["finished_at"] >= p["started_at"][:19]


def test_the_report_marks_runs_made_under_different_conditions(tmp_path):
    run_small(tmp_path, "a", "rounds=1")
    run_small(tmp_path, "b", "rounds=1", "seed=1")
    runs = load_runs(tmp_path)
    assert conditions_note(runs) is None or "load average" in conditions_note(runs)  # same host and device
    with h5py.File(tmp_path / "b" / "results.h5", "a") as f:  # as if b had run on a GPU node under load
        p = json.loads(str(f.attrs["provenance_json"][0]))
        p.update(hosts=["gpu-node-7"], devices=["cuda:0 NVIDIA H200"], load_avg_1m=p["load_avg_1m"] + 5)
        f.attrs["provenance_json"] = np.array([json.dumps(p)], dtype=h5py.string_dtype())
    note = conditions_note(load_runs(tmp_path))
    assert "2 different host sets" in note and "NVIDIA H200" in note and "load average at start" in note
    text, _ = tables_markdown(load_runs(tmp_path))
    assert "different conditions" in text and "| gpu-node-7 |" in text
