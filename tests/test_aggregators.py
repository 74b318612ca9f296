"""Layer: algorithm/aggregation's registered methods (fedpipe, flora, flexlora, lora, hetlora) — pure tensor
math on hand-sized factors, one process, milliseconds. Issue 5, acceptance 1 (the aggregation half; the
engine does not run these methods yet).

Run: .venv/bin/python -m pytest tests/test_aggregators.py -q
"""

import math

import pytest
import torch

from fedpipe_dist.algorithm.aggregation import REGISTRY, ClientUpdate, get_aggregator
from fedpipe_dist.algorithm.aggregation.base import pad_rank
from fedpipe_dist.algorithm.aggregation.hetlora import prune_regularizer, pruned_rank

SHAPES = {"0.q": (12, 10), "0.v": (6, 10)}


def _updates(ranks, gen, n_samples=(30, 30, 30), batch=(4, 4, 4)):
    out = []
    for c, r in enumerate(ranks):
        factors = {k: (torch.randn(o, r, generator=gen), torch.randn(r, i, generator=gen))
                   for k, (o, i) in SHAPES.items()}
        out.append(ClientUpdate(c, n_samples[c], batch[c], factors))
    return out


def _mean_of_products(updates, weights):
    return {k: sum(w * (u.factors[k][0] @ u.factors[k][1]) for u, w in zip(updates, weights)) for k in SHAPES}


def test_registry_has_every_lora_family_method():
    assert {"fedpipe", "flora", "flexlora", "lora", "hetlora"} <= set(REGISTRY)
    with pytest.raises(KeyError, match="unknown aggregator 'fedsgd'"):
        get_aggregator("fedsgd")


def test_equal_ranks_equal_weights_fedpipe_flora_flexlora_agree_with_the_mean_of_products():
    ups = _updates([4, 4, 4], torch.Generator().manual_seed(0))
    w = [1 / 3] * 3
    expected = _mean_of_products(ups, w)
    for name in ("fedpipe", "flora", "flexlora"):
        agg = get_aggregator(name)
        got = agg.global_delta(agg.aggregate(ups, w))
        for k in SHAPES:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)
    # and the default weights agree too when |D_i| and b_i are equal
    for name in ("fedpipe", "flora", "flexlora", "lora"):
        assert get_aggregator(name).weights(ups) == pytest.approx(w)


def test_heterogeneous_ranks_stacking_is_exact_and_flexlora_keeps_the_sum():
    ups = _updates([2, 4, 8], torch.Generator().manual_seed(1), n_samples=(10, 20, 70), batch=(2, 4, 8))
    fp, fl = get_aggregator("fedpipe"), get_aggregator("flora")
    w_fp, w_fl = fp.weights(ups), fl.weights(ups)
    assert w_fp == pytest.approx([5 / 18.75, 5 / 18.75, 8.75 / 18.75])  # |D_i| / b_i: 10/2, 20/4, 70/8
    assert w_fl == pytest.approx([0.1, 0.2, 0.7])  # |D_i|
    for agg, w in ((fp, w_fp), (fl, w_fl), (get_aggregator("flexlora"), w_fl)):
        got = agg.global_delta(agg.aggregate(ups, w))
        for k, v in _mean_of_products(ups, w).items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)
    stacked = fp.aggregate(ups, w_fp).merge["0.q"]
    assert stacked[0].shape == (12, 14) and stacked[1].shape == (14, 10)  # rank 2 + 4 + 8


def test_hetlora_with_equal_ranks_is_fedavg_of_factors():
    ups = _updates([4, 4, 4], torch.Generator().manual_seed(2))
    w = [0.2, 0.3, 0.5]
    lora, het = get_aggregator("lora"), get_aggregator("hetlora")
    a_lora, a_het = lora.aggregate(ups, w).state, het.aggregate(ups, w).state
    for k in SHAPES:
        torch.testing.assert_close(a_het[k][0], a_lora[k][0])
        torch.testing.assert_close(a_het[k][1], a_lora[k][1])
        by_hand = (sum(wi * u.factors[k][0] for u, wi in zip(ups, w)),
                   sum(wi * u.factors[k][1] for u, wi in zip(ups, w)))
        torch.testing.assert_close(a_lora[k][0], by_hand[0])
        torch.testing.assert_close(a_lora[k][1], by_hand[1])
        assert lora.client_start(a_lora, k, 4)[0] is a_lora[k][0]
    # FedAvg of factors is not the mean of products (the cross terms): the reason stacking exists
    prod = lora.global_delta(lora.aggregate(ups, w))["0.q"]
    assert float((prod - _mean_of_products(ups, w)["0.q"]).norm()) > 1e-2
    with pytest.raises(ValueError, match="one rank per weight"):
        lora.aggregate(_updates([2, 4, 4], torch.Generator().manual_seed(3)), w)


