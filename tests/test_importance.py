"""Layer: algorithm/importance (Eqn 3-7), pure math against hand-computed values, milliseconds.

Run: .venv/bin/python -m pytest tests/test_importance.py -q
"""

import numpy as np
import torch

from fedpipe_dist.algorithm.importance import (
    ImportanceState,
    combine_scores,
    mean_singular_value,
    sensitivity_of,
)


def test_mean_singular_value_of_a_known_product():
    # B A = diag(3, 2, 0) embedded: B = [[3,0],[0,2],[0,0]], A = [[1,0,0],[0,1,0]] -> singular values 3, 2.
    b = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert abs(mean_singular_value(b, a) - 2.5) < 1e-12


def test_mean_singular_value_matches_full_svd():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    ref = torch.linalg.svdvals(b.double() @ a.double())[:6].mean().item()
    assert abs(mean_singular_value(b, a) - ref) < 1e-9


def test_sensitivity_is_mean_abs_weight_times_grad():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w.grad = torch.tensor([0.5, 0.5, -1.0])
    v = torch.tensor([[2.0]], requires_grad=True)
    v.grad = torch.tensor([[0.25]])
    # (|0.5| + |-1| + |-3| + |0.5|) / 4 entries
    assert sensitivity_of([w, v]) == (0.5 + 1.0 + 3.0 + 0.5) / 4


def test_platon_smoothing_by_hand():
    st = ImportanceState(1, lam1=0.5, lam2=0.5)
    nan = np.nan
    st.update(np.array([[2.0, nan, nan, nan]]), np.array([[1.0, nan, nan, nan]]))
    assert st.ibar[0, 0] == 2.0 and st.ubar[0, 0] == 0.0  # first observation starts the EMA
    st.update(np.array([[4.0, nan, nan, nan]]), np.array([[3.0, nan, nan, nan]]))
    # Ibar = 0.5*2 + 0.5*4 = 3; Ubar = 0.5*0 + 0.5*|4 - 3| = 0.5; phi = 1.5
    assert st.ibar[0, 0] == 3.0 and st.ubar[0, 0] == 0.5 and st.phi[0, 0] == 1.5
    st.update(np.array([[1.0, nan, nan, nan]]), np.array([[nan, nan, nan, nan]]))
    # Ibar = 0.5*3 + 0.5*1 = 2; Ubar = 0.5*0.5 + 0.5*|1 - 2| = 0.75; sv kept from the last measurement
    assert st.ibar[0, 0] == 2.0 and st.ubar[0, 0] == 0.75 and st.sv[0, 0] == 3.0
    assert np.isnan(st.ibar[0, 1])  # never measured stays unmeasured


def test_scores_normalize_each_term_and_fill_unmeasured_with_mean():
    sv = np.array([[3.0, 1.0, np.nan, np.nan]])
    phi = np.array([[1.0, 3.0, np.nan, np.nan]])
    s = combine_scores(sv, phi)
    # q: 3/4 + 1/4 = 1.0; k: 1/4 + 3/4 = 1.0; v, o unmeasured: mean of measured = 1.0
    np.testing.assert_allclose(s, [[1.0, 1.0, 1.0, 1.0]])
    s = combine_scores(np.array([[4.0, 1.0, np.nan, np.nan]]), np.array([[0.0, 0.0, np.nan, np.nan]]))
    # phi all zero carries no information: only sv shares count: 0.8, 0.2, then the mean 0.5
    np.testing.assert_allclose(s, [[0.8, 0.2, 0.5, 0.5]])
    assert (combine_scores(np.full((2, 4), np.nan), np.full((2, 4), np.nan)) == 0).all()  # round 1: ties


def test_sensitivity_sum_is_each_adapters_mean_summed_over_steps():
    """SensitivitySum (every adapter at once, a few multi-tensor ops per step) gives each adapter's Eqn 4 as
    the per-tensor form does, summed over the steps it saw; a tensor without a gradient (a frozen A) counts its
    entries with zero sensitivity."""
    from fedpipe_dist.algorithm.importance import SensitivitySum

    g = torch.Generator().manual_seed(0)
    groups = [[torch.randn(4, 16, generator=g), torch.randn(32, 4, generator=g)] for _ in range(3)]
    groups.append([torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g)])
    meter = SensitivitySum(groups)
    expect = torch.zeros(len(groups), dtype=torch.float64)
    for step in range(2):
        for i, grp in enumerate(groups):
            for j, p in enumerate(grp):
                p.grad = None if (i, j, step) == (1, 0, 1) else torch.randn(p.shape, generator=g, dtype=p.dtype)
            expect[i] += sum(float((p * p.grad).abs().sum()) for p in grp if p.grad is not None) / sum(
                p.numel() for p in grp)
        meter.add()
    torch.testing.assert_close(meter.total.double(), expect, rtol=1e-6, atol=0)
