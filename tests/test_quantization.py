"""Layer: algorithm/quantization (NF-k) and the QuantLinear layer, one process, seconds.

Run: .venv/bin/python -m pytest tests/test_quantization.py -q
"""

import pytest
import torch

from fedpipe_dist.adapters.lora import LoRAAdapters, _pkey
from fedpipe_dist.adapters.sites import Site
from fedpipe_dist.algorithm.quantization import dequantize_nf, nf_codebook, quantize_nf
from fedpipe_dist.quantized import QuantLinear, dense_linear


@pytest.mark.parametrize("k", range(2, 9))
def test_codebook_shape(k):
    cb = nf_codebook(k)
    assert cb.numel() == 2**k
    assert (cb.diff() > 0).all()  # sorted, distinct
    assert (cb == 0).sum() == 1 and cb.max() == 1.0 and cb.min() == -1.0
    # symmetric construction: 2^(k-1) positive and 2^(k-1) - 1 negative values
    assert (cb > 0).sum() == 2 ** (k - 1) and (cb < 0).sum() == 2 ** (k - 1) - 1


def test_nf4_codebook_matches_qlora_constants():
    # QLoRA's published NF4 table (bitsandbytes functional.py), to 4 decimals.
    ref = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    torch.testing.assert_close(nf_codebook(4), torch.tensor(ref), atol=1e-4, rtol=0)


