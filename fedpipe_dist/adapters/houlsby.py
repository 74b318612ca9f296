"""Houlsby bottleneck adapters (Houlsby et al. 2019), the adapter FedAdapter (Cai et al., MobiCom 2023) trains.

Two adapters per adapted layer: one on the attention block's output projection and one on the MLP's output
projection, each h -> h + U relu(D h + b_D) + b_U with D [width, d_model], U [d_model, width], applied before
the residual add (a forward hook on W_o / W_down rewrites the projection's output). U and b_U start at zero,
so a fresh adapter is the identity, and so is any unit added when an adapter grows wider, or a layer added
when the configuration grows deeper (FedAdapter's progressive upgrades keep the model's function).

FedAdapter's depth d puts adapters in the top d layers only: nothing below them needs a gradient, so
backward stops at layer L - d (autograd saves no activations below it), which is where its speed-up comes
from. Width is the bottleneck size.

Why our own module and not a library's: peft has no bottleneck adapters, and the `adapters` package
replaces the model's classes; hooks keep the model a plain HF model, as for LoRA (adapters/lora.py), and
let one base serve every configuration a FedAdapter trial round trains side by side.

State (what is exchanged and averaged): "<layer>.<attn|mlp>" -> {"down": [w, d], "down_b": [w], "up": [d, w],
"up_b": [d]}, fp32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

_POINTS = (
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attention|attn)\.(?:o_proj|c_proj)$"), "attn"),
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.mlp\.(?:down_proj|c_proj)$"), "mlp"),
)
PARTS = ("down", "down_b", "up", "up_b")


@dataclass(frozen=True)
class AdapterPoint:
    layer: int
    where: str  # attn | mlp
    module_name: str
    d_model: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.where}"


def find_adapter_points(model: nn.Module) -> list[AdapterPoint]:
    """The attention-output and MLP-output projections of every layer of a GPT-2- or Llama-style model."""
    d = getattr(model.config, "hidden_size", None) or model.config.n_embd
    points = []
    for name, _ in model.named_modules():
        for pattern, where in _POINTS:
            m = pattern.match(name)
            if m:
                points.append(AdapterPoint(int(m[1]), where, name, d))
    if not points:
        raise ValueError(f"{model.__class__.__name__}: found no attention/MLP output projections for adapters; "
                         "supported: GPT-2 (attn.c_proj, mlp.c_proj) and Llama-style (o_proj, mlp.down_proj)")
    return sorted(points, key=lambda p: (p.layer, p.where))


def adapter_layers(n_layers: int, depth: int) -> range:
    """FedAdapter's depth: the top `depth` layers."""
    return range(max(0, n_layers - depth), n_layers)


def adapter_state_params(state: dict) -> int:
    return sum(t.numel() for parts in state.values() for t in parts.values())


def init_state(points: list[AdapterPoint], n_layers: int, depth: int, width: int, generator: torch.Generator,
               base: dict | None = None) -> dict:
    """Adapters for the top `depth` layers at `width`, grown from `base` (a smaller configuration): what base
    has is kept, new down-projection rows are random (kaiming-uniform, as nn.Linear), new up-projection
    columns and new adapters' up-projections are zero, so the function of `base` is unchanged."""
    base = base or {}
    out = {}
    for p in points:
        if p.layer not in adapter_layers(n_layers, depth):
            continue
        down = torch.empty(width, p.d_model)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(p.d_model)
        down_b = torch.rand(width, generator=generator) * 2 * bound - bound
        up, up_b = torch.zeros(p.d_model, width), torch.zeros(p.d_model)
        old = base.get(p.key)
        if old is not None:
            w0 = old["down"].shape[0]
            if w0 > width:
                raise ValueError(f"{p.key}: adapter width {w0} cannot shrink to {width}")
            down[:w0], down_b[:w0] = old["down"], old["down_b"]
            up[:, :w0], up_b[:] = old["up"], old["up_b"]
        out[p.key] = {"down": down, "down_b": down_b, "up": up, "up_b": up_b}
    return out


class HoulsbyAdapters(nn.Module):
    """Trainable (or fixed, for evaluation) bottleneck adapters from a state, attached through forward hooks."""

    def __init__(self, points: list[AdapterPoint], state: dict, *, device: torch.device | str = "cpu",
                 trainable: bool = True):
        super().__init__()
        self.points = [p for p in points if p.key in state]
        self.params = nn.ParameterDict()
        for p in self.points:
            for part in PARTS:
                t = state[p.key][part].detach().to(device=device, dtype=torch.float32).clone()
                self.params[f"l{p.layer}_{p.where}_{part}"] = nn.Parameter(t, requires_grad=trainable)
        self._handles: list = []

    def _get(self, p: AdapterPoint, part: str) -> torch.Tensor:
        return self.params[f"l{p.layer}_{p.where}_{part}"]

    def attach(self, model: nn.Module) -> "HoulsbyAdapters":
        if self._handles:
            raise RuntimeError("adapters are already attached")
        for p in self.points:
            self._handles.append(model.get_submodule(p.module_name).register_forward_hook(self._hook(p)))
        return self

    def _hook(self, p: AdapterPoint):
        def hook(module, args, output):
            h = output
            z = torch.relu(h.to(torch.float32) @ self._get(p, "down").t() + self._get(p, "down_b"))
            return h + (z @ self._get(p, "up").t() + self._get(p, "up_b")).to(h.dtype)
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "HoulsbyAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def state(self) -> dict:
        """The adapters as plain fp32 CPU tensors, in the exchange layout."""
        return {p.key: {part: self._get(p, part).detach().float().cpu().clone() for part in PARTS}
                for p in self.points}

    def trainable_parameters(self) -> int:
        return sum(t.numel() for t in self.params.values())


ADAPTER_FILE = "houlsby_adapters.safetensors"


def save_adapter_state(folder, state: dict, depth: int, width: int) -> None:
    """FedAdapter's global adapters beside the exported base (final/): they do not merge into weights."""
    from pathlib import Path

    from safetensors.torch import save_file

    flat = {f"{key}.{part}": t.contiguous() for key, parts in state.items() for part, t in parts.items()}
    save_file(flat, str(Path(folder) / ADAPTER_FILE), metadata={"depth": str(depth), "width": str(width)})


def load_adapter_state(folder) -> tuple[dict, int, int]:
    """(state, depth, width) as save_adapter_state wrote them; attach with HoulsbyAdapters(points, state)."""
    from pathlib import Path

    from safetensors import safe_open

    state: dict = {}
    with safe_open(str(Path(folder) / ADAPTER_FILE), framework="pt") as f:
        meta = f.metadata()
        for name in f.keys():
            key, part = name.rsplit(".", 1)
            state.setdefault(key, {})[part] = f.get_tensor(name)
    return state, int(meta["depth"]), int(meta["width"])
