"""Layer: the two baselines that are not LoRA: full fine-tuning FedAvg (`ft`) and FedAdapter (`fedadapter`,
Houlsby adapters with a progressive configuration). Adapter math on small tensors, then short in-process
runs of the engine (seconds each); the 4-rank runs are in test_dist.py. Issue 5.

Run: .venv/bin/python -m pytest tests/test_baselines.py -q
"""

import numpy as np
import pytest
import torch

from fedpipe_dist.adapters.houlsby import (
    HoulsbyAdapters,
    adapter_state_params,
    find_adapter_points,
    init_state,
    load_adapter_state,
)
from fedpipe_dist.algorithm.aggregation import ClientUpdate, get_aggregator
from fedpipe_dist.algorithm.aggregation.fedadapter import AdapterConfig, pick_config, trial_configs, trial_groups
from fedpipe_dist.algorithm.cost import houlsby_flops_per_sample, houlsby_params
from fedpipe_dist.config import ConfigError
from fedpipe_dist.data import (
    format_example,
    load_eval_pairs,
    load_train_pairs,
    partition,
    partition_key,
    tokenize_pairs,
)
from fedpipe_dist.data.tokenize import collate
from fedpipe_dist.job import load_job
from fedpipe_dist.metrics.perplexity import evaluate, lm_loss
from fedpipe_dist.models import load_model, load_tokenizer
from fedpipe_dist.runtime.client import batch_indices, client_seed

from ._util import run_small as _run

# ---- ft ---------------------------------------------------------------------------------------------------


def test_ft_aggregate_is_the_weighted_mean_of_the_changes():
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    ups = [ClientUpdate(c, n, 4, d) for c, (n, d) in enumerate(zip([10, 30, 60], deltas))]
    agg = get_aggregator("ft")
    w = agg.weights(ups)
    assert w == pytest.approx([0.1, 0.3, 0.6])
    out = agg.aggregate(ups, w).merge
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], sum(wi * d[k] for wi, d in zip(w, deltas)))
    one = agg.aggregate(ups[:1], agg.weights(ups[:1])).merge
    assert all(torch.equal(one[k], deltas[0][k]) for k in one)  # one client: its own change, unchanged


