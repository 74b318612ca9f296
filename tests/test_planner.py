"""Layer: algorithm/planner and algorithm/cost (Algorithm 1), pure functions in one process, no weights.

Run: .venv/bin/python -m pytest tests/test_planner.py -q
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpipe_dist.adapters.sites import find_sites
from fedpipe_dist.algorithm.cost import (
    adapter_flops_per_sample,
    base_flops_per_sample,
    flops_per_sample,
    memory_bytes,
    model_shape,
)
from fedpipe_dist.algorithm.planner import ServerBudget, fedpipe_plan, greedy_ranks, stage1_batch
from fedpipe_dist.models import model_from_config

RANKS = [16, 12, 8, 4, 2]


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=172, vocab_size=512, tie_word_embeddings=True)  # stories260K's shape
    model = model_from_config(cfg)
    return model_shape(model, find_sites(model))


def test_cost_model_by_hand(shape):
    q = [s for s in shape.sites if s.key == "0.q"][0]
    assert adapter_flops_per_sample(q, 4, 10) == 6 * 4 * (64 + 64) * 10
    # Linear params: 5 layers x (q 64x64 + k 32x64 + v 32x64 + o 64x64 + 3 MLP 64x172) + lm_head 512x64
    lin = 5 * (4096 + 2048 + 2048 + 4096 + 3 * 64 * 172) + 512 * 64
    assert shape.linear_params == lin
    assert base_flops_per_sample(shape, 10) == 4 * lin * 10 + 3 * 4 * 10 * 10 * 64 * 5
    assert flops_per_sample(shape, {"0.q": 4}, 10) == base_flops_per_sample(shape, 10) + 6 * 4 * 128 * 10
    # fp32 base, no adapters, batch 1, T 1: weights + one token's activations (gated MLP: 7 per d_model,
    # 3 per d_ff; sdpa keeps no attention probabilities) and 3 copies of the logits, +10 % backward peak.
    assert not shape.eager_attention and (shape.act_d, shape.act_ff) == (7, 3)
    assert memory_bytes(shape, precision="fp32", ranks={}, batch=1, seq_len=1) == (
        4 * shape.total_params + 1.10 * 4 * (5 * (7 * 64 + 3 * 172) + 3 * 512))


def test_stage1_batch_by_hand():
    assert stage1_batch([4.0, 2.0, 1.0, 3.0], 1, 8) == [8, 4, 2, 6]
    assert stage1_batch([3.0, 2.0, 1.0], 2, 8) == [8, 5, 2]  # floor(5.33) = 5; floor(2.67) = 2
    assert stage1_batch([100.0, 1.0], 2, 8) == [8, 2]  # clipped to b_min


def test_greedy_takes_most_important_first_and_highest_fitting_rank():
    items = [((0, -1), ["q"]), ((1, -1), ["v"]), ((2, -1), ["k"])]

    class S:
        def __init__(self, key):
            self.key = key

    items = [(order, [S(k) for k in keys]) for order, keys in items]

    def cost(sites, r):
        return 10.0 * r

    # budget 200: k (most important) gets 16 (160), then q: 4 (40) fits exactly, then nothing is left for v.
    ranks = greedy_ranks(items, [0.2, 0.1, 0.9], RANKS, 200.0, cost)
    assert ranks == {"k": 16, "q": 4}
    # ties fall back to the item order (q, v, k)
    assert greedy_ranks(items, [0.0, 0.0, 0.0], RANKS, 280.0, cost) == {"q": 16, "v": 12}


def _plan(shape, speeds, scores=None, mem=1e12, **kw):
    n = len(speeds)
    scores = scores if scores is not None else [np.zeros((5, 4))] * n
    args = dict(targets=["q", "k", "v", "o"], candidate_ranks=RANKS, ref_rank=8, b_min=1, b_max=8, seq_len=64,
                step_time_s=None)
    args.update(kw)
    return fedpipe_plan(shape, [ServerBudget(s, mem) for s in speeds], scores, **args)


def test_fastest_server_gets_uniform_lora_cost_and_importance_decides(shape):
    scores = np.zeros((5, 4))
    scores[:, 1] = 1.0  # k matters most
    plans, infos = _plan(shape, [1e10, 5e9], [scores, np.zeros((5, 4))])
    assert plans[0].batch_size == 8 and plans[1].batch_size == 4
    assert plans[0].ranks["0.k"] == 16 and plans[1].ranks.get("0.k", 0) == 0  # server 1 ties: q, v first
    assert plans[1].ranks["0.q"] == 16 and plans[1].ranks["0.v"] == 16
    assert all(i.fits for i in infos)
    # The budget is uniform LoRA's step at rank 8 on the fastest server.
    uniform = {s.key: 8 for s in shape.sites}
    assert infos[0].budget_flops == pytest.approx(8 * flops_per_sample(shape, uniform, 64))


def test_precision_is_the_most_bits_that_fit(shape):
    plans, _ = _plan(shape, [1e10])
    need = {p: memory_bytes(shape, precision=p, ranks=plans[0].ranks, batch=8, seq_len=64)
            for p in ("fp32", "fp16", "nf8", "nf4")}
    assert need["fp32"] > need["fp16"] > need["nf8"] > need["nf4"]
    for prec in ("fp32", "fp16", "nf8", "nf4"):  # a budget just above each precision's need picks it
        plans, infos = _plan(shape, [1e10], mem=need[prec] + 1)
        assert plans[0].precision == prec and infos[0].fits
    plans, infos = _plan(shape, [1e10], mem=1.0)  # nothing fits: flagged, never silently run
    assert not infos[0].fits


@settings(max_examples=60, deadline=None)
@given(speeds=st.lists(st.floats(min_value=1e8, max_value=1e11), min_size=2, max_size=8),
       seed=st.integers(0, 1000), b_min=st.integers(1, 3), granularity=st.sampled_from(["type", "layer"]))
def test_plans_fit_their_budget_and_are_monotone_in_compute(shape, speeds, seed, b_min, granularity):
    rng = np.random.default_rng(seed)
    common = rng.random((5, 4))  # the same importance for everyone: only compute differs
    plans, infos = _plan(shape, speeds, [common] * len(speeds), b_min=b_min, granularity=granularity)
    base = base_flops_per_sample(shape, 64)
    for p, i in zip(plans, infos):
        if i.fits:
            assert i.step_flops <= i.budget_flops * (1 + 1e-9)
        else:  # only when even the frozen model at b_min does not fit the step budget
            assert p.batch_size == b_min and b_min * base > i.budget_flops
    order = np.argsort(speeds)
    for lo, hi in zip(order[:-1], order[1:]):
        if speeds[hi] > speeds[lo]:
            assert plans[hi].batch_size >= plans[lo].batch_size
            assert sum(plans[hi].ranks.values()) >= sum(plans[lo].ranks.values())


@pytest.mark.parametrize("granularity", ["type", "layer"])
@pytest.mark.parametrize("rank_alloc", ["greedy", "spread"])
def test_a_step_time_below_uniform_loras_shrinks_batches_not_adapters_to_none(shape, granularity, rank_alloc):
    """plan.step_time_s below the default (fixed-rank LoRA's step on the fastest server): before, a_ref < 0 capped
    every server's adapters at nothing, so every plan "fit" and trained nothing. Now the batches shrink until
    adapters fit; every server trains some adapter within its budget, and the default's plans are unchanged."""
    speeds = [1e10, 6.7e9, 5e9, 3.3e9]
    default, dinfo = _plan(shape, speeds, granularity=granularity, rank_alloc=rank_alloc)
    tau = dinfo[0].budget_flops / speeds[0]  # the default step time
    base = base_flops_per_sample(shape, 64)
    for frac in (0.995, 0.97, 0.8, 0.5):
        plans, infos = _plan(shape, speeds, step_time_s=frac * tau, granularity=granularity, rank_alloc=rank_alloc)
        for p, i in zip(plans, infos):
            assert p.ranks and i.fits, (frac, p, i)
            assert p.batch_size <= 8 and i.step_flops <= i.budget_flops * (1 + 1e-9)
        if 8 * base > frac * tau * speeds[0]:  # the frozen model alone at batch 8 is over the step budget
            assert plans[0].batch_size < 8
    assert [p.batch_size for p in default] == [8, 5, 4, 2]


def test_ablation_switches(shape):
    """plan.importance=fixed keeps the tie order; random redraws it each round; uniform is fixed-rank LoRA.
    The paper's variant: its greedy allocation is what makes the weight choice matter (tuned spreads the
    budget over every weight: tests/test_variants.py)."""
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.heterogeneity import ServerProfile
    from fedpipe_dist.runtime.planning import RoundPlanner

    profiles = [ServerProfile(c, 0.1 / s, 24 * 2**30, s) for c, s in enumerate([1, 1.5, 2, 3])]

    def chosen(importance, mode="fedpipe", rounds=range(1, 7)):
        cfg = load_job("jobs/quickstart.yaml", [f"plan.importance={importance}", f"plan.mode={mode}",
                                                "model.max_length=64", "plan.variant=paper"])
        rp = RoundPlanner(cfg, shape, list(shape.sites), profiles, hosted=[0, 1, 2, 3])
        out = []
        for t in rounds:
            plans, _, _ = rp.plan(LocalComm(), t)
            out.append(tuple(sorted({k.split(".")[1] for k, r in plans[0].ranks.items() if r > 0})))
        return out, plans

    fixed, _ = chosen("fixed")
    assert set(fixed) == {("q", "v")}  # the budget of rank-8 LoRA on four weights: q and v at 16
    rand, _ = chosen("random")
    assert len(set(rand)) > 1  # a different random order shows up over six rounds
    uni, plans = chosen("platon", mode="uniform")
    assert set(uni) == {("k", "o", "q", "v")} and {p.batch_size for p in plans} == {8}
    assert all(set(p.ranks.values()) == {8} for p in plans)


def test_stage1_auto_by_hand():
    from fedpipe_dist.algorithm.planner import stage1_auto

    # o = 0: the paper's batches where u_i b_max >= b_min; a server below that takes fewer steps at b_min
    assert stage1_auto([1.0, 0.5, 0.25, 0.1], 1, 8, 10) == ([8, 4, 2, 1], [10, 10, 10, 8])
    # a step costing nearly the same at any batch: batch_max and steps in proportion to compute (split=steps)
    assert stage1_auto([1.0, 0.5, 0.25], 1, 8, 10, overhead=1e6) == ([8, 8, 8], [10, 5, 2])
    # in between, o = 8 (half of a batch-8 step is fixed): server 2's round is 10 x 0.5 x 16 = 80 samples' worth,
    # too little for 10 steps even at b_min (10 x 9 = 90): floor(80 / 9) = 8 steps, at batch floor(80 / 8 - 8) = 2
    assert stage1_auto([1.0, 0.5], 1, 8, 10, overhead=8.0) == ([8, 2], [10, 8])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.05, 1.0), min_size=1, max_size=8), st.integers(1, 4), st.integers(4, 16),
       st.integers(1, 20), st.floats(0.0, 1e4))
def test_stage1_auto_never_plans_past_a_servers_round(us, b_min, b_max, steps, o):
    from fedpipe_dist.algorithm.planner import stage1_auto

    speeds = [1.0, *us]
    batches, ks = stage1_auto(speeds, b_min, b_max, steps, o)
    for u, b, k in zip(speeds, batches, ks):
        assert b_min <= b <= b_max and 1 <= k <= steps
        room = steps * u * (o + b_max)
        fits_min = steps * (o + b_min) <= room * (1 + 1e-9)
        # within the server's round, unless even one step at b_min is more than it has
        assert k * (o + b) <= room * (1 + 1e-9) or (k == 1 and b == b_min)
        if fits_min:  # every step kept while b_min allows it
            assert k == steps
    assert batches[0] == b_max and ks[0] == steps  # the fastest server: the uniform plan
