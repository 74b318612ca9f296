"""LoRA with a rank per attention weight, attached to an unmodified HF model through forward hooks.

Why our own layer and not peft's: FedPipe gives every weight its own rank each round, including the q, k
and v slices inside GPT-2's fused c_attn, where peft can only adapt the whole fused matrix as one weight.
The adapters are created fresh every round, trained, read out as factors and dropped, while the base keeps
absorbing merged updates; hooks keep the model a plain HF model throughout (so `save_pretrained` never
sees adapter weights) and work over any base module whose forward is x @ W^T (+ b): nn.Linear, Conv1D,
or a quantized linear. tests/test_adapters.py checks this layer against peft's LoRA on Llama projections.

Shapes (peft's convention): A [r, in], B [out, r], dW = (alpha / r) * B @ A in the nn.Linear layout [out, in].
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site


def _pkey(site: Site) -> str:
    return f"l{site.layer}_{site.kind}"  # ParameterDict keys may not contain '.'


class LoRAAdapters(nn.Module):
    """Fresh LoRA factors for the sites given a rank > 0 in `ranks` (site.key -> r)."""

    def __init__(self, sites: list[Site], ranks: dict[str, int], *, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 init: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`init`: site.key -> (B', A') to start from instead of (0, kaiming) — a global adapter the method
        keeps (FedAvg of factors, HetLoRA, FlexLoRA); B' carries alpha/r like `factors()` returns it."""
        super().__init__()
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.sites = [s for s in sites if ranks.get(s.key, 0) > 0]
        self.ranks = {s.key: int(ranks[s.key]) for s in self.sites}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for s in self.sites:
            r = self.ranks[s.key]
            a = torch.empty(r, s.in_features, dtype=torch.float32)
            # peft's LoRA init: A ~ kaiming-uniform, B = 0, so dW = 0 at the start of every round.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.zeros(s.out_features, r)
            if init is not None and s.key in init:
                b0, a0 = init[s.key]
                if tuple(b0.shape) != (s.out_features, r) or tuple(a0.shape) != (r, s.in_features):
                    raise ValueError(f"{s.key}: start factors {tuple(b0.shape)}, {tuple(a0.shape)} do not fit rank {r}")
                # copies: training must never write into the global adapter the factors came from
                b, a = b0.detach().float().cpu() / (self.alpha / r), a0.detach().float().cpu().clone()
            self.A[_pkey(s)] = nn.Parameter(a.to(device=device, dtype=dtype))
            self.B[_pkey(s)] = nn.Parameter(b.to(device=device, dtype=dtype))
        self._handles: list = []

    def scale(self, site: Site) -> float:
        return self.alpha / self.ranks[site.key]

    # ---- attaching -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "LoRAAdapters":
        """Register one forward hook per adapted module; `detach()` (or a with-block) removes them."""
        if self._handles:
            raise RuntimeError("adapters are already attached")
        by_module: dict[str, list[Site]] = defaultdict(list)
        for s in self.sites:
            by_module[s.module_name].append(s)
        for name, sites in by_module.items():
            module = model.get_submodule(name)
            hook = self._make_hook(sorted(sites, key=lambda s: s.out_start))
            self._handles.append(module.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LoRAAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, sites: list[Site]):
        def hook(module, args, output):
            x = args[0]
            if self.dropout and self.training:
                x = F.dropout(x, p=self.dropout)
            x = x.to(self.A[_pkey(sites[0])].dtype)
            n_out = output.shape[-1]
            pieces, pos = [], 0
            for s in sites:
                if s.out_start > pos:  # output features with no adapter (e.g. k inside c_attn)
                    pieces.append(output.new_zeros(*output.shape[:-1], s.out_start - pos))
                a, b = self.A[_pkey(s)], self.B[_pkey(s)]
                pieces.append((x @ a.t() @ b.t()) * self.scale(s))  # [..., in] -> [..., r] -> [..., out]
                pos = s.out_end
            if pos < n_out:
                pieces.append(output.new_zeros(*output.shape[:-1], n_out - pos))
            delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            return output + delta.to(output.dtype)

        return hook

    # ---- reading out -----------------------------------------------------------------------------
    def site_params(self) -> list[list[nn.Parameter]]:
        """[A, B] of each adapted site, in `sites` order (Eqn 4's groups: importance.SensitivitySum)."""
        return [[self.A[_pkey(s)], self.B[_pkey(s)]] for s in self.sites]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """site.key -> (B * alpha/r, A), detached fp32: dW = B' @ A exactly (the scaling is folded in)."""
        out = {}
        for s in self.sites:
            b = self.B[_pkey(s)].detach().float() * self.scale(s)
            out[s.key] = (b, self.A[_pkey(s)].detach().float())
        return out

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def shared_initial_adapter(sites: list[Site], rank: int, seed: int, device="cpu"
                           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One initial adapter for every server of a job (FedAvg-LoRA as the field's code runs it: OpenFedLLM's
    main_sft.py copies one peft state dict to every client before round 1): site.key -> (B' = 0 [out, rank],
    A [rank, in]) with A drawn as peft draws it (kaiming-uniform), from the job's seed alone, so every rank
    draws the same adapter without a broadcast. Each site has a generator of its own and the draw fills A row
    by row, so the adapter at rank r is the first r rows of the one at any larger rank: a server of rank r
    takes A[:r], and every method and the centralized limit start from the same A whatever their top rank.
    Drawn on the CPU (the same numbers on any device), returned on `device` (where the run's factors live)."""
    out = {}
    for i, s in enumerate(sites):  # find_sites order: the same on every rank
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0x1A17, i]).generate_state(1)[0]))
        a = torch.empty(rank, s.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out[s.key] = (torch.zeros(s.out_features, rank, device=device), a.to(device))
    return out


class FixedUpdates:
    """Frozen updates added to the outputs of adapted modules: y += x @ dW^T per site, with dW given as
    factors (B, A) or dense [out, in]. Evaluates W0 + dW without touching the base (methods that keep a
    global adapter instead of merging it every round).

        with FixedUpdates(sites, updates).attach(model):
            loss = ...
    """

    def __init__(self, sites: list[Site], updates: dict):
        self.sites = [s for s in sites if s.key in updates]
        self.updates = updates
        self._handles: list = []

    def attach(self, model: nn.Module) -> "FixedUpdates":
        by_module: dict[str, list[Site]] = defaultdict(list)
        for s in self.sites:
            by_module[s.module_name].append(s)
        for name, sites in by_module.items():
            self._handles.append(model.get_submodule(name).register_forward_hook(self._make_hook(sites)))
        return self

    def _make_hook(self, sites: list[Site]):
        def hook(module, args, output):
            x = args[0]
            out = output.clone()
            for s in sites:
                u = self.updates[s.key]
                if torch.is_tensor(u):
                    d = x @ u.to(x.dtype).t()
                else:
                    d = (x @ u[1].to(x.dtype).t()) @ u[0].to(x.dtype).t()
                out[..., s.out_start:s.out_end] += d.to(out.dtype)
            return out

        return hook

    def __enter__(self) -> "FixedUpdates":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
