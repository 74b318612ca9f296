"""Keeping merged updates beside a base that cannot hold them (NF-k, FP16, BF16 bases).

The paper's rule W <- W + quant(dW) loses most of a LoRA-sized update on an NF4 base (NOTES.md: about
1.5 % of its energy survives), and a bf16 base drops updates below about 0.4 % of an entry. Here the
quantized (or half-precision) W0 stays frozen and the sum of merged updates D = sum_t dW_t is kept in a
residual, so the effective weight is W0 + D:

- while it is smaller, D is kept exactly as fp32 low-rank factors U [out, R] @ V [R, in] (each round's
  update arrives factored with rank sum_i r_i, so R grows by that much per round);
- once R (out + in) * 4 bytes would exceed a dense 16-bit copy (out * in * 2 bytes), D becomes a dense
  fp16 matrix (2 bytes per adapted parameter). D, not W0 + D, is what is rounded, and fp16 rather than
  bf16 because D's entries span a narrow range that fp16's 11-bit mantissa covers 8x more finely: over
  300 rank-8 rounds of 1.4 % of ||W|| each (256 x 256), the accumulated D was off by 0.25 % with fp16 and
  2.0 % with bf16 (per-round absorbed fraction >= 0.99999 vs 0.9992). An entry beyond fp16's range
  (|x| > 6e4, far outside any weight update) would turn that residual into fp32 rather than overflow.
Only adapted weights (the attention projections) carry a residual; the MLP and embeddings never change.
`absorbed_fraction` measures, per round, how much of ||dW||^2 the effective weight really took up.
"""

from __future__ import annotations

import torch

FP16_SAFE = 6.0e4  # beyond this a dense residual is kept in fp32 instead of overflowing fp16


class MergedResidual:
    def __init__(self, out_features: int, in_features: int, device: torch.device | str = "cpu"):
        self.out_features, self.in_features = out_features, in_features
        self.U = torch.zeros(out_features, 0, device=device)
        self.V = torch.zeros(0, in_features, device=device)
        self.D: torch.Tensor | None = None  # dense fp16 once low-rank stops being compact

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def nbytes(self) -> int:
        if self.D is not None:
            return self.D.numel() * self.D.element_size()
        return (self.U.numel() + self.V.numel()) * 4

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """D as fp32 [out, in], or only the rows given (an index tensor)."""
        if rows is not None:
            rows = rows.to(self.U.device)
            return self.D[rows].float() if self.D is not None else self.U[rows] @ self.V
        if self.D is not None:
            return self.D.float()
        return self.U @ self.V

    def add(self, b: torch.Tensor | None = None, a: torch.Tensor | None = None, *, delta: torch.Tensor | None = None,
            rows: tuple[int, int] | None = None) -> None:
        """Add dW = b @ a (factored) or `delta` (dense), optionally into a row slice [start, end) of the weight
        (GPT-2's q, k, v slices of c_attn)."""
        start, end = rows if rows is not None else (0, self.out_features)
        if delta is None and (b is None or a is None):
            raise ValueError("give either b and a, or delta")
        if self.D is None and delta is None:
            new_rank = self.rank + b.shape[1]
            if new_rank * (self.out_features + self.in_features) * 4 < self.out_features * self.in_features * 2:
                pad = torch.zeros(self.out_features, b.shape[1], device=self.U.device)
                pad[start:end] = b.float()
                self.U = torch.cat([self.U, pad], dim=1)
                self.V = torch.cat([self.V, a.float().to(self.V.device)], dim=0)
                return
        if self.D is None:  # switch to dense fp16: fold the exact low-rank part in once
            self.D = self._fit(self.U @ self.V)
            self.U, self.V = self.U.new_zeros(self.out_features, 0), self.V.new_zeros(0, self.in_features)
        d = delta.float() if delta is not None else b.float() @ a.float()
        block = self.D[start:end].float() + d.to(self.D.device)
        if self.D.dtype == torch.float16 and float(block.abs().max()) > FP16_SAFE:
            self.D = self.D.float()
        self.D[start:end] = block.to(self.D.dtype)

    @staticmethod
    def _fit(d: torch.Tensor) -> torch.Tensor:
        return d.half() if float(d.abs().max()) <= FP16_SAFE else d.float()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ D^T without forming D when it is low-rank."""
        if self.D is not None:
            return x @ self.D.to(x.dtype).t()
        if self.rank == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return (x @ self.V.to(x.dtype).t()) @ self.U.to(x.dtype).t()


def absorbed_fraction(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> float:
    """1 - ||(after - before) - dW||^2 / ||dW||^2: the share of the update's energy the weight took up."""
    d = delta.double()
    denom = float(d.square().sum())
    if denom == 0:
        return 1.0
    return 1.0 - float(((after.double() - before.double()) - d).square().sum()) / denom
