"""Checks benchmarks/cost_model.py on the built-in tiny-llama (seconds): JSON structure, and that its
predicted step-time ratios are b * f_c ratios worked out by hand from the model's shapes. No timing
assertions: timings are noisy, so only their arithmetic (ratios, errors) is checked.

    .venv/bin/python -m pytest tests/test_benchmark_cost.py -q

tiny-llama (fedpipe_dist.models.TINY_CONFIGS): 2 layers, hidden 64, 4 query heads and 2 key/value heads of
head_dim 16, d_ff 172, vocab 259 (byte-level tokenizer), tied LM head. So q and o are 64x64, k and v are
32 (out) x 64 (in), and the frozen matmul weights hold
    2 x (4096 + 2048 + 2048 + 4096 + 3 x 64 x 172) + 259 x 64 = 107,200 parameters.
With T = 16 tokens, FLOPs per sample (cost.py's accounting, written out here, not called):
    base              4 x 107,200 x 16 + 12 x 16^2 x 64 x 2   = 7,254,016
    adapters, rank r  6 r (in + out) T over the adapted sites; sum of (in + out) over q, k, v, o of both
                      layers = 2 x (128 + 96 + 96 + 128) = 896, over q alone 2 x 128 = 256
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "cost_model.py"

T = 16
BASE_16 = 4 * 107_200 * 16 + 12 * 16 * 16 * 64 * 2  # 7,254,016
BASE_32 = 4 * 107_200 * 32 + 12 * 32 * 32 * 64 * 2  # 15,294,464
F_R16_QKVO = BASE_16 + 6 * 16 * 896 * 16  # 8,630,272
F_R4_QKVO = BASE_16 + 6 * 4 * 896 * 16  # 7,598,080
F_R2_Q = BASE_16 + 6 * 2 * 256 * 16  # 7,303,168
F_R4_QKVO_32 = BASE_32 + 6 * 4 * 896 * 32  # 15,982,592
EXPECTED = {  # pair -> (b_A f_A) / (b_B f_B)
    "batch 8 vs 2": 4.0,
    "rank 16 qkvo vs rank 2 q": F_R16_QKVO / F_R2_Q,
    "b4 r16 vs b8 r4": 4 * F_R16_QKVO / (8 * F_R4_QKVO),
    "b4 2T vs b8 T (attention)": 4 * F_R4_QKVO_32 / (8 * F_R4_QKVO),
    "batch 8 vs 1": 8.0,
}


def _load():
    spec = importlib.util.spec_from_file_location("bench_cost_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_tiny_llama_run(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "sub" / "cost.json"
    doc = bench.main(["--model", "tiny-llama", "--seq-len", str(T), "--reps", "2", "--warmup", "1",
                      "--examples", "16", "--mem-points", "2:16:qkvo:4", "--no-fit", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))  # the folder was made; same document

    meta = doc["meta"]
    assert meta["model"] == "tiny-llama" and meta["seq_len"] == T and meta["threads"] == 1
    assert meta["shape"]["linear_params"] == 107_200 and meta["shape"]["vocab"] == 259

    st = doc["step_time"]
    assert st["target_rel_error"] == 0.25 and st["reps"] == 2 and st["n_pairs"] == len(EXPECTED)
    pairs = {p["pair"]: p for p in st["pairs"]}
    assert set(pairs) == set(EXPECTED)
    for name, ratio in EXPECTED.items():
        p = pairs[name]
        assert p["predicted_ratio"] == pytest.approx(ratio, rel=1e-12), name
        # the error is computed from the two ratios (whatever the timings were)
        assert p["measured_ratio"] > 0 and math.isfinite(p["measured_ratio"])
        assert p["rel_error"] == pytest.approx(abs(p["predicted_ratio"] / p["measured_ratio"] - 1))
        assert p["within_target"] == (p["rel_error"] <= 0.25)
    assert st["pairs_within_target"] == sum(p["within_target"] for p in st["pairs"])

    variants = {v["name"]: v for v in st["variants"]}
    assert len(variants) == 7  # the five pairs share variants
    assert variants["b8 T16 r16 qkvo"]["flops_per_sample"] == F_R16_QKVO
    assert variants["b8 T16 r2 q"]["flops_per_sample"] == F_R2_Q
    assert variants["b4 T32 r4 qkvo"]["step_flops"] == 4 * F_R4_QKVO_32
    assert variants["b8 T16 r4 qkvo"]["adapter_params"] == 4 * 896
    for v in variants.values():
        assert len(v["times_s"]) == 2 and v["median_s"] > 0
        assert set(v["phases_median_s"]) == {"forward", "backward", "update"}

    (point,) = doc["memory"]["points"]
    assert (point["batch"], point["seq_len"], point["targets"], point["rank"]) == (2, 16, "qkvo", 4)
    assert point["attn"] == "sdpa"
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import memory_bytes, model_shape

    model, _ = bench.build("tiny-llama", seed=0)
    sites = find_sites(model)
    ranks = {s.key: 4 for s in sites}
    assert point["predicted"]["total_bytes"] == memory_bytes(model_shape(model, sites), precision="fp32",
                                                             ranks=ranks, batch=2, seq_len=16)
    m = point["measured"]
    assert m["adapter_params"] == 4 * 896  # the child built the plan's adapters
    assert m["adapter_bytes"] == 4 * 4 * 896 and m["adamw_moment_bytes"] >= 2 * 4 * 4 * 896
    # fp32 parameters: embedding 259x64 (tied) + 2 x (45,312 matmul + 2 x 64 norm) + 64 final norm = 107,520,
    # plus the rotary buffers
    assert m["base_bytes"] >= 4 * 107_520 and m["base_bytes"] - 4 * 107_520 < 1024
    assert m["window_peak_bytes"] > 0
    assert m["total_bytes"] == m["static_bytes"] + m["window_peak_bytes"]
    assert point["signed_error"] == pytest.approx(point["predicted"]["total_bytes"] / m["total_bytes"] - 1)
    assert "activation_fit" not in doc["memory"]

    printed = capsys.readouterr().out
    assert "| batch 8 vs 2 | b8 T16 r4 qkvo | b2 T16 r4 qkvo | 4.000 |" in printed
    assert "| b2 T16 r4 qkvo |" in printed


def test_variant_spec_parsing():
    bench = _load()
    v = bench.parse_variant("8:256:qkvo:4:eager")
    assert (v.batch, v.seq_len, v.targets, v.rank, v.attn, v.name) == (8, 256, "qkvo", 4, "eager",
                                                                       "b8 T256 r4 qkvo eager")
    assert bench.parse_variant("2:16:q:2").attn == "sdpa"
    with pytest.raises(Exception):
        bench.parse_variant("8:128:xyz:4")