def test_ft_with_one_client_equals_plain_local_training(tmp_path):
    """Acceptance 1 (ft): one server, one round of FedAvg == a plain AdamW loop over every parameter on the
    same batches. (One round: later rounds start from W + (W_1 - W), an ulp off W_1, and AdamW turns
    rounding noise on zero-gradient entries, such as GPT-2's key bias, into steps of size lr.)"""
    from transformers import AutoModelForCausalLM

    cfg, r = _run(tmp_path, "ft", "method=ft", "clients.n=1", "rounds=1", "clients.memory_gb=24",
                    "clients.precision=auto")
    tok = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, dtype="float32", tokenizer=tok)
    model.requires_grad_(True)
    pairs = load_train_pairs(cfg.data, cfg.seed)
    shard = partition([partition_key(s) for s, _ in pairs], 1, scheme="iid", alpha=0.5, seed=cfg.seed)[0]
    data = tokenize_pairs(tok, [format_example(*pairs[i]) for i in shard], cfg.model.max_length)
    for t in (1,):
        seed = client_seed(cfg.seed, t, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        batches = batch_indices(len(data), cfg.train.batch_max, np.random.default_rng(seed))
        model.train()
        torch.manual_seed(seed)
        for _ in range(cfg.train.local_steps):
            lm_loss(model, collate(data, next(batches), tok.pad_token_id)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad()
    fed = AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "final")
    plain = dict(model.named_parameters())
    for name, p in fed.named_parameters():
        torch.testing.assert_close(p, plain[name], rtol=0, atol=1e-6, msg=name)  # measured max 2.2e-7
    n_params = sum(p.numel() for p in model.parameters())
    assert (r.clients["trainable_params"][1:, 0] == n_params).all()
    assert (r.clients["bytes_up"][1:, 0] == 4 * n_params).all()
    assert r.last_eval_loss() < r.rounds["eval_loss"][0]


def test_ft_that_does_not_fit_memory_under_trains(tmp_path):
    """The memory model charges ft 16 B per parameter plus activations: a budget below that leaves the
    server out of every round (recorded), and the others carry on."""
    _, r = _run(tmp_path, "ft_mem", "method=ft", "clients.memory_gb=[24,24,24,0.001]")
    assert (r.clients["completed"][1:, 3] == 0).all() and (r.clients["selected"][1:, 3] == 1).all()
    assert (r.clients["completed"][1:, :3] == 1).all()
    np.testing.assert_allclose(r.rounds["under_training_rate"][1:], 0.25)
    assert r.last_eval_loss() < r.rounds["eval_loss"][0]


def test_ft_refuses_quantized_bases():
    with pytest.raises(ConfigError, match="clients.precision"):
        load_job("jobs/quickstart.yaml", ["method=ft", "clients.precision=nf4"])
    with pytest.raises(ConfigError, match="model.dtype"):
        load_job("jobs/quickstart.yaml", ["method=ft", "model.dtype=bfloat16", "clients.precision=auto"])


# ---- Houlsby adapters and FedAdapter's configuration --------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_houlsby_adapters_start_as_identity_and_growing_keeps_the_function(name):
    tok = load_tokenizer(name)
    model = load_model(name, seed=0, dtype="float32", tokenizer=tok)
    points = find_adapter_points(model)
    L = 1 + max(p.layer for p in points)
    assert {p.where for p in points} == {"attn", "mlp"} and len(points) == 2 * L
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    g = torch.Generator().manual_seed(1)
    state = init_state(points, L, 1, 4, g)
    assert set(state) == {f"{L - 1}.attn", f"{L - 1}.mlp"}  # depth 1: the top layer only
    with HoulsbyAdapters(points, state).attach(model), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)  # up-projection 0: identity
    for parts in state.values():  # now a non-trivial adapter
        parts["up"].normal_(generator=g)
        parts["up_b"].normal_(generator=g)
    with HoulsbyAdapters(points, state).attach(model), torch.no_grad():
        before = model(input_ids=ids).logits
    assert not torch.allclose(before, ref)
    grown = init_state(points, L, 2, 8, g, base=state)  # deeper and wider
    assert adapter_state_params(grown) == houlsby_params_of(model, 2, 8)
    with HoulsbyAdapters(points, grown).attach(model), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def houlsby_params_of(model, depth, width):
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import model_shape

    return houlsby_params(model_shape(model, find_sites(model)), depth, width)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the top layer's inputs need no grad
def test_houlsby_backward_stops_below_the_adapted_layers():
    """Depth d: only the top d layers need gradients, so no gradient reaches the layers below."""
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", seed=0, dtype="float32", tokenizer=tok)
    points = find_adapter_points(model)
    L = 1 + max(p.layer for p in points)
    seen = []
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: seen.append(i))
    adapters = HoulsbyAdapters(points, init_state(points, L, 1, 4, torch.Generator().manual_seed(0)))
    with adapters.attach(model):
        model(input_ids=torch.randint(0, tok.vocab_size, (1, 8))).logits.sum().backward()
    assert set(seen) == {L - 1}
    assert all(p.grad is not None for p in adapters.parameters())


def test_fedadapter_trial_configurations_groups_and_choice():
    c = AdapterConfig(2, 8)
    assert trial_configs(c, 4, 2, 2, 64) == [c, AdapterConfig(4, 8), AdapterConfig(2, 16)]
    assert trial_configs(AdapterConfig(4, 64), 4, 2, 2, 64) == [AdapterConfig(4, 64)]  # nothing to grow into
    assert trial_groups([0, 1, 2, 3, 5], 3) == [[0, 3], [1, 5], [2]]
    # loss reduction per cost: (3.0 - 2.9) / 1 = 0.1 < (3.0 - 2.7) / 2 = 0.15 > (3.0 - 2.8) / 4 = 0.05
    assert pick_config(3.0, [2.9, 2.7, 2.8], [1.0, 2.0, 4.0]) == 1
    assert pick_config(3.0, [2.9, float("nan"), 2.8], [1.0, 2.0, 4.0]) == 0
    assert pick_config(3.0, [float("nan")] * 3, [1.0, 2.0, 4.0]) == 0


