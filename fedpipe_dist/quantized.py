"""A frozen linear layer stored as NF-k codes: dequantized for each matmul, gradients to the input only.

    layer = QuantLinear.from_module(nn_linear_or_conv1d, k=4, block_size=64)
    y = layer(x)              # x @ dequant(W)^T + b; backward gives dL/dx only (quantization-agnostic)

The dequantized weight is not kept for backward: the autograd function saves the codes and dequantizes
again in backward, so a model of QuantLinears holds only its k-bit weights between forward and backward
(the point of quantizing). LoRA hooks (adapters/lora.py) attach to it like to any linear module.
"""

from __future__ import annotations

import torch
from torch import nn

from .algorithm.quantization import QuantizedTensor, dequantize_nf, quantize_nf


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w = layer.dequantized(x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantized(grad_out.dtype)  # recomputed: nothing of full width was saved
        return grad_out @ w, None


class QuantLinear(nn.Module):
    """y = x W^T + b with W [out, in] held as NF-k codes (frozen)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.q = qweight
        self.out_features, self.in_features = qweight.shape
        # Buffers so that .to(device) moves them; the QuantizedTensor views the same storage.
        self.register_buffer("codes", qweight.codes, persistent=False)
        self.register_buffer("absmax", qweight.absmax, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_module(cls, mod: nn.Module, *, k: int, block_size: int = 64, double_quant: bool = False) -> "QuantLinear":
        """From nn.Linear (weight [out, in]) or GPT-2's Conv1D (weight [in, out])."""
        from transformers.pytorch_utils import Conv1D

        w = mod.weight.detach()
        if isinstance(mod, Conv1D):
            w = w.t()
        elif not isinstance(mod, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear or Conv1D, not {type(mod).__name__}")
        return cls(quantize_nf(w.contiguous(), k, block_size, double_quant), mod.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.q.codes, self.q.absmax = self.codes, self.absmax  # keep the view on moved buffers
        if self.q.dq_scale is not None:
            self.q.dq_scale = fn(self.q.dq_scale)
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf(self.q, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (a fresh tensor; for inspection and export, not training)."""
        return self.dequantized()

    def weight_nbytes(self) -> int:
        return self.q.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf{self.q.k}, block={self.q.block_size}"


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An fp32 nn.Linear holding `w` [out, in] (the reference the quantized layer must match)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


__all__ = ["QuantLinear", "dense_linear"]
