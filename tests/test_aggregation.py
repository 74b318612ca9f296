"""Layer: algorithm/aggregation and comm/payload — pure tensor math, one process, milliseconds.

Run: .venv/bin/python -m pytest tests/test_aggregation.py -q
"""

import torch

from fedpipe_dist.adapters.sites import Site
from fedpipe_dist.algorithm.aggregation import (
    ClientUpdate,
    aggregate_factored,
    aggregation_weights,
    dense_sum,
    factored_to_dense,
)
from fedpipe_dist.comm.payload import (
    dense_layout,
    downlink_is_dense,
    factor_layout,
    layout_numel,
    pack,
    pack_dense,
    stacked_layout,
    unpack,
    unpack_dense,
)


def _sites():
    return [Site(0, "q", "m.q", 0, 12, 10, "linear"), Site(0, "v", "m.v", 0, 6, 10, "linear")]


def _update(client, ranks, n_samples, batch, gen):
    factors = {}
    for s in _sites():
        r = ranks.get(s.key, 0)
        if r:
            factors[s.key] = (torch.randn(s.out_features, r, generator=gen),
                              torch.randn(r, s.in_features, generator=gen))
    return ClientUpdate(client, n_samples, batch, factors)


def test_weights_are_samples_over_batch_normalized():
    # |D| = 100, 300, 50 with b = 4, 8, 1 -> raw 25, 37.5, 50 -> /112.5
    w = aggregation_weights([100, 300, 50], [4, 8, 1])
    assert w == [25 / 112.5, 37.5 / 112.5, 50 / 112.5]
    assert abs(sum(w) - 1.0) < 1e-12


def test_factored_stack_equals_dense_weighted_sum_heterogeneous_ranks():
    g = torch.Generator().manual_seed(0)
    ups = [_update(0, {"0.q": 4, "0.v": 2}, 100, 4, g), _update(1, {"0.q": 8}, 300, 8, g),
           _update(2, {"0.q": 2, "0.v": 6}, 50, 1, g)]
    w = aggregation_weights([u.n_samples for u in ups], [u.batch_size for u in ups])
    fact = factored_to_dense(aggregate_factored(ups, w))
    dense = dense_sum(ups, w)
    # Hand-formed reference: sum_i w_i B_i A_i in float64.
    for key in ("0.q", "0.v"):
        ref = sum(wi * (u.factors[key][0].double() @ u.factors[key][1].double())
                  for u, wi in zip(ups, w) if key in u.factors)
        for got in (fact[key], dense[key]):
            rel = (got.double() - ref).norm() / ref.norm()
            assert rel < 1e-6, (key, float(rel))
    assert aggregate_factored(ups, w)["0.q"][0].shape == (12, 4 + 8 + 2)  # ranks stack


def test_equal_ranks_single_client_is_identity():
    g = torch.Generator().manual_seed(1)
    u = _update(0, {"0.q": 4, "0.v": 4}, 10, 2, g)
    merged = factored_to_dense(aggregate_factored([u], aggregation_weights([10], [2])))
    torch.testing.assert_close(merged["0.q"], u.factors["0.q"][0] @ u.factors["0.q"][1])


def test_pack_unpack_round_trip_and_sizes():
    g = torch.Generator().manual_seed(2)
    sites = _sites()
    ranks = {"0.q": 3, "0.v": 5}
    u = _update(0, ranks, 10, 2, g)
    layout = factor_layout(sites, ranks)
    flat = pack(u.factors, layout)
    assert flat.numel() == layout_numel(layout) == 3 * (12 + 10) + 5 * (6 + 10)
    back = unpack(flat, layout)
    for k in ranks:
        assert torch.equal(back[k][0], u.factors[k][0]) and torch.equal(back[k][1], u.factors[k][1])
    stacked = stacked_layout(sites, [ranks, {"0.q": 2}])
    assert layout_numel(stacked) == 5 * (12 + 10) + 5 * (6 + 10)
    dl = dense_layout(sites, {"0.q"})
    d = {"0.q": torch.randn(12, 10, generator=g)}
    assert torch.equal(unpack_dense(pack_dense(d, dl), dl)["0.q"], d["0.q"])


def test_unpack_rejects_wrong_size():
    layout = factor_layout(_sites(), {"0.q": 2})
    try:
        unpack(torch.zeros(5), layout)
    except ValueError as e:
        assert "layout needs" in str(e)
    else:
        raise AssertionError("a payload of the wrong size was accepted")


def test_downlink_picks_the_smaller_exact_form():
    sites = _sites()  # q: 12 x 10 (break-even rank 120/22 = 5.45), v: 6 x 10 (60/16 = 3.75)
    # stacked ranks 5 on q and 3 on v: 5*22 + 3*16 = 158 values < 120 + 60 dense
    assert not downlink_is_dense(stacked_layout(sites, [{"0.q": 5, "0.v": 3}]))
    # ranks 6 and 4: 6*22 + 4*16 = 196 > 180
    assert downlink_is_dense(stacked_layout(sites, [{"0.q": 2, "0.v": 2}, {"0.q": 4, "0.v": 2}]))