def test_fedadapter_average_needs_one_configuration():
    g = torch.Generator().manual_seed(0)
    pts = find_adapter_points(load_model("tiny-gpt2", seed=0, dtype="float32", tokenizer=load_tokenizer("tiny-gpt2")))
    a, b = init_state(pts, 2, 2, 4, g), init_state(pts, 2, 2, 4, g)
    agg = get_aggregator("fedadapter")
    out = agg.aggregate([ClientUpdate(0, 1, 1, a), ClientUpdate(1, 3, 1, b)], [0.25, 0.75]).state
    torch.testing.assert_close(out["1.mlp"]["down"], 0.25 * a["1.mlp"]["down"] + 0.75 * b["1.mlp"]["down"])
    with pytest.raises(ValueError, match="another adapter configuration"):
        agg.aggregate([ClientUpdate(0, 1, 1, a), ClientUpdate(1, 1, 1, init_state(pts, 2, 2, 8, g))], [0.5, 0.5])


def test_fedadapter_grows_by_trials_and_exports_its_adapters(tmp_path):
    """tiny-llama has 2 layers: start at depth 1 width 4; trial rounds 2 and 4 split the 4 servers into
    current / deeper / wider groups. The HDF5 records each server's configuration; the adapters in final/
    reproduce the last eval loss."""
    cfg, r = _run(tmp_path, "fa", "method=fedadapter", "model.name_or_path=tiny-llama", "rounds=4",
                  "fedadapter.depth=1", "fedadapter.width=4", "fedadapter.period=2", "train.lr=5e-3")
    depth, width = r.clients["adapter_depth"][1:], r.clients["adapter_width"][1:]
    assert (depth[0] == 1).all() and (width[0] == 4).all()  # round 1: everyone on the start configuration
    # round 2 (trial): servers 0 and 3 current, 1 deeper, 2 wider
    assert depth[1].tolist() == [1, 2, 1, 1] and width[1].tolist() == [4, 4, 8, 4]
    assert len({(d, w) for d, w in zip(depth[2], width[2])}) == 1  # round 3: one configuration again
    assert (r.clients["trainable_params"][1:] > 0).all()
    tp = r.clients["trainable_params"][2]
    assert tp[1] == 2 * tp[0] and tp[2] > tp[0]  # deeper: twice the adapters; wider: bigger ones
    assert r.last_eval_loss() < r.rounds["eval_loss"][0]
    assert (r.clients["ranks"][1:] == 0).all()  # no LoRA anywhere
    state, d, w = load_adapter_state(tmp_path / "fa" / "final")
    assert (d, w) in {(int(a), int(b)) for a, b in zip(depth[3], width[3])}  # one of round 4's trial configs
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "fa" / "final")
    assert adapter_state_params(state) == houlsby_params_of(final, d, w)
    ev = load_eval_pairs(cfg.data, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))[: cfg.eval.max_samples]
    tok = load_tokenizer(str(tmp_path / "fa" / "final"))
    data = tokenize_pairs(tok, [format_example(*ev[i]) for i in order], cfg.model.max_length)
    with HoulsbyAdapters(find_adapter_points(final), state, trainable=False).attach(final):
        loss = evaluate(final, data, batch_size=8, pad_id=tok.pad_token_id)["loss"]
    assert abs(loss - r.last_eval_loss()) < 1e-4
    # the cost model puts the deeper configuration above the current one
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.algorithm.cost import model_shape

    m = load_model("tiny-llama", seed=0, dtype="float32", tokenizer=load_tokenizer("tiny-llama"))
    shape = model_shape(m, find_sites(m))
    assert houlsby_flops_per_sample(shape, 2, 4, 96) > houlsby_flops_per_sample(shape, 1, 4, 96)
