"""The merge's fidelity check (RankBases.merge(measure=True)) on weights too large to check on every entry:
its row-sampled estimate of the lost share of the update against the exact check on the same merges."""

import pytest
import torch

from fedpipe_dist.adapters.sites import find_sites
from fedpipe_dist.runtime import bases as bases_mod
from fedpipe_dist.runtime.bases import RankBases


def _bases(precisions):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
                      intermediate_size=64, vocab_size=64)
    model = LlamaForCausalLM(cfg).eval()
    sites = find_sites(model)
    return RankBases(model, sites, precisions, device=torch.device("cpu"), backend="native"), sites


def _rounds(sites):
    """Two factored rank-64 updates (about 1% of ||W|| each), then a dense one."""
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        yield {s.key: (torch.randn(s.out_features, 64, generator=g) * 3e-3,
                       torch.randn(64, s.in_features, generator=g) * 3e-3) for s in sites}
    yield {s.key: torch.randn(s.out_features, s.in_features, generator=g) * 2e-4 for s in sites}


def test_sampled_check_estimates_the_exact_one(monkeypatch):
    precisions = {"fp32", "fp16"}
    sampled, sites = _bases(precisions)
    exact, _ = _bases(precisions)
    by_key = {s.key: s for s in sites}
    assert bases_mod._check_rows(2048, 2048) is not None  # 2048 x 2048 is past EXACT_CHECK: sampled
    losses = []
    for deltas in _rounds(sites):
        est = sampled.merge(deltas, by_key)
        with monkeypatch.context() as m:
            m.setattr(bases_mod, "_check_rows", lambda out, inp: None)
            ref = exact.merge(deltas, by_key)
        for p in precisions:
            lost, lost_ref = 1 - est[p], 1 - ref[p]
            # exact concatenation of factors loses nothing (0 both ways); rounding on a grid loses a little
            assert lost == pytest.approx(lost_ref, rel=0.1, abs=0), (p, lost, lost_ref)
            losses.append(lost_ref)
    assert min(losses) == 0 and sum(x > 0 for x in losses) >= 4, losses  # both kinds were checked
    # both merged the same: the sampled check only looked, it changed nothing
    for s in sites:
        w1 = sampled.views["fp32"][s.module_name].weight
        w2 = exact.views["fp32"][s.module_name].weight
        assert torch.equal(w1, w2)
        assert torch.equal(sampled.residuals[s.key].dense(), exact.residuals[s.key].dense())