# Stated bounds on ||dequant(quant(W)) - W|| / ||W|| for N(0, 1) weights, block 64 (measured: 0.565,
# 0.197, 0.092, 0.049, 0.030, 0.020, 0.014 for k = 2..8).
@pytest.mark.parametrize("k,bound", [(2, 0.60), (3, 0.21), (4, 0.10), (5, 0.055), (6, 0.033), (7, 0.022),
                                     (8, 0.016)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_on_gaussian_weights(k, bound, double_quant):
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    q = quantize_nf(w, k, 64, double_quant)
    rel = float((dequantize_nf(q) - w).norm() / w.norm())
    assert rel < bound, rel
    # storage: k bits per weight packed for k = 2, 4, 8; one byte per code otherwise; plus the scales
    assert q.codes.numel() == w.numel() * {2: 2, 4: 4, 8: 8}.get(k, 8) // 8


def test_nf4_equals_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    torch.testing.assert_close(nf_codebook(4), F.get_4bit_type("nf4", device="cpu"), atol=1e-6, rtol=0)
    w = torch.randn(192, 64, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf(w, 4, 64)
    assert torch.equal(packed.flatten(), ours.codes)  # same codes, same packing
    torch.testing.assert_close(dequantize_nf(ours), F.dequantize_4bit(packed, state), atol=1e-6, rtol=0)


def _stories_shaped_weights():
    """stories260K-hf's 35 block linear weights (real ones when ../shared/data is there, else random ones of the
    same shapes: 5 layers of q, k, v, o [64, 64] and MLP [172, 64], [64, 172], [172, 64])."""
    from tests._util import shared_data

    data = shared_data()
    if data is not None:
        from fedpipe_dist.adapters.sites import is_block_linear
        from fedpipe_dist.models import load_model

        model = load_model(str(data / "models" / "stories260K-hf"), seed=0)
        return [m.weight.detach().float() for n, m in model.named_modules()
                if hasattr(m, "weight") and is_block_linear(n, m)]
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64)] * 4 + [(172, 64), (64, 172), (172, 64)]
    return [torch.randn(*s, generator=g) * 0.1 for _ in range(5) for s in shapes]


def test_double_quant_equals_bitsandbytes():
    """quant.double_quant: the NF4 codes, the scales' 8-bit codes, the second-level scales and the offset equal
    what bitsandbytes' quantize_4bit(compress_statistics=True) gives on this CPU (its compiled kernel, which
    rounds each scale to a 65,536-point grid before coding it), so both backends dequantize within 1e-6. The
    nearest-code rule the native backend uses on CUDA equals bitsandbytes' reference kernel
    (backends/default/ops.py, reached by redispatch), which their CUDA kernel follows; the two rules differ on
    a few scales near a midpoint, and this test shows that it sees them."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    from fedpipe_dist.algorithm.quantization import DQ_BLOCK, dynamic_map, nearest_code

    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    scales = near_differs = 0
    for w in _stories_shaped_weights():
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = quantize_nf(w, 4, 64, double_quant=True)
        assert torch.equal(packed.flatten(), ours.codes)
        assert ours.dq_offset == float(state.offset)
        assert torch.equal(ours.absmax, state.absmax.flatten()) and torch.equal(ours.dq_scale, state.state2.absmax)
        assert ours.nbytes() == packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4
        torch.testing.assert_close(dequantize_nf(ours), F.dequantize_4bit(packed, state), atol=1e-6, rtol=0)
        # the nearest-code rule (CUDA's) against bitsandbytes' reference kernel, on the same scales
        absmax = w.flatten().view(-1, 64).abs().amax(dim=1)
        q_ref, scale_ref = op.redispatch(reference, absmax - state.offset, F.create_dynamic_map(), DQ_BLOCK)
        a = absmax - state.offset
        blocks = torch.cat([a, a.new_zeros((-a.numel()) % DQ_BLOCK)]).view(-1, DQ_BLOCK)
        x = torch.clamp(blocks * (1.0 / blocks.abs().amax(dim=1)[:, None]), -1, 1).flatten()[: a.numel()]
        assert torch.equal(nearest_code(x, dynamic_map()), q_ref) and torch.equal(ours.dq_scale, scale_ref)
        scales, near_differs = scales + a.numel(), near_differs + int((q_ref != ours.absmax).sum())
    assert 0 < near_differs <= 0.01 * scales, (near_differs, scales)  # the two rules do differ, rarely


@pytest.mark.parametrize("double_quant", [False, True])
def test_memory_model_counts_the_scales_as_stored(double_quant):
    from fedpipe_dist.algorithm.cost import nf_scale_bytes

    for w in _stories_shaped_weights()[:7]:
        q = quantize_nf(w, 4, 64, double_quant)
        predicted = w.numel() * (0.5 + nf_scale_bytes(64, double_quant))
        # double quantization also stores one fp32 offset, and the last second-level block's scale is whole
        assert 0 <= q.nbytes() - predicted <= (8 if double_quant else 0), (q.nbytes(), predicted)


def test_quant_linear_backward_equals_dense_linear_with_dequantized_weight():
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(64, 48)
    q = QuantLinear.from_module(base, k=4)
    ref = dense_linear(q.dequantized(), base.bias)
    ref.requires_grad_(False)
    x1 = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    site = Site(0, "q", "", 0, 48, 64, "linear")
    outs = []
    for layer, x in ((q, x1), (ref, x2)):
        ad = LoRAAdapters([site], {site.key: 4}, alpha=8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ad.B[_pkey(site)].normal_(generator=torch.Generator().manual_seed(4))
        h = layer.register_forward_hook(ad._make_hook([site]))
        y = layer(x)
        h.remove()
        (y.square().sum()).backward()
        outs.append((y.detach(), x.grad, ad.A[_pkey(site)].grad, ad.B[_pkey(site)].grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())  # the base is frozen


def test_quant_linear_from_conv1d_keeps_the_layout():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight [64, 48]
    q = QuantLinear.from_module(conv, k=8)
    x = torch.randn(2, 64)
    torch.testing.assert_close(q(x), conv(x), rtol=0.05, atol=0.02)
    assert q.weight_nbytes() < conv.weight.numel() * 4 * 0.3


def _lora_sized_update(w, rank, rel, gen):
    """A rank-r update with ||dW|| = rel * ||W|| (NOTES.md: LoRA updates are about 1.4 % of ||W||)."""
    b, a = torch.randn(w.shape[0], rank, generator=gen), torch.randn(rank, w.shape[1], generator=gen)
    scale = rel * w.norm() / (b @ a).norm()
    return b * scale, a


def test_paper_merge_rule_loses_the_update_on_nf4():
    """The flaw NOTES.md measured: W <- quant(W + dW) on an NF4 base keeps only a few % of dW."""
    from fedpipe_dist.algorithm.merge import absorbed_fraction

    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 256, generator=g) * 0.02
    w0 = dequantize_nf(quantize_nf(w, 4, 64))
    b, a = _lora_sized_update(w, 8, 0.014, g)
    w1 = dequantize_nf(quantize_nf(w0 + b @ a, 4, 64))
    assert absorbed_fraction(w0, w1, b @ a) < 0.2


@pytest.mark.parametrize("rounds", [3, 40])  # 3: stays low-rank; 40: past the break-even, dense bf16
def test_residual_merge_absorbs_every_round(rounds):
    from fedpipe_dist.algorithm.merge import MergedResidual, absorbed_fraction

    g = torch.Generator().manual_seed(6)
    w = torch.randn(128, 96, generator=g) * 0.02
    w0 = dequantize_nf(quantize_nf(w, 4, 64))  # frozen NF4 base
    res = MergedResidual(128, 96)
    total = torch.zeros_like(w)
    fractions = []
    for t in range(rounds):
        b, a = _lora_sized_update(w, 4, 0.014, g)
        before = w0 + res.dense()
        res.add(b, a, rows=None)
        fractions.append(absorbed_fraction(before, w0 + res.dense(), b @ a))
        total += b @ a
    assert min(fractions) > 0.99, min(fractions)
    assert (res.D is not None) == (rounds == 40)
    rel = float((res.dense() - total).norm() / total.norm())
    assert rel < 0.01
    x = torch.randn(5, 96, generator=g)
    torch.testing.assert_close(res.matmul(x), x @ res.dense().t(), rtol=1e-4, atol=1e-6)


def test_residual_slices_only_touch_their_rows():
    from fedpipe_dist.algorithm.merge import MergedResidual

    res = MergedResidual(12, 4)
    res.add(torch.ones(4, 1), torch.ones(1, 4), rows=(4, 8))
    d = res.dense()
    assert (d[4:8] == 1).all() and (d[:4] == 0).all() and (d[8:] == 0).all()
