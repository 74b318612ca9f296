"""Layer: FedPipe's variants (plan.variant and its switches, docs/planner.md): planner, aggregation weights,
local-loop settings, and the paper variant pinned to the numbers the code gave before the switches existed.

Run: .venv/bin/python -m pytest tests/test_variants.py -q        (about 20 s; no shared data needed)
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpipe_dist.adapters.sites import find_sites
from fedpipe_dist.algorithm.aggregation import ClientUpdate, get_aggregator
from fedpipe_dist.algorithm.aggregation.base import to_dense
from fedpipe_dist.algorithm.cost import flops_per_sample, model_shape
from fedpipe_dist.algorithm.planner import (
    ServerBudget,
    fedpipe_plan,
    spread_ranks,
    stage1_batch,
    stage1_steps,
)
from fedpipe_dist.config import PLAN_VARIANTS
from fedpipe_dist.job import load_job
from fedpipe_dist.models import model_from_config

GOLDEN = Path(__file__).parent / "golden"
RANKS = [16, 12, 8, 4, 2]


def _shape(name: str):
    from transformers import GPT2Config, LlamaConfig

    cfg = {"stories260K": LlamaConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=8,
                                      num_key_value_heads=4, intermediate_size=172, vocab_size=512,
                                      tie_word_embeddings=True),
           "gpt2-256": GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=259)}[name]
    model = model_from_config(cfg)
    return model_shape(model, find_sites(model))


# ---- the paper's variant is what the code did before the switches existed ------------------------------------

PINNED = json.loads((GOLDEN / "paper_plans.json").read_text())


@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c['shape']}-{len(c['slowdown'])}-{c['granularity']}-"
                                                      f"{c['memory']}")
def test_paper_variant_reproduces_the_pinned_plans(case):
    """tests/golden/paper_plans.json was written by the planner at commit 0486b01 (before plan.variant): 16
    profiles (2 shapes x slowdowns [1, 1.5, 2, 3] and [1, 1, 1.5, 2, 2, 3, 4, 6] x type/layer x roomy/tight
    memory), seeded importance scores. The paper's switches must give the same batches, ranks, precisions."""
    shape = _shape(case["shape"])
    p = PLAN_VARIANTS["paper"]
    servers = [ServerBudget(1e11 / s, m) for s, m in zip(case["slowdown"], case["mem_bytes"])]
    plans, infos = fedpipe_plan(shape, servers, [np.array(s) for s in case["scores"]], targets=["q", "k", "v", "o"],
                                candidate_ranks=RANKS, ref_rank=8, b_min=1, b_max=8, seq_len=128, step_time_s=None,
                                granularity=case["granularity"], precision="auto", split=p["plan.split"],
                                rank_alloc=p["plan.rank_alloc"], step_overhead_s=p["plan.step_overhead_s"],
                                local_steps=10)
    got = [{"batch_size": pl.batch_size, "ranks": {k: r for k, r in pl.ranks.items()}, "precision": pl.precision}
           for pl in plans]
    assert got == case["plans"]
    assert [i.fits for i in infos] == case["fits"]
    assert [i.predicted_step_s for i in infos] == pytest.approx(case["predicted_step_s"], rel=1e-12)


def test_paper_variant_engine_run_reproduces_the_pinned_losses(tmp_path):
    """The quickstart job (tiny GPT-2, 4 servers, slowdowns [1, 1.5, 2, 3]) for 3 rounds in one process, with
    plan.variant=paper: the eval losses and plans the engine gave at commit 0486b01 (before plan.variant)."""
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.io.hdf5 import Results
    from fedpipe_dist.runtime.engine import run_job

    pinned = json.loads((GOLDEN / "paper_quickstart.json").read_text())
    cfg = load_job("jobs/quickstart.yaml", ["rounds=3", "plan.variant=paper", "clients.throttle=clock",
                                            f"output.dir={tmp_path}", "checkpoint.enabled=false",
                                            "output.save_final=false"])
    run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "results.h5")
    assert r.rounds["eval_loss"].tolist() == pytest.approx(pinned["eval_loss"], rel=1e-5)
    assert r.clients["batch_size"][1:].tolist() == pinned["batch_size"]
    assert r.clients["ranks"][1:].max(axis=2).tolist() == pinned["ranks_max_over_layers"]


