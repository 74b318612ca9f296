"""Where adapters attach: one Site per (layer, attention weight type q/k/v/o).

A Site names the module holding the weight and, for GPT-2's fused c_attn, the slice of its output
features that is W_q, W_k or W_v. All update math uses the nn.Linear layout dW[out, in]; `layout`
says how the module stores its weight (GPT-2's Conv1D keeps the transpose, [in, out]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("q", "k", "v", "o")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Site:
    layer: int
    kind: str  # q | k | v | o
    module_name: str  # dotted path inside the model
    out_start: int  # slice of the module's output features that this weight owns
    out_end: int
    in_features: int
    layout: str  # "linear": weight [out, in]; "conv1d": weight [in, out] (GPT-2)

    @property
    def out_features(self) -> int:
        return self.out_end - self.out_start

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


_LLAMA = re.compile(r"^(?P<prefix>.*\.)?(?P<layer>\d+)\.(?:self_attn|attention|attn)\.(?P<proj>[qkvo])_proj$")
_GPT2 = re.compile(r"^(?P<prefix>.*\.)?h\.(?P<layer>\d+)\.attn\.(?P<proj>c_attn|c_proj)$")


def find_sites(model: nn.Module) -> list[Site]:
    """All attention weight sites of a GPT-2- or Llama-style model, sorted by (layer, q/k/v/o)."""
    from transformers.pytorch_utils import Conv1D

    sites: list[Site] = []
    for name, mod in model.named_modules():
        m = _LLAMA.match(name)
        if m and isinstance(mod, nn.Linear):
            sites.append(Site(int(m["layer"]), m["proj"], name, 0, mod.out_features, mod.in_features, "linear"))
            continue
        m = _GPT2.match(name)
        if m and isinstance(mod, Conv1D):
            layer = int(m["layer"])
            n_in, n_out = mod.weight.shape  # Conv1D stores [in, out]
            if m["proj"] == "c_proj":
                sites.append(Site(layer, "o", name, 0, n_out, n_in, "conv1d"))
            else:
                if n_out % 3:
                    raise ValueError(f"{name}: fused c_attn width {n_out} is not 3 x hidden")
                d = n_out // 3  # GPT-2 fuses [q | k | v] along the output features
                for j, kind in enumerate("qkv"):
                    sites.append(Site(layer, kind, name, j * d, (j + 1) * d, n_in, "conv1d"))
    if not sites:
        raise ValueError(
            f"{model.__class__.__name__}: found no attention projections. Supported layouts: GPT-2 "
            "(h.N.attn.c_attn / c_proj) and Llama-style (layers.N.self_attn.q_proj/k_proj/v_proj/o_proj)")
    sites.sort(key=lambda s: (s.layer, KIND_INDEX[s.kind]))
    return sites


_BLOCK = re.compile(r"(^|\.)(h|layers|layer|blocks)\.\d+\.")


def is_block_linear(name: str, module: nn.Module) -> bool:
    """A matmul weight inside a transformer block (attention or MLP): what a quantized base quantizes.
    Embeddings, norms and the LM head are outside the blocks and stay as loaded."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) and _BLOCK.search(name) is not None


def n_layers(sites: list[Site]) -> int:
    return 1 + max(s.layer for s in sites)


def weight_slice(module: nn.Module, site: Site) -> torch.Tensor:
    """The site's weight in `module` (nn.Linear or Conv1D) as an [out, in] view: writes reach the module's
    storage (for Conv1D, whose storage is [in, out], it is a transposed view)."""
    w = module.weight
    if site.layout == "linear":
        return w[site.out_start:site.out_end, :]
    return w[:, site.out_start:site.out_end].t()


def base_weight_slice(model: nn.Module, site: Site) -> torch.Tensor:
    """The site's weight in the model as installed, [out, in] (a view, see weight_slice)."""
    return weight_slice(model.get_submodule(site.module_name), site)


@torch.no_grad()
def add_to_base(model: nn.Module, site: Site, delta: torch.Tensor) -> None:
    """W_site += delta (delta is [out, in]), in the base's own storage layout and dtype."""
    w = model.get_submodule(site.module_name).weight
    delta = delta.to(device=w.device, dtype=w.dtype)
    if site.layout == "linear":
        w[site.out_start:site.out_end, :] += delta
    else:
        w[:, site.out_start:site.out_end] += delta.t()
