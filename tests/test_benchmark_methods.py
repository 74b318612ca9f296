"""Layer: benchmarks/compare_methods.py end to end on the offline quickstart job (2 methods, 1 round, 2 gloo
ranks under torchrun): the script runs real jobs and reads its table back from their results.h5 files.

Run: .venv/bin/python -m pytest tests/test_benchmark_methods.py -q      (about 30 s)
"""

import json
import sys

import pytest

from ._util import REPO

pytestmark = pytest.mark.dist


def test_compare_methods_runs_jobs_and_tabulates_them(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import compare_methods
    finally:
        sys.path.pop(0)
    monkeypatch.delenv("FEDPIPE_SHARED_DATA", raising=False)
    out = tmp_path / "cmp.json"
    doc = compare_methods.main(["--methods", "fedpipe", "hetlora", "--ranks", "2", "--rounds", "2",
                                "--stories-path", "", "--runs", str(tmp_path / "runs"), "--out", str(out),
                                "train.local_steps=2", "train.batch_max=4", "data.synthetic_train_size=64",
                                "data.synthetic_eval_size=16", "model.max_length=64", "eval.max_samples=16",
                                "clients.memory_gb=24", "clients.slowdown=1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    for m in ("fedpipe", "hetlora"):
        s = doc["methods"][m]
        assert (tmp_path / "runs" / m / "results.h5").is_file() and s["rounds"] == 2
        assert s["eval_loss"] < s["eval_loss0"] and s["bytes_up"] > 0 and s["trainable_params"] > 0
        assert len(s["curve_loss"]) == 3  # row 0 and both rounds (eval every round)
    table = compare_methods.markdown(doc)
    assert table.count("\n") == 3 and "| hetlora |" in table


def test_virtual_clients_benchmark_runs_and_reports(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import virtual_clients
    finally:
        sys.path.pop(0)
    doc = virtual_clients.main(["--clients", "4", "16", "--ranks", "2", "--rounds", "3", "--steps", "1",
                                "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "v.json"),
                                "model.max_length=64", "plan.variant=paper"])  # the plans these bounds were set for
    assert [x["clients"] for x in doc["results"]] == [4, 16]
    for x in doc["results"]:
        assert x["columns"] == x["clients"] and x["completed_per_round"] == x["clients"]
        assert x["agg_s"] > 0 and x["agg_peak_mib"] > 0 and x["round_s"] > 0
        assert 0 < x["agg_held_mib"] * 2**20 <= x["bytes_up_per_round"]
    # 4 servers: the stacked update (all factors) is the smaller downlink, so rank 0 holds it whole; 16: past
    # the dense break-even, rank 0 holds a dense running sum and one update, less than all uploads
    big = doc["results"][1]
    assert big["agg_held_mib"] * 2**20 < 0.5 * big["bytes_up_per_round"]