# ---- planner switches ------------------------------------------------------------------------------------------


def test_stage1_with_a_fixed_step_cost_by_hand():
    # o = 2 samples' worth per step: b_i = floor(u_i (2 + 8) - 2)
    assert stage1_batch([3.0, 2.0, 1.5, 1.0], 1, 8, overhead=2.0) == [8, 4, 3, 1]
    assert stage1_batch([3.0, 2.0, 1.5, 1.0], 1, 8, overhead=0.0) == stage1_batch([3.0, 2.0, 1.5, 1.0], 1, 8)
    assert stage1_steps([3.0, 2.0, 1.5, 1.0], 10) == [10, 6, 5, 3]
    assert stage1_steps([100.0, 1.0], 10) == [10, 1]  # at least one step


class _Site:
    def __init__(self, key, in_f, out_f):
        self.key, self.in_features, self.out_features = key, in_f, out_f


def test_spread_ranks_by_hand():
    items = [((0, -1), [_Site("q", 10, 10)]), ((1, -1), [_Site("v", 10, 10)]), ((2, -1), [_Site("k", 5, 5)])]

    def cost(sites, r):
        return sum(r * (s.in_features + s.out_features) for s in sites)

    # all three at 8: 8 * (20 + 20 + 10) = 400 (at 12: 600, too much); the leftover 60 goes by importance:
    # v at 12 costs 80 more (no), k at 12 costs 40 more (yes), q at 12 costs 80 more (no)
    assert spread_ranks(items, [0.1, 0.9, 0.5], RANKS, 460, cost) == {"q": 8, "v": 8, "k": 12}
    # greedy (Algorithm 1): v at 16 (320), k at 12 (120), and the 20 left buys q nothing (rank 2 costs 40)
    from fedpipe_dist.algorithm.planner import greedy_ranks

    assert greedy_ranks(items, [0.1, 0.9, 0.5], RANKS, 460, cost) == {"v": 16, "k": 12}
    # too little for every weight even at rank 2 (100): the most important ones take rank 2
    assert spread_ranks(items, [0.1, 0.9, 0.5], RANKS, 70, cost) == {"v": 2, "k": 2}


def test_steps_split_plans_full_batches_and_steps_by_compute():
    shape = _shape("stories260K")
    slow = [1, 1.5, 2, 3]
    servers = [ServerBudget(1e11 / s, 24 * 2**30) for s in slow]
    scores = [np.ones((5, 4))] * 4
    kw = dict(targets=["q", "k", "v", "o"], candidate_ranks=RANKS, ref_rank=8, b_min=1, b_max=8, seq_len=128,
              step_time_s=None, local_steps=10)
    plans, infos = fedpipe_plan(shape, servers, scores, split="steps", rank_alloc="spread", **kw)
    assert [p.batch_size for p in plans] == [8] * 4
    assert [p.local_steps for p in plans] == [10, 6, 5, 3]
    # spread with the default budget (rank-8 LoRA's FLOPs on four weights) is exactly rank 8 everywhere
    assert all(set(p.ranks.values()) == {8} and len(p.ranks) == 20 for p in plans)
    # no server's round (its steps x its step time) is longer than the fastest server's
    rounds = [p.local_steps * i.predicted_step_s for p, i in zip(plans, infos)]
    assert max(rounds) == pytest.approx(rounds[0]) and all(i.fits for i in infos)
    # the paper's split: same steps, batches from compute
    paper, _ = fedpipe_plan(shape, servers, scores, **kw)
    assert [p.batch_size for p in paper] == [8, 5, 4, 2] and {p.local_steps for p in paper} == {10}


