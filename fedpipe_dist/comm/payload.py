"""Packing updates into one flat tensor per message, with layouts both ends derive from the plan.

Because every rank knows every plan, a receiver can allocate the exact buffer and unpack it without
any header: the bytes on the wire are the tensors' bytes and nothing else.

Factors travel in the wire format `aggregation.wire` names (WIRE_DTYPES): fp32 (exact), or bf16 (half the
bytes; every value rounded to nearest even). `to_wire` gives a sender's own factors exactly as a receiver
gets them back, so an update that does not travel (a server hosted on rank 0) is rounded alike.
"""

from __future__ import annotations

import torch

from ..adapters.sites import Site

# A layout is a list of (site key, shape of B, shape of A) in a fixed order.
Layout = list[tuple[str, tuple[int, int], tuple[int, int]]]

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # aggregation.wire -> the factors' dtype on the wire


def to_wire(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors as a receiver gets them from a `dtype` wire, back in fp32: what
    unpack(pack(factors, layout, dtype=dtype).float(), layout) holds. fp32: the factors themselves (no copy)."""
    if dtype == torch.float32:
        return factors
    return {k: (b.to(dtype).float(), a.to(dtype).float()) for k, (b, a) in factors.items()}


def factor_layout(sites: list[Site], ranks: dict[str, int]) -> Layout:
    """Layout of one client's factors: for each site with rank r > 0, B [out, r] then A [r, in]."""
    return [(s.key, (s.out_features, ranks[s.key]), (ranks[s.key], s.in_features))
            for s in sites if ranks.get(s.key, 0) > 0]


def stacked_layout(sites: list[Site], rank_list: list[dict[str, int]]) -> Layout:
    """Layout of the stacked merged update: per site, the ranks of all contributing clients add up."""
    out = []
    for s in sites:
        r = sum(rk.get(s.key, 0) for rk in rank_list)
        if r > 0:
            out.append((s.key, (s.out_features, r), (r, s.in_features)))
    return out


def downlink_is_dense(stacked: Layout) -> bool:
    """Whether the merged update is smaller sent dense than as stacked factors.

    The stack carries rank sum_i r_i per weight, so it beats dense [out, in] only while
    sum_i r_i < out * in / (out + in); past that (many clients, small layers) dense is smaller. Both are
    exact, and every rank decides the same way from the plans alone.
    """
    return sum(b[0] * a[1] for _, b, a in stacked) < layout_numel(stacked)


def layout_numel(layout: Layout) -> int:
    return sum(b[0] * b[1] + a[0] * a[1] for _, b, a in layout)


def pack(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: Layout, *, device=None,
         dtype=torch.float32) -> torch.Tensor:
    parts = []
    for key, bshape, ashape in layout:
        b, a = factors[key]
        if tuple(b.shape) != bshape or tuple(a.shape) != ashape:
            raise ValueError(f"factor {key}: shapes {tuple(b.shape)}, {tuple(a.shape)} do not match the plan's "
                             f"{bshape}, {ashape}")
        parts += [b.reshape(-1), a.reshape(-1)]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat.to(device=device or flat.device, dtype=dtype)


def unpack(flat: torch.Tensor, layout: Layout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if flat.numel() != layout_numel(layout):
        raise ValueError(f"payload has {flat.numel()} values; the plan's layout needs {layout_numel(layout)}")
    out, pos = {}, 0
    for key, bshape, ashape in layout:
        nb, na = bshape[0] * bshape[1], ashape[0] * ashape[1]
        out[key] = (flat[pos:pos + nb].view(bshape), flat[pos + nb:pos + nb + na].view(ashape))
        pos += nb + na
    return out


def dense_layout(sites: list[Site], keys: set[str]) -> list[tuple[str, tuple[int, int]]]:
    return [(s.key, (s.out_features, s.in_features)) for s in sites if s.key in keys]


def pack_dense(dense: dict[str, torch.Tensor], layout, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Dense updates into one flat buffer; a key absent from `dense` (no local client adapted it) is zeros."""
    total = sum(o * i for _, (o, i) in layout)
    flat = torch.zeros(total, dtype=dtype, device=device)
    pos = 0
    for key, (o, i) in layout:
        if key in dense:
            flat[pos:pos + o * i] = dense[key].reshape(-1).to(flat)
        pos += o * i
    return flat


def unpack_dense(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for key, (o, i) in layout:
        out[key] = flat[pos:pos + o * i].view(o, i)
        pos += o * i
    return out