def test_hetlora_pads_averages_and_truncates_per_client():
    b1, a1 = torch.ones(3, 1), torch.full((1, 2), 2.0)  # rank 1
    b2, a2 = torch.full((3, 2), 3.0), torch.full((2, 2), 4.0)  # rank 2
    ups = [ClientUpdate(0, 1, 1, {"k": (b1, a1)}), ClientUpdate(1, 1, 1, {"k": (b2, a2)})]
    het = get_aggregator("hetlora")
    st = het.aggregate(ups, [0.5, 0.5]).state
    torch.testing.assert_close(st["k"][0], torch.tensor([[2.0, 1.5]] * 3))  # column 2: (0 + 3) / 2
    torch.testing.assert_close(st["k"][1], torch.tensor([[3.0, 3.0], [2.0, 2.0]]))
    b, a = het.client_start(st, "k", 1)
    assert b.shape == (3, 1) and a.shape == (1, 2)
    torch.testing.assert_close(b, st["k"][0][:, :1])
    # sparsity-weighted aggregation: weights proportional to ||B_i A_i||_F
    n1, n2 = float((b1 @ a1).norm()), float((b2 @ a2).norm())
    assert het.weights(ups) == pytest.approx([n1 / (n1 + n2), n2 / (n1 + n2)])
    pb, pa = pad_rank(b1, a1, 3)
    assert pb.shape == (3, 3) and pa.shape == (3, 2) and float(pb[:, 1:].abs().sum() + pa[1:].abs().sum()) == 0


def test_hetlora_self_pruning_by_hand():
    b = torch.tensor([[1.0, 0.0, 3.0, 4.0]])  # rank 4, gamma 0.5: the last two columns / rows are regularized
    a = torch.tensor([[1.0], [1.0], [0.0], [2.0]])
    assert float(prune_regularizer(b, a, 0.5)) == pytest.approx(5.0 * 2.0)  # ||[3, 4]|| * ||[0, 2]||
    assert pruned_rank(4, 0.5, norm_now=1.0, norm_before=2.0) == 2
    assert pruned_rank(4, 0.5, norm_now=3.0, norm_before=2.0) == 4
    assert pruned_rank(1, 0.5, norm_now=0.1, norm_before=2.0) == 1  # never below min_rank
    assert pruned_rank(4, 0.5, norm_now=1.0, norm_before=None) == 4  # round 1: nothing to compare with


def test_flexlora_client_start_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(4)
    dw = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)  # rank 3
    flex = get_aggregator("flexlora")
    b, a = flex.client_start({"k": dw}, "k", 3)
    torch.testing.assert_close(b @ a, dw, rtol=1e-4, atol=1e-4)  # enough rank: exact
    s = torch.linalg.svdvals(dw.double())
    b, a = flex.client_start({"k": dw}, "k", 1)
    assert float((b @ a - dw).norm()) == pytest.approx(math.sqrt(float(s[1:].square().sum())), rel=1e-4)
    b, a = flex.client_start({"k": dw}, "k", 12)  # more rank than the matrix has: zero-padded
    assert b.shape == (12, 12) and a.shape == (12, 10)
    torch.testing.assert_close(b @ a, dw, rtol=1e-4, atol=1e-4)
    assert flex.client_start({}, "k", 4) is None  # round 1: no global adapter yet, fresh adapters


@pytest.mark.parametrize("name", ["fedpipe", "flora", "flexlora", "lora", "hetlora", "ft"])
@pytest.mark.parametrize("dense", [False, True])
def test_streaming_one_update_at_a_time_equals_aggregating_all(name, dense):
    """Rank 0 folds updates in as they arrive (raw weights, normalized at the end) and never holds all of
    them; the result equals the batch aggregate with normalized weights, in factored or dense form."""
    agg = get_aggregator(name)
    if dense and agg.averages_factors:  # FedAvg of B and of A has no dense form: refused
        with pytest.raises(ValueError, match="averages B and A separately"):
            agg.accumulate(None, _updates([4], torch.Generator().manual_seed(0))[0], 1.0, dense=True)
        return
    g = torch.Generator().manual_seed(3)
    ranks = [4, 4, 4] if name == "lora" else [2, 6, 4]
    ups = _updates(ranks, g, n_samples=(10, 30, 60), batch=(2, 4, 8))
    if name == "ft":  # dense parameter changes
        ups = [ClientUpdate(u.client, u.n_samples, u.batch_size, {k: b @ a for k, (b, a) in u.factors.items()})
               for u in ups]
    acc, total = None, 0.0
    for u in ups:
        w = agg.raw_weight(u)
        acc = agg.accumulate(acc, u, w, dense=dense)
        total += w
    streamed = agg.global_delta(agg.finish(acc, total))
    batch = agg.global_delta(agg.aggregate(ups, agg.weights(ups)))
    assert set(streamed) == set(batch) == set(SHAPES)
    for k in SHAPES:
        torch.testing.assert_close(streamed[k], batch[k], rtol=1e-5, atol=1e-5)


def test_streaming_fedavg_of_factors_refuses_mixed_ranks():
    agg = get_aggregator("lora")
    ups = _updates([4, 2], torch.Generator().manual_seed(0), n_samples=(1, 1), batch=(1, 1))
    acc = agg.accumulate(None, ups[0], 1.0)
    with pytest.raises(ValueError, match="one rank per weight"):
        agg.accumulate(acc, ups[1], 1.0)