def test_step_overhead_makes_small_batches_smaller_and_is_charged():
    shape = _shape("stories260K")
    servers = [ServerBudget(1e11 / s, 24 * 2**30) for s in [1, 1.5, 2, 3]]
    kw = dict(targets=["q", "k", "v", "o"], candidate_ranks=RANKS, ref_rank=8, b_min=1, b_max=8, seq_len=128,
              step_time_s=None, local_steps=10)
    f_ref = flops_per_sample(shape, {s.key: 8 for s in shape.sites}, 128)
    t0 = 2 * f_ref / 1e11  # two samples' worth of the fastest server's compute
    plans, infos = fedpipe_plan(shape, servers, [np.ones((5, 4))] * 4, step_overhead_s=t0, **kw)
    assert [p.batch_size for p in plans] == [8, 4, 3, 1]  # floor(u (2 + 8) - 2)
    assert infos[0].predicted_step_s == pytest.approx(10 * f_ref / 1e11)  # t0 + 8 samples at rank 8
    assert all(i.step_flops <= i.budget_flops * (1 + 1e-9) for i in infos)


# ---- aggregation weights ---------------------------------------------------------------------------------------


def _ups():
    g = torch.Generator().manual_seed(0)
    meta = [(100, 8, 10), (100, 8, 6), (300, 8, 5), (100, 2, 10)]  # |D_i|, b_i, K_i
    return [ClientUpdate(i, n, b, {"0.q": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))}, k)
            for i, (n, b, k) in enumerate(meta)]


@pytest.mark.parametrize("weighting, raw", [
    ("paper", [100 / 8, 100 / 8, 300 / 8, 100 / 2]),
    ("data", [100, 100, 300, 100]),
    ("samples", [80, 48, 40, 20]),
    ("fednova", [10, 100 / 6, 60, 10]),
])
def test_fedpipe_weights_by_hand(weighting, raw):
    agg = get_aggregator("fedpipe", weights=weighting)
    assert agg.weights(_ups()) == pytest.approx([r / sum(raw) for r in raw])


def test_fednova_is_tau_eff_times_the_average_per_step_update():
    """FedNova: dW = tau_eff * sum_i p_i dW_i / K_i with p_i = |D_i| / sum |D_j|, tau_eff = sum_i p_i K_i."""
    ups = _ups()
    agg = get_aggregator("fedpipe", weights="fednova")
    merged = agg.aggregate(ups, agg.weights(ups))
    got = to_dense(merged.merge["0.q"]) * agg.round_scale(ups)
    p = np.array([100, 100, 300, 100]) / 600
    k = np.array([10, 6, 5, 10])
    want = float(np.sum(p * k)) * sum(pi / ki * to_dense(u.factors["0.q"]) for pi, ki, u in zip(p, k, ups))
    assert torch.allclose(got, want, atol=1e-5)
    # the other weightings are plain weighted averages
    for w in ("paper", "data", "samples"):
        assert get_aggregator("fedpipe", weights=w).round_scale(ups) == 1.0


def test_variants_resolve_and_explicit_switches_win():
    paper = load_job(None, ["plan.variant=paper"])
    assert (paper.plan.split, paper.plan.rank_alloc, paper.aggregation.weights) == ("batch", "greedy", "paper")
    mixed = load_job(None, ["plan.variant=paper", "plan.split=steps"])
    assert mixed.plan.split == "steps" and mixed.plan.rank_alloc == "greedy"
    for name, switches in PLAN_VARIANTS.items():
        cfg = load_job(None, [f"plan.variant={name}"])
        assert {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in switches} == switches


def test_lr_scaling():
    from fedpipe_dist.runtime.client import LocalTraining

    def lr(*overrides):
        return LocalTraining.of(load_job(None, ["train.lr=0.1", *overrides])).lr_for(2, 1)

    assert lr("plan.lr_scaling=none") == 0.1
    assert lr("plan.lr_scaling=sqrt", "train.batch_max=8") == pytest.approx(0.05)
    assert lr("plan.lr_scaling=linear", "train.batch_max=8") == pytest.approx(0.025)


