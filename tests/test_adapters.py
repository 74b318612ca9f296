"""Layer: adapters/ (sites, LoRA hooks, merging into the base) on built-in tiny models, one process.

Run: .venv/bin/python -m pytest tests/test_adapters.py -q
"""

import copy

import pytest
import torch

from fedpipe_dist.adapters.lora import LoRAAdapters, _pkey
from fedpipe_dist.adapters.sites import add_to_base, base_weight_slice, find_sites
from fedpipe_dist.models import load_model


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2", seed=0)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama", seed=0)


def test_sites_cover_both_families(gpt2, llama):
    g = find_sites(gpt2)
    assert [(s.layer, s.kind) for s in g[:4]] == [(0, "q"), (0, "k"), (0, "v"), (0, "o")]
    q, k, v = g[0], g[1], g[2]
    assert q.module_name == k.module_name == v.module_name == "transformer.h.0.attn.c_attn"
    assert (q.out_start, k.out_start, v.out_start, v.out_end) == (0, 64, 128, 192)
    lsites = find_sites(llama)
    assert len(lsites) == 2 * 4
    kproj = [s for s in lsites if s.kind == "k"][0]
    assert kproj.out_features == 32 and kproj.in_features == 64  # 2 kv heads x head_dim 16


def _set_b(ad, site, gen):
    with torch.no_grad():
        ad.B[_pkey(site)].copy_(torch.randn(ad.B[_pkey(site)].shape, generator=gen))


def test_gpt2_slice_adapter_changes_only_its_slice(gpt2):
    sites = find_sites(gpt2)
    q, k, v = sites[0], sites[1], sites[2]
    attn = gpt2.get_submodule(q.module_name)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    base_out = attn(x)
    for target in (q, k, v):
        gen = torch.Generator().manual_seed(1)
        ad = LoRAAdapters(sites, {target.key: 4}, alpha=8, generator=gen)
        _set_b(ad, target, gen)
        with ad.attach(gpt2):
            out = attn(x)
        diff = (out - base_out).abs().amax(dim=(0, 1))  # per output feature
        inside = diff[target.out_start:target.out_end]
        outside = torch.cat([diff[: target.out_start], diff[target.out_end:]])
        assert inside.min() > 0, f"{target.kind}: adapter had no effect on its own slice"
        assert outside.max() == 0, f"{target.kind}: adapter leaked into other slices"
        # The hook is gone after detach.
        assert torch.equal(attn(x), base_out)


def test_gpt2_merge_changes_only_its_slice():
    model = load_model("tiny-gpt2", seed=0)
    sites = find_sites(model)
    k = sites[1]
    before = model.get_submodule(k.module_name).weight.detach().clone()
    delta = torch.randn(k.out_features, k.in_features)
    add_to_base(model, k, delta)
    after = model.get_submodule(k.module_name).weight.detach()
    changed = (after - before).abs().sum(dim=0) > 0  # Conv1D weight is [in, out]: columns are outputs
    assert changed[k.out_start:k.out_end].all() and not changed[: k.out_start].any() and not changed[k.out_end:].any()
    torch.testing.assert_close(base_weight_slice(model, k) - before[:, k.out_start:k.out_end].t(), delta)


def test_merged_adapter_equals_live_adapter(gpt2):
    """Folding (alpha/r) B A into the base gives the same outputs as running the adapter."""
    model = copy.deepcopy(gpt2)
    sites = find_sites(model)
    gen = torch.Generator().manual_seed(3)
    ranks = {s.key: r for s, r in zip(sites, [2, 4, 8, 1, 3, 5, 6, 7])}
    ad = LoRAAdapters(sites, ranks, alpha=16, generator=gen)
    for s in sites:
        _set_b(ad, s, gen)
    ids = torch.randint(0, 259, (2, 12), generator=gen)
    with ad.attach(model):
        live = model(input_ids=ids).logits
    by_key = {s.key: s for s in sites}
    for key, (b, a) in ad.factors().items():
        add_to_base(model, by_key[key], b @ a)
    torch.testing.assert_close(model(input_ids=ids).logits, live, rtol=1e-4, atol=1e-4)


def test_llama_lora_matches_peft(llama):
    """Our hook-based LoRA equals peft's LoRA on Llama's q/v projections with the same A, B, alpha, r."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    sites = [s for s in find_sites(llama) if s.kind in ("q", "v")]
    r, alpha = 4, 8
    gen = torch.Generator().manual_seed(4)
    ours = LoRAAdapters(sites, {s.key: r for s in sites}, alpha=alpha, generator=gen)
    for s in sites:
        _set_b(ours, s, gen)
    ids = torch.randint(0, 259, (2, 10), generator=gen)
    with ours.attach(llama):
        out_ours = llama(input_ids=ids).logits

    ref_model = copy.deepcopy(llama)
    pm = peft.get_peft_model(ref_model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    with torch.no_grad():
        for s in sites:
            mod = pm.base_model.model.get_submodule(s.module_name)
            mod.lora_A["default"].weight.copy_(ours.A[_pkey(s)])
            mod.lora_B["default"].weight.copy_(ours.B[_pkey(s)])
    out_peft = pm(input_ids=ids).logits
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out_ours, llama(input_ids=ids).logits)  # the adapters did something


def test_fresh_adapters_start_at_zero_update(gpt2):
    sites = find_sites(gpt2)
    ad = LoRAAdapters(sites, {s.key: 4 for s in sites}, alpha=16, generator=torch.Generator().manual_seed(0))
    for b, a in ad.factors().values():
        assert torch.count_nonzero(b @ a) == 0 and torch.count_nonzero(a) > 0
    assert ad.trainable_parameters() == sum(4 * (s.in_features + s.out_features) for s in sites)
