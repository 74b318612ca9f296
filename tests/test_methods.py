"""Layer: the round engine running the LoRA-family baselines (method = lora, flora, flexlora, hetlora) with
the in-process communicator; the 4-rank check is in test_dist.py. Seconds each.

Run: .venv/bin/python -m pytest tests/test_methods.py -q
"""

import numpy as np
import pytest

from fedpipe_dist.data import format_example, load_eval_pairs, tokenize_pairs
from fedpipe_dist.job import load_job
from fedpipe_dist.methods import make_method
from fedpipe_dist.metrics.perplexity import evaluate

from ._util import run_small as _run


def test_flora_with_equal_ranks_is_fedpipe_with_a_uniform_plan(tmp_path):
    """Equal ranks and equal batches: FedPipe's |D_i|/b_i weights are FLoRA's |D_i| ones; same stacking."""
    _, fp = _run(tmp_path, "fedpipe", "plan.mode=uniform", "lora.rank=4", "lora.carry=none")  # fresh adapters
    _, fl = _run(tmp_path, "flora", "method=flora", "lora.client_ranks=[4,4,4,4]")
    np.testing.assert_allclose(fl.rounds["eval_loss"], fp.rounds["eval_loss"], rtol=1e-6)
    assert (fl.clients["ranks"] == fp.clients["ranks"]).all()


@pytest.mark.parametrize("method", ["lora", "flexlora", "hetlora"])
def test_global_adapter_methods_learn_and_export_what_they_evaluated(tmp_path, method):
    """The kept global adapter is evaluated through hooks (W0 + dW_g) and merged into final/ once: the
    exported model's loss equals the last recorded one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, r = _run(tmp_path, method, f"method={method}", "lora.client_ranks=[8,4,4,2]", "lora.rank=4")
    assert r.attrs["method"] == method
    assert r.last_eval_loss() < r.rounds["eval_loss"][0]
    assert np.isnan(r.rounds["absorbed_min"][1:]).all()  # nothing is merged into the base during the run
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / method / "final")
    ev = load_eval_pairs(cfg.data, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))[: cfg.eval.max_samples]
    data = tokenize_pairs(tok, [format_example(*ev[i]) for i in order], cfg.model.max_length)
    assert abs(evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id)["loss"] - r.last_eval_loss()) < 1e-3
    ranks = r.clients["ranks"][1:, :, 0, 0]  # layer 0, W_q
    if method == "lora":
        assert (ranks == 4).all()
    else:
        assert (ranks[0] == [8, 4, 4, 2]).all()


def test_lora_clients_continue_from_the_global_factors(tmp_path):
    """FedAvg of factors: the global adapter is replaced (never merged) every round, so progress adds up
    over rounds only because each round's clients start from the previous average."""
    _, r = _run(tmp_path, "lora", "method=lora", "lora.rank=4", "rounds=3")
    losses = r.rounds["eval_loss"]
    assert losses[1] < losses[0] and losses[3] < losses[1]


def test_hetlora_ranks_only_shrink_and_gamma_one_keeps_them(tmp_path):
    _, r = _run(tmp_path, "het", "method=hetlora", "lora.client_ranks=[16,8,8,4]", "rounds=4",
                "hetlora.gamma=0.5", "hetlora.reg=0.05")
    q = r.clients["ranks"][1:, :, 0, 0]
    assert (np.diff(q, axis=0) <= 0).all() and (q[0] == [16, 8, 8, 4]).all()
    assert set(np.unique(q)) <= {16, 8, 4, 2, 1}  # halvings only
    assert (q[-1] < q[0]).any()  # and some server did prune
    _, r1 = _run(tmp_path, "het1", "method=hetlora", "lora.client_ranks=[16,8,8,4]", "rounds=2", "hetlora.gamma=1")
    assert (r1.clients["ranks"][1:, :, 0, 0] == [16, 8, 8, 4]).all()


def test_heterogeneous_ranks_follow_compute_when_not_given():
    cfg = load_job("jobs/quickstart.yaml", ["method=flora"])  # slowdowns 1, 1.5, 2, 3; ranks 16 .. 2
    assert make_method(cfg).initial_ranks([6.0, 4.0, 3.0, 2.0]) == [16, 8, 8, 4]
    cfg = load_job("jobs/quickstart.yaml", ["method=lora", "lora.rank=4"])
    assert make_method(cfg).initial_ranks([6.0, 4.0, 3.0, 2.0]) == [4, 4, 4, 4]


def test_global_adapter_methods_refuse_the_dense_transport():
    from fedpipe_dist.config import ConfigError

    with pytest.raises(ConfigError, match="aggregation.transport: method hetlora"):
        load_job("jobs/quickstart.yaml", ["method=hetlora", "aggregation.transport=dense"])


def test_adapters_started_from_a_global_adapter_never_write_into_it():
    """Clients of one rank start from the same global factors one after another: training must copy them
    (a shared A once let the first client's steps leak into the next client's start)."""
    import torch

    from fedpipe_dist.adapters.lora import LoRAAdapters, _pkey
    from fedpipe_dist.adapters.sites import Site

    site = Site(0, "q", "", 0, 6, 5, "linear")
    b, a = torch.randn(6, 2), torch.randn(2, 5)
    keep = (b.clone(), a.clone())
    ad = LoRAAdapters([site], {site.key: 2}, alpha=4, init={site.key: (b, a)})
    torch.testing.assert_close(ad.factors()[site.key][0], b)  # B' = B * alpha / r round-trips
    torch.testing.assert_close(ad.factors()[site.key][1], a)
    with torch.no_grad():
        ad.A[_pkey(site)].add_(1.0)
        ad.B[_pkey(site)].add_(1.0)
    assert torch.equal(b, keep[0]) and torch.equal(a, keep[1])