def test_clock_throttle_charges_the_slowdown_without_waiting(monkeypatch):
    """clients.throttle=clock: no sleep; the deadline reads the charged clock (s x the step times)."""
    import fedpipe_dist.runtime.client as client
    from fedpipe_dist.algorithm.planner import ClientPlan
    from fedpipe_dist.data import format_example, load_train_pairs, tokenize_pairs
    from fedpipe_dist.models import load_model, load_tokenizer

    slept = []
    monkeypatch.setattr(client.time, "sleep", lambda s: slept.append(s))
    tok = load_tokenizer("tiny-gpt2")
    model = load_model("tiny-gpt2", seed=0, tokenizer=tok)
    sites = find_sites(model)
    data = tokenize_pairs(tok, [format_example(*p) for p in load_train_pairs(load_job(None, []).data, 0)[:32]], 64)
    plan = ClientPlan(0, 2, {s.key: 2 for s in sites}, "fp32", 3)

    def train(throttle, **kw):
        tr = client.LocalTraining.of(load_job(None, [f"clients.throttle={throttle}"]))
        return client.train_client(model, sites, plan, data, tr, round_idx=1, pad_id=tok.pad_token_id,
                                   device=torch.device("cpu"), slowdown=50.0, **kw)[1]

    st = train("clock")
    assert not slept and st.completed and st.local_steps == 3
    st = train("sleep")
    assert len(slept) == 3 and all(s > 0 for s in slept)
    # one step charged at 50x its time passes a deadline of 10x a step's time: the clock stops there
    step_s = st.local_s / 3  # one step's compute (sleep was a no-op here): 10x it is far from the first check
    # (a context switch on a loaded machine once passed a deadline of 0.2 steps before step 1), and 50x is past it
    st = train("clock", deadline_s=10 * step_s)
    assert not st.completed and st.local_steps == 1


def test_uniform_auto_precision_picks_the_most_bits_that_fit():
    """Baselines with clients.precision=auto take quantized bases where fp32 does not fit (ft cannot)."""
    from fedpipe_dist.algorithm.cost import memory_bytes
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.runtime.heterogeneity import ServerProfile
    from fedpipe_dist.runtime.planning import RoundPlanner

    shape = _shape("stories260K")
    ranks = {s.key: 8 for s in shape.sites}
    need = {p: memory_bytes(shape, precision=p, ranks=ranks, batch=8, seq_len=64) for p in ("fp32", "fp16", "nf4")}
    budgets = [need["fp32"] + 1, (need["fp16"] + need["fp32"]) / 2, need["nf4"] + 1, need["nf4"] - 1]
    profiles = [ServerProfile(c, 0.1, b, 1.0) for c, b in enumerate(budgets)]
    for method, want in (("lora", ["fp32", "fp16", "nf4", "nf4"]), ("ft", ["fp32"] * 4)):
        cfg = load_job(None, [f"method={method}", "lora.rank=8", "model.max_length=64", "clients.n=4"])
        plans, infos, _ = RoundPlanner(cfg, shape, list(shape.sites), profiles, hosted=[0, 1, 2, 3]).plan(
            LocalComm(), 1)
        assert [p.precision for p in plans] == want
        if method == "lora":
            assert [i.fits for i in infos] == [True, True, True, False]
        else:
            assert not all(i.fits for i in infos)  # ft's 16 B per parameter does not fit the tight budgets


@pytest.mark.parametrize("switches", [["plan.split=steps", "aggregation.weights=fednova", "lora.carry=none"],
                                      ["plan.variant=tuned", "lora.carry=none"]])  # (carry=adapter: factored only)
def test_factored_and_dense_transports_agree_under_the_switches(tmp_path, switches):
    """FedNova's tau_eff rides on the factored stack's normalization and on the dense reduce's weights alike:
    both transports must merge the same update (steps split: local steps 3, 2, 1, 1)."""
    from ._util import run_small

    het = ["clients.slowdown=[1,1.5,2,3]", "clients.throttle=clock", "rounds=2", *switches]
    _, f = run_small(tmp_path, "factored", *het, "aggregation.transport=factored")
    _, d = run_small(tmp_path, "dense", *het, "aggregation.transport=dense")
    assert f.clients["local_steps"][1:].tolist() == d.clients["local_steps"][1:].tolist()
    if "plan.split=steps" in switches:
        assert f.clients["local_steps"][1].tolist() == [3, 2, 1, 1]
    np.testing.assert_allclose(f.rounds["eval_loss"], d.rounds["eval_loss"], rtol=1e-5)
    assert f.rounds["eval_loss"][-1] < f.rounds["eval_loss"][0]
