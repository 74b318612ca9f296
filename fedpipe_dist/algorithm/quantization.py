"""NormalFloat-k quantization (QLoRA's NF construction generalized to k = 2..8), blockwise absmax scales.

Codebook (the construction bitsandbytes ships for NF4, `create_normal_map`): 2^(k-1) positive values
Q(p) for p evenly spaced from `offset` down to 0.5, 2^(k-1) - 1 negative ones mirrored the same way, and an
exact 0; normalized to [-1, 1]. The offset puts the outermost quantiles halfway between the last two
(2^k + 1)-quantile points on each side, as QLoRA's 0.9677 does for k = 4. The issue's Eqn 8 form
1/2 (Q(i/(2^k+1)) + Q((i+1)/(2^k+1))) is the symmetric variant without an exact zero; QLoRA's released code
and bitsandbytes use the asymmetric one above, and so do we (our NF4 equals bitsandbytes' table).

Written here rather than taken from bitsandbytes because bitsandbytes has only NF4 (its 8-bit path is
LLM.int8, another scheme) and its codebook builder needs scipy; tests check our NF4 against it.
Codes are packed 2 per byte for k = 4, 4 per byte for k = 2, 1 per byte otherwise (k = 3, 5, 6, 7 keep
one byte per code: simple and exact, at the cost of the unused bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nf_codebook(k: int) -> torch.Tensor:
    """The 2^k NormalFloat values, sorted ascending, with an exact 0 and max 1 (float32)."""
    if not 2 <= k <= 8:
        raise ValueError(f"NF-k needs 2 <= k <= 8 (got {k})")
    n_pos, n_neg = 2 ** (k - 1), 2 ** (k - 1) - 1
    offset = 1 - 0.5 * (1 / (2 * (2 * n_neg + 1)) + 1 / (2 * 2 * n_pos))
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


def _pack(codes: torch.Tensor, k: int) -> torch.Tensor:
    per = {4: 2, 2: 4}.get(k, 1)
    if per == 1:
        return codes.to(torch.uint8)
    pad = (-codes.numel()) % per
    c = torch.cat([codes.flatten(), codes.new_zeros(pad)]).to(torch.uint8).view(-1, per)
    out = torch.zeros(c.shape[0], dtype=torch.uint8, device=codes.device)
    for j in range(per):  # first code in the high bits, as bitsandbytes does for NF4
        out |= c[:, j] << (k * (per - 1 - j))
    return out


def _unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    per = {4: 2, 2: 4}.get(k, 1)
    if per == 1:
        return packed[:n].long()
    mask = (1 << k) - 1
    parts = [(packed >> (k * (per - 1 - j))) & mask for j in range(per)]
    return torch.stack(parts, dim=1).flatten()[:n].long()


@dataclass
class QuantizedTensor:
    """A k-bit NormalFloat tensor: packed codes, one absmax per block (optionally itself quantized)."""

    codes: torch.Tensor  # uint8, packed
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 codes when double-quantized
    shape: tuple
    k: int
    block_size: int
    dq_scale: torch.Tensor | None = None  # double quantization: fp32 scale per 256 absmax values
    dq_offset: float = 0.0

    def nbytes(self) -> int:
        n = self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()
        return n + (self.dq_scale.numel() * 4 + 4 if self.dq_scale is not None else 0)


DQ_BLOCK = 256  # absmax values per second-level block, as bitsandbytes' quantize_4bit(compress_statistics=True)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`, Dettmers 2015), built the same way step by step so that every value is the same float32:
    per exponent i, the midpoints of linspace(0.1, 1) scaled by 10^(i - 6), both signs, then 0 and 1, sorted.
    Written here so that the native backend needs no bitsandbytes; tests check it equals theirs."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_nf(w: torch.Tensor, k: int = 4, block_size: int = 64, double_quant: bool = False) -> QuantizedTensor:
    """Blockwise absmax NF-k quantization of any tensor (flattened in row-major order). `double_quant`: QLoRA's
    second level as bitsandbytes does it: the absmax values less their mean, 8-bit dynamic codes per
    DQ_BLOCK of them (one fp32 scale each)."""
    flat = w.detach().float().flatten()
    n = flat.numel()
    pad = (-n) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    cb = nf_codebook(k).to(flat.device)
    codes = torch.bucketize(scaled, (cb[1:] + cb[:-1]) / 2).flatten()[:n]  # nearest codebook value
    qt = QuantizedTensor(_pack(codes, k), absmax, tuple(w.shape), k, block_size)
    if double_quant:
        offset = absmax.mean()
        qt.absmax, qt.dq_scale = _quantize_dynamic(absmax - offset)
        qt.dq_offset = float(offset)
    return qt


def _quantize_dynamic(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of `a` in the dynamic map and one absmax per DQ_BLOCK values, as bitsandbytes (>= 0.50.1)
    computes them on the device `a` is on: a x (1 / absmax) clamped to [-1, 1], then a code. On CUDA their
    kernel takes the nearest code (csrc/kernels.cu dQuantize, a search ending on the midpoint test), as their
    reference kernel does (backends/default/ops.py); on CPU their compiled kernel rounds the value to a grid of
    65,536 points first and takes that point's nearest code (csrc/cpu_ops.cpp quantize_cpu_impl), which for
    values within ~1.5e-5 of a midpoint is the other code: _grid_code does the same, so that quant.backend
    changes no scale (tests/test_quantization.py; docs/quantization.md)."""
    m = a.numel()
    pad = (-m) % DQ_BLOCK
    blocks = torch.cat([a, a.new_zeros(pad)]).view(-1, DQ_BLOCK)  # zeros change no block's |max|
    scale = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / scale.clamp(min=1e-38)[:, None]), -1, 1).flatten()[:m]
    code = dynamic_map().to(a.device)
    if a.device.type == "cpu":
        return _grid_code(scaled, code), scale
    return nearest_code(scaled, code), scale


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the code nearest to each x (a sorted code; a midpoint goes to the lower one)."""
    return torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)


GRID = 65536  # bitsandbytes' CPU lookup table: [-1, 1] in this many points


def _grid_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' compiled CPU kernel step by step, in float32 as it computes: the table maps grid point i
    (-1 + 2i / 65535) to the first code whose midpoint with the next is not below it (build_quantize_lut), and
    x goes to grid point floor((x + 1) x 0.5 x 65535 + 0.5) (norm_to_lut_index). Written here, not called,
    so that the native backend needs no bitsandbytes."""
    grid = -1.0 + (2.0 * torch.arange(GRID, dtype=torch.float32, device=x.device)) / (GRID - 1)
    table = torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid, side="left")
    point = ((x.clamp(-1, 1) + 1.0) * 0.5 * (GRID - 1) + 0.5).to(torch.int64)
    return table[point].to(torch.uint8)


def dequantize_nf(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = 1
    for s in qt.shape:
        n *= s
    codes = _unpack(qt.codes, qt.k, n)
    absmax = qt.absmax
    if qt.dq_scale is not None:
        m = absmax.numel()
        pad2 = (-m) % DQ_BLOCK
        values = dynamic_map().to(absmax.device)[absmax.long()]
        a = torch.cat([values, values.new_zeros(pad2)]).view(-1, DQ_BLOCK)
        absmax = (a * qt.dq_scale[:, None]).flatten()[:m] + qt.dq_offset
    cb = nf_codebook(qt.k).to(codes.device)
    vals = cb[codes]
    pad = (-n) % qt.block_size
    vals = torch.cat([vals, vals.new_zeros(pad)]).view(-1, qt.block_size) * absmax[:, None]
    return vals.flatten()[:n].view(qt.shape).to(dtype)
