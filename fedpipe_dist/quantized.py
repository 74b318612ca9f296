"""A frozen linear layer whose weight is stored at a base precision (NF-k codes or fp16/bf16), plus the
merged updates it has received.

    layer = QuantLinear.from_module(nn_linear_or_conv1d, k=4, block_size=64)        # NF4
    layer = QuantLinear.from_weight(w_out_in, bias, precision="nf8", residual=res)  # any precision
    y = layer(x)   # x @ (W0 + D)^T + b; backward gives dL/dx only (quantization-agnostic)

W0 is frozen at its precision; D is the sum of the merged federated updates (algorithm/merge.py keeps it
exactly as low-rank fp32 factors, later as a dense 16-bit matrix), so no update is rounded away by the
base's coarse grid. The effective weight is never stored: the autograd function saves nothing of full
width and dequantizes again in backward, so a model of QuantLinears holds only its compact weights
between forward and backward (the point of quantizing). LoRA hooks (adapters/lora.py) attach to it like
to any linear module.

NF4 goes through bitsandbytes (quantize_4bit / dequantize_4bit, CPU and CUDA) when it is installed and
`backend` allows; NF-k for other k, and NF4 without bitsandbytes, use algorithm/quantization.py, whose
NF4 is byte-identical to bitsandbytes' (tests/test_quantization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .algorithm.merge import MergedResidual
from .algorithm.quantization import QuantizedTensor, dequantize_nf, quantize_nf

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
NF_BITS = {"nf2": 2, "nf3": 3, "nf4": 4, "nf5": 5, "nf6": 6, "nf7": 7, "nf8": 8}


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # ImportError, or a broken native library: either way it cannot run here
        return False
    return True


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        y = x @ layer.effective_weight(x.dtype).t()
        for start, end, r in layer.low_rank_residuals():  # never formed densely
            y[..., start:end] += r.matmul(x)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        g = grad_out @ layer.effective_weight(grad_out.dtype)  # recomputed: nothing of full width was saved
        for start, end, r in layer.low_rank_residuals():
            g = g + (grad_out[..., start:end] @ r.U.to(grad_out.dtype)) @ r.V.to(grad_out.dtype)
        return g, None


class QuantLinear(nn.Module):
    """y = x (W0 + D)^T + b with W0 [out, in] frozen at `precision` and D the merged updates.

    D lives in `residuals`: (start, end, MergedResidual) for the output rows of each adapted weight in this
    module (one for a Llama projection; q, k and v of GPT-2's fused c_attn each have their own, so a weight
    that never receives an update costs nothing).
    """

    def __init__(self, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None, *, precision: str,
                 residuals: list[tuple[int, int, MergedResidual]] | None = None, bnb_state=None):
        super().__init__()
        self.precision = precision
        self.residuals = list(residuals or [])
        self.bnb_state = bnb_state  # bitsandbytes' QuantState when NF4 runs through bitsandbytes
        if isinstance(weight, QuantizedTensor):
            self.q = weight
            self.out_features, self.in_features = weight.shape
            # Buffers so that .to(device) moves them; the QuantizedTensor views the same storage.
            self.register_buffer("codes", weight.codes, persistent=False)
            self.register_buffer("absmax", weight.absmax, persistent=False)
        else:
            self.q = None
            self.out_features, self.in_features = weight.shape
            self.register_buffer("w16", weight, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, *, precision: str, block_size: int = 64,
                    double_quant: bool = False, backend: str = "auto",
                    residuals: list[tuple[int, int, MergedResidual]] | None = None) -> "QuantLinear":
        """W0 = w [out, in] stored at `precision` (fp16, bf16 or nf2..nf8)."""
        w = w.detach()
        if precision in HALF:
            return cls(w.to(HALF[precision]).contiguous(), bias, precision=precision, residuals=residuals)
        if precision not in NF_BITS:
            raise ValueError(f"unknown base precision {precision!r}; choose fp16, bf16 or nf2..nf8")
        k = NF_BITS[precision]
        from .config import BNB_BLOCKS

        if k == 4 and (backend == "bitsandbytes"
                       or (backend == "auto" and block_size in BNB_BLOCKS and bitsandbytes_available())):
            import bitsandbytes.functional as F

            packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=block_size, quant_type="nf4",
                                            compress_statistics=double_quant)
            # Same packed bytes as ours; QuantizedTensor carries them, bitsandbytes' state the scales.
            qt = QuantizedTensor(packed.flatten(), state.absmax, tuple(w.shape), 4, block_size)
            return cls(qt, bias, precision=precision, residuals=residuals, bnb_state=state)
        qt = quantize_nf(w.float().contiguous(), k, block_size, double_quant)
        return cls(qt, bias, precision=precision, residuals=residuals)

    @classmethod
    def from_module(cls, mod: nn.Module, *, k: int, block_size: int = 64, double_quant: bool = False,
                    backend: str = "native") -> "QuantLinear":
        """From nn.Linear (weight [out, in]) or GPT-2's Conv1D (weight [in, out]), as NF-k."""
        w, bias = linear_weight(mod)
        return cls.from_weight(w, bias, precision=f"nf{k}", block_size=block_size, double_quant=double_quant,
                               backend=backend)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.q is not None:
            self.q.codes, self.q.absmax = self.codes, self.absmax  # keep the view on moved buffers
            if self.q.dq_scale is not None:
                self.q.dq_scale = fn(self.q.dq_scale)
        if self.bnb_state is not None:
            self.bnb_state.absmax = self.absmax
            self.bnb_state.code = fn(self.bnb_state.code)
            if self.bnb_state.state2 is not None:
                self.bnb_state.offset = fn(self.bnb_state.offset)
                self.bnb_state.state2.absmax = fn(self.bnb_state.state2.absmax)
                self.bnb_state.state2.code = fn(self.bnb_state.state2.code)
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 alone, [out, in]."""
        if self.q is None:
            return self.w16.to(dtype)
        if self.bnb_state is not None:
            import bitsandbytes.functional as F

            return F.dequantize_4bit(self.codes.view(-1, 1), self.bnb_state).to(dtype)
        return dequantize_nf(self.q, dtype)

    def low_rank_residuals(self):
        return [(s, e, r) for s, e, r in self.residuals if r.D is None and r.rank > 0]

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 plus the dense parts of D (folded into the per-matmul dequantization); low-rank parts of D
        are applied as two thin matmuls instead (_DequantMatmul)."""
        dense = [(s, e, r) for s, e, r in self.residuals if r.D is not None]
        w = self.dequantized(dtype)
        if dense:
            w = w.clone() if self.q is None else w  # w16.to(its own dtype) is the stored tensor itself
            for s, e, r in dense:
                w[s:e] += r.D.to(dtype)
        return w

    @property
    def weight(self) -> torch.Tensor:
        """W0 + D as fp32 [out, in] (a fresh tensor; for inspection and export, not training)."""
        w = self.dequantized().clone()
        for s, e, r in self.residuals:
            w[s:e] += r.dense().to(w.device)
        return w

    def weight_nbytes(self) -> int:
        """Bytes of the stored W0 (codes and scales, or the 16-bit matrix); the residual not included."""
        if self.q is None:
            return self.w16.numel() * self.w16.element_size()
        n = self.q.nbytes()
        if self.bnb_state is not None and self.bnb_state.state2 is not None:  # bitsandbytes' nested scales
            n += self.bnb_state.state2.absmax.numel() * 4 + 4
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        block = f", block={self.q.block_size}" if self.q is not None else ""
        via = ", bitsandbytes" if self.bnb_state is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {self.precision}{block}{via}"


def linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of nn.Linear or GPT-2's Conv1D (which stores [in, out])."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, Conv1D):
        return mod.weight.detach().t(), mod.bias
    if isinstance(mod, nn.Linear):
        return mod.weight.detach(), mod.bias
    if isinstance(mod, QuantLinear):
        return mod.weight, mod.bias
    raise TypeError(f"expected nn.Linear, Conv1D or QuantLinear, not {type(mod).__name__}")


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An fp32 nn.Linear holding `w` [out, in] (the reference the quantized layer must match)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


__all__ = ["QuantLinear", "dense_linear", "linear_weight", "bitsandbytes_available"]
