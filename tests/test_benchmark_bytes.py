"""Checks benchmarks/bytes_per_round.py against byte counts worked out by hand for the stories260K shape.

    .venv/bin/python -m pytest tests/test_benchmark_bytes.py -q

The expectations below are written out from the model's shapes (fp32, 4 bytes a value), not derived
with the benchmark's or the engine's code: stories260K has 5 layers, hidden 64, 8 query heads and 4
key/value heads of head_dim 8, so q and o are 64x64 and k and v are 32 (out) x 64 (in).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bytes_per_round.py"

# ---- hand computation, rank 4 on q, k, v, o of all 5 layers, 2 clients -------------------------------------
R, N, LAYERS = 4, 2, 5
# factored values per layer, r * (in + out):  q 4*(64+64)=512, k 4*(64+32)=384, v 384, o 512  -> 1792
FACTORED_UP = 4 * LAYERS * 1792  # 35,840 bytes per client
# dense values per layer, in * out:  q 4096, k 2048, v 2048, o 4096  -> 12288
DENSE_UP = 4 * LAYERS * 12288  # 245,760 bytes per client
# the factored download stacks both clients' factors: rank 2*4 = 8 per site -> twice one client's values
FACTORED_DOWN = 4 * LAYERS * (8 * 128 + 8 * 96 + 8 * 96 + 8 * 128)  # 71,680 bytes
DENSE_DOWN = DENSE_UP  # one dense dW per adapted site: 245,760 bytes


def _load():
    spec = importlib.util.spec_from_file_location("bytes_per_round", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(row):
    assert row["model"] == "stories260K"
    assert (row["rank"], row["n_clients"], row["n_layers"], row["adapted_sites"]) == (R, N, LAYERS, 20)
    f, d = row["factored"], row["dense"]
    assert f["client_up_bytes"] == FACTORED_UP == 35_840
    assert d["client_up_bytes"] == DENSE_UP == 245_760
    assert f["down_payload_bytes"] == FACTORED_DOWN == 71_680
    assert d["down_payload_bytes"] == DENSE_DOWN
    # round totals as the engine's HDF5 row records them: up = sum over clients, down = payload * N
    assert f["round_bytes_up"] == N * FACTORED_UP and d["round_bytes_up"] == N * DENSE_UP
    assert f["round_bytes_down"] == N * FACTORED_DOWN and d["round_bytes_down"] == N * DENSE_DOWN
    assert f["round_bytes_total"] == 215_040 and d["round_bytes_total"] == 983_040
    ratio = row["ratio_dense_over_factored"]
    assert ratio["client_up"] == pytest.approx(245_760 / 35_840)  # 48/7
    assert ratio["down_payload"] == pytest.approx(245_760 / 71_680)  # 24/7
    assert ratio["round_total"] == pytest.approx(983_040 / 215_040)  # 32/7
    assert row["engine_formula_agrees"] is True


def test_stories260k_two_clients_builtin_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FEDPIPE_SHARED_DATA", raising=False)
    out = tmp_path / "sub" / "bytes.json"
    doc = _load().main(["--models", "stories260K", "--clients", "2", "--ranks", "4", "--out", str(out)])
    assert len(doc["results"]) == 1
    row = doc["results"][0]
    assert row["config_source"] == "built-in LlamaConfig"
    _check(row)
    assert json.loads(out.read_text()) == doc  # the folder was created and the JSON is the returned document
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| stories260K | 20 | 4 | 2 |" in printed


def _shared_data() -> Path | None:
    root = Path(os.environ.get("FEDPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root if (root / "models" / "stories260K-hf" / "config.json").is_file() else None


@pytest.mark.shared_data
@pytest.mark.skipif(_shared_data() is None,
                    reason="needs ../shared/data/models/stories260K-hf (FEDPIPE_SHARED_DATA)")
def test_stories260k_two_clients_shared_config(tmp_path):
    root = _shared_data()
    doc = _load().main(["--models", "stories260K", "--clients", "2", "--stories-path", str(root),
                        "--out", str(tmp_path / "bytes.json")])
    row = doc["results"][0]
    assert row["config_source"].endswith("stories260K-hf/config.json")
    _check(row)
