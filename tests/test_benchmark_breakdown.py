"""Checks the issue-19 benchmarks without timing anything: benchmarks/round_breakdown.py adds a real run's
recorded phases up to its round wall-clock and run time; benchmarks/gpu_check.sh --cpu (the GPU check's dry
run at toy sizes) runs every step and prints its summary; step_vs_peft's JSON holds both sides.

    .venv/bin/python -m pytest tests/test_benchmark_breakdown.py -q      (about a minute)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, SMALL_RUN, shared_data, subprocess_env

sys.path.insert(0, str(REPO))
from benchmarks.round_breakdown import breakdown, table  # noqa: E402


def test_round_breakdown_adds_up_the_recorded_phases(tmp_path):
    from fedpipe_dist.cli import main

    out = tmp_path / "run"
    assert main(["run", "jobs/quickstart.yaml", *SMALL_RUN, f"output.dir={out}", "--no-progress",
                 "eval.max_samples=8"]) == 0
    d = breakdown(out / "results.h5")
    r = Results(out / "results.h5")
    wall = float(r.rounds["wall_s"][1:].sum())
    assert d["rounds"] == 3 and math.isclose(d["run"]["rounds_s"], wall)
    assert math.isclose(sum(d["round_phases_s"].values()), wall, rel_tol=1e-9)
    assert 0 <= d["round_phases_s"]["other_s"] < 0.2 * wall  # the phases cover the round, less the append
    assert math.isclose(sum(d["run_share"].values()), 1.0)
    assert set(d["setup_phases"][0]) >= {"model", "train_data", "eval_data", "profile", "bases"}
    # a sample of 8 of the 24 eval examples: its standard error, and the whole set at the end
    assert d["eval"]["sample_loss_se_last"] > 0 and d["eval"]["full_tokens"] > d["eval"]["sample_tokens"] > 0
    assert "final model on the whole eval set" in table(d)


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--parts", "1 2 3 4 5",
                        str(tmp_path)], cwd=REPO,
                       env=subprocess_env(FEDPIPE_PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "quickstart: final eval loss" in p.stdout and "nf4: final eval loss" in p.stdout, p.stdout
    d = json.loads((tmp_path / "step_vs_peft.json").read_text())
    m = d["models"]["llama-34M"]
    assert m["params"] > 20e6 and m["median_tokens_per_s"]["engine"] > 0 and m["median_tokens_per_s"]["peft"] > 0
    assert "step_vs_peft llama-34M: engine" in p.stdout and "gpu_check: done" in p.stderr
    ops = json.loads((tmp_path / "step_ops.json").read_text())["models"]
    assert set(ops) == {"llama-34M", "gpt2-29M"} and all(v["engine"]["aten_ops"] > 100 for v in ops.values())
    # the same adapters on q, k, v, o: the engine's step dispatches no more than 5 % more operators than peft's
    assert ops["llama-34M"]["engine"]["aten_ops"] <= 1.05 * ops["llama-34M"]["peft"]["aten_ops"], ops["llama-34M"]
    assert "step_ops llama-34M: engine" in p.stdout
    micro = json.loads((tmp_path / "scale_7b_micro.json").read_text())  # 2048 wide: the sampled check
    assert micro["merge_s"] > 0 and micro["copy_bw"] > 0 and micro["stack_rank"] == 60, micro
    assert "scale_7b micro (cpu, 2048 wide" in p.stdout


@pytest.mark.slow
@pytest.mark.shared_data
def test_gpu_check_clock_part_dry_run_on_the_cpu(tmp_path):
    """Part 6 (issue 27's clock on the device): time_to_quality's rows LoRA, lora_hb, the default and
    plan.step_cost=measured at toy size, and the summary with the measured row's fitted step cost."""
    data = shared_data()
    if data is None:
        pytest.skip("needs ../shared/data (stories260K-hf and E2E) or FEDPIPE_SHARED_DATA")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--parts", "6", str(tmp_path)],
                       cwd=REPO, env=subprocess_env(FEDPIPE_PYTHON=sys.executable, FEDPIPE_SHARED_DATA=data),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "clock.json").read_text())["profiles"]["p4"]["seeds"]["0"]["methods"]
    assert set(rows) == {"lora", "lora_hb", "tuned+carry=adapter", "tuned+measured"}, list(rows)
    assert rows["lora"]["speedup"] == 1.0 and all(math.isfinite(v["speedup"]) for v in rows.values()), rows
    s = json.loads((tmp_path / "clock_summary.json").read_text())["p4"]
    assert set(s["rows"]) == {"LoRA", "lora_hb", "kept adapter", "GPU default"} and s["fits"][0]["t0_s"] >= 0, s
    assert "clock p4: 1 seed(s) finished" in p.stdout and "fit t0" in p.stdout, p.stdout


def test_scale_7b_summary_extrapolates_each_phase_to_32_layers_and_totals_the_shares():
    from argparse import Namespace

    from benchmarks import scale_7b

    def run(L, ckpt_mib):  # every phase 0.1 s + 0.2 s per layer
        phases = {k: 0.1 + 0.2 * L for k in (*scale_7b.PHASES, "checkpoint_s")}
        return {**phases, "bytes_up": 7.5 * 2**20 * L, "bytes_down": 120 * 2**20 * L, "rank0_peak_bytes": 2**30 * L,
                "checkpoint_bytes_per_rank": ckpt_mib * 2**20 * L}

    runs = {"full": {1: run(1, 256), 2: run(2, 256)}, "chain": {1: run(1, 7.5), 2: run(2, 7.5)}}
    mic = {"check_s": 0.04, "exact_check_s": 1.9, "importance_s": 0.006, "norms_s": 0.002, "copy_bw": 4e9}
    res = scale_7b.summarize(runs, mic, Namespace(layers=[1, 2], rounds=2, seq=32, a100_tflops=156.0, link_gbs=25.0))
    rows = res["phases"]
    assert rows["merge_s"]["at_32"] == pytest.approx(0.1 + 0.2 * 32)
    assert rows["merge_s"]["a100_s"] == pytest.approx(rows["merge_s"]["at_32"] * 4e9 / scale_7b.A100_BW)
    assert rows["plan_s"]["at_32"] == pytest.approx(0.1 + 0.2 * 1.5)  # width-independent: the mean over runs
    assert rows["check_s"]["at_32"] == pytest.approx(0.04 * 32)
    assert res["checkpoint_bytes_ratio"] == pytest.approx(7.5 / 256)
    assert res["non_training_a100_s"] == pytest.approx(sum(rows[k]["a100_s"] for k in res["non_training"]))
    assert res["a100_round_train_s"] > 0 and res["non_training_share"] == pytest.approx(
        res["non_training_a100_s"] / res["a100_round_train_s"])
    assert "share of A100 round" in scale_7b.table(res)
