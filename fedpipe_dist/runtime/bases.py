"""Each rank's frozen base at every precision its servers train on, and the merge that keeps every update.

    bases = RankBases(model, sites, {"fp32", "nf4"}, device=device)
    bases.use("nf4")                      # install the NF4 view before training an NF4 server
    absorbed = bases.merge(deltas)        # {precision: share of ||dW||^2 the effective weight took up}
    bases.export("nf4")                   # plain HF modules holding dequant(W0) + D, for save_pretrained

What is quantized: every linear layer inside the transformer blocks (attention and MLP), as QLoRA does;
embeddings, norms and the LM head stay in the dtype the model was loaded in.

Views: a rank may host servers of different precisions (virtual servers) and evaluates at
eval.precision, so it keeps one set of block modules per precision it needs and swaps them into the
model (a setattr per module; nothing is copied). The model's own modules are the fp32 view; they are
dropped, with their memory, when no server on this rank and no evaluation needs fp32.

Merging (NOTES.md, Sec. III-F): the fp32 view adds dW to its weights (exact to fp32 rounding). Every other
view keeps W0 frozen at its precision and shares one MergedResidual per adapted weight holding D = sum_t dW_t
(exact low-rank fp32 factors while smaller than a dense 16-bit copy, then dense fp16), so the effective
weight is dequant(W0) + D and no update is rounded away by the base's grid. The cost is the residual's
bytes (`residual_bytes`), at most 2 bytes per adapted parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.sites import Site, is_block_linear, weight_slice
from ..algorithm.aggregation.base import to_dense
from ..algorithm.merge import MergedResidual
from ..algorithm.sanitize import factored_sq_norm
from ..errors import UserInputError
from ..quantized import QuantLinear, linear_weight


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


class RankBases:
    def __init__(self, model: nn.Module, sites: list[Site], precisions: set[str], *, device: torch.device,
                 block_size: int = 64, double_quant: bool = False, backend: str = "auto"):
        self.model = model
        self.sites = sites
        self.device = device
        from transformers.pytorch_utils import Conv1D

        self.names = [n for n, m in model.named_modules() if is_block_linear(n, m)]
        originals = {n: model.get_submodule(n) for n in self.names}
        self.conv1d = {n for n, m in originals.items() if isinstance(m, Conv1D)}  # GPT-2 stores [in, out]
        block_tensors = {id(t) for m in originals.values() for t in list(m.parameters()) + list(m.buffers())}
        everything = list(model.parameters()) + list(model.buffers())
        self._rest_bytes = _tensor_bytes(t for t in everything if id(t) not in block_tensors)
        self.base_params = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
        native_fp32 = next(model.parameters()).dtype == torch.float32
        if "fp32" in precisions and not native_fp32:
            raise UserInputError("clients.precision: an fp32 base needs the model loaded in fp32, but "
                                 f"model.dtype is {next(model.parameters()).dtype}; set model.dtype=float32 "
                                 "or choose fp16, bf16, nf8 or nf4")
        if backend == "bitsandbytes" and any(p == "nf4" for p in precisions):
            from ..quantized import bitsandbytes_available

            if not bitsandbytes_available():
                raise UserInputError("quant.backend=bitsandbytes, but bitsandbytes cannot be imported here; "
                                     "pip install bitsandbytes, or set quant.backend=native (byte-identical NF4)")
        quantized = sorted(p for p in precisions if p != "fp32")
        # One residual per adapted weight (site), shared by every non-fp32 view: D is the same whatever
        # W0's grid. It holds nothing until its weight first receives an update.
        self.residuals: dict[str, MergedResidual] = {}
        by_module: dict[str, list] = {}
        if quantized:
            for s in sites:
                self.residuals[s.key] = MergedResidual(s.out_features, s.in_features, device=device)
                by_module.setdefault(s.module_name, []).append((s.out_start, s.out_end, self.residuals[s.key]))
        self.views: dict[str, dict[str, nn.Module]] = {}
        if "fp32" in precisions:
            self.views["fp32"] = originals
        for p in quantized:
            view = {}
            for n, mod in originals.items():
                w, bias = linear_weight(mod)
                view[n] = QuantLinear.from_weight(w.to(device), bias, precision=p, block_size=block_size,
                                                  double_quant=double_quant, backend=backend,
                                                  residuals=by_module.get(n)).to(device)
            self.views[p] = view
        self.current = "fp32" if "fp32" in self.views else None
        if self.current is None:
            self.use(quantized[0])  # the model's own fp32 block modules are no longer referenced: freed
        del originals

    # ---- views ---------------------------------------------------------------------------------------
    def use(self, precision: str) -> None:
        """Install the block modules of `precision` into the model (a no-op when already installed)."""
        if precision == self.current:
            return
        if precision not in self.views:
            raise KeyError(f"this rank holds no {precision} base (it holds {sorted(self.views)})")
        for n, mod in self.views[precision].items():
            _set_module(self.model, n, mod)
        self.current = precision

    def block_weight_bytes(self, precision: str) -> int:
        """Measured storage of the block linears' weights W0 at `precision` (codes and scales, or matrices)."""
        view = self.views[precision].values()
        if precision == "fp32":
            return _tensor_bytes(m.weight for m in view)
        return sum(m.weight_nbytes() for m in view)

    def base_bytes(self, precision: str) -> int:
        """Measured storage of the whole base at `precision`: W0 of the block linears at that precision plus
        everything else (embeddings, norms, LM head, biases) as loaded; the residual is not included."""
        biases = _tensor_bytes(m.bias for m in self.views[precision].values())
        return self.block_weight_bytes(precision) + biases + self._rest_bytes

    def residual_bytes(self) -> int:
        return sum(r.nbytes() for r in self.residuals.values())

    def extra_bytes(self, precision: str) -> int:
        """What the update-keeping design costs a server of `precision` beyond its base (0 for fp32)."""
        return 0 if precision == "fp32" else self.residual_bytes()

    # ---- merging -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, deltas: dict, site_by_key: dict[str, Site], *, measure: bool = True) -> dict[str, float]:
        """Fold the round's merged update into every view this rank holds.

        deltas: site.key -> dense dW [out, in] or factors (B [out, R], A [R, in]) with dW = B @ A.
        Returns, per view precision, the absorbed fraction 1 - ||(after - before) - dW||^2 / ||dW||^2 summed
        over sites, measured on the stored weights (NaN when not measured or nothing was merged): exactly on
        weights of up to EXACT_CHECK entries, on CHECK_ROWS fixed random rows of larger ones (see _check_rows).
        """
        err = {"fp32": 0.0, "residual": 0.0}
        energy = 0.0
        for key, d in deltas.items():
            s = site_by_key[key]
            rows = _check_rows(s.out_features, s.in_features) if measure else None
            if measure:
                energy += _energy(d)
            if "fp32" in self.views:
                w = weight_slice(self.views["fp32"][s.module_name], s)
                dense = to_dense(d)
                before = _rows(w, rows).clone() if measure else None
                w += dense.to(device=w.device, dtype=w.dtype)
                if measure:
                    err["fp32"] += _error(before, _rows(w, rows), _rows(dense, rows), s.out_features)
            if self.residuals:
                res = self.residuals[s.key]
                before = res.dense(rows) if measure else None
                if torch.is_tensor(d):
                    res.add(delta=d)
                else:
                    res.add(d[0], d[1])
                if measure:
                    err["residual"] += _error(before, res.dense(rows), _dense_rows(d, rows),
                                              s.out_features)
        out = {}
        for p in self.views:
            e = err["fp32" if p == "fp32" else "residual"]
            out[p] = 1.0 - e / energy if measure and energy > 0 else float("nan")
        return out

    # ---- checkpoints (io/checkpoint.py) ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What merging has changed: the fp32 view's adapted weights and every merged residual, on the CPU (for
        torch.save, which writes them at once; a residual is cloned, since a slice would carry its whole storage)."""
        fp32 = {}
        if "fp32" in self.views:
            for name in dict.fromkeys(s.module_name for s in self.sites):
                fp32[name] = self.views["fp32"][name].weight.detach().cpu()
        residuals = {k: {"U": r.U.cpu().clone(), "V": r.V.cpu().clone(),
                         "D": None if r.D is None else r.D.cpu().clone()} for k, r in self.residuals.items()}
        return {"fp32": fp32, "residuals": residuals}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Put a state_dict() back into bases built alike (same model and sites). The state may hold parts
        this rank does not keep (another rank's precisions, in a resume on another number of ranks): the fp32
        weights are used when this rank has an fp32 view, the residuals when it has a quantized one."""
        fp32 = state["fp32"] if "fp32" in self.views else {}
        residuals = state["residuals"] if self.residuals else {}
        if ("fp32" in self.views and set(fp32) != {s.module_name for s in self.sites}) \
                or not set(self.residuals) <= set(residuals):
            raise UserInputError("resume: the checkpoint's bases do not match this job's (other adapted weights or "
                                 "base precisions); resume with the job that wrote it")
        for name, w in fp32.items():
            weight = self.views["fp32"][name].weight
            if weight.shape != w.shape:
                raise UserInputError(f"resume: the checkpoint's {name} is {tuple(w.shape)}, this model's is "
                                     f"{tuple(weight.shape)}; resume with the model that wrote it")
            weight.copy_(w)
        for key, r in self.residuals.items():
            saved = residuals[key]
            if saved["V"].shape[1:] != r.V.shape[1:] or saved["U"].shape[0] != r.U.shape[0]:
                raise UserInputError(f"resume: the checkpoint's merged residual of {key} does not fit this model; "
                                     "resume with the model that wrote it")
            device = r.U.device
            # copies: the saved tensors may be memory-mapped from the checkpoint file
            r.U, r.V = saved["U"].to(device, copy=True), saved["V"].to(device, copy=True)
            r.D = None if saved["D"] is None else saved["D"].to(device, copy=True)

    # ---- export --------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, precision: str) -> nn.Module:
        """Make the model a plain HF model holding the effective weights of `precision`'s view:
        dequant(W0) + D in the modules' original types and layouts (fp32). Ends the use of the views."""
        from transformers.pytorch_utils import Conv1D

        self.use(precision)
        if precision == "fp32":
            return self.model
        for n, mod in self.views[precision].items():
            w = mod.weight  # [out, in], W0 + D
            bias = None if mod.bias is None else mod.bias.detach().float()
            if n in self.conv1d:
                new = Conv1D(w.shape[0], w.shape[1])
                new.weight.copy_(w.t())
                new.bias.copy_(bias if bias is not None else torch.zeros(w.shape[0]))
            else:
                new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
                new.weight.copy_(w)
                if bias is not None:
                    new.bias.copy_(bias)
            new.requires_grad_(False)
            _set_module(self.model, n, new.to(w.device))
        self.current = None
        return self.model


# The fidelity check (merge(measure=True)) compares each adapted weight before and after the merge in float64.
# Done on every entry, that costs float64 copies of every adapted weight every round: at LLaMA-2-7B's 4096 x 4096
# about 0.7 CPU-s per weight, 10x the merge itself (issue 20). Above EXACT_CHECK entries it therefore looks at
# CHECK_ROWS rows drawn once per shape (the same rows every round and after a resume: no RNG state is touched)
# and scales their error by out / CHECK_ROWS, an unbiased estimate of the whole weight's; tests/test_merge_check.py
# measures its error against the exact check on merged updates at 4096 x 4096.
EXACT_CHECK = 1 << 20
CHECK_ROWS = 128


def _check_rows(out_features: int, in_features: int) -> torch.Tensor | None:
    """The rows the fidelity check looks at (None: all of them)."""
    if out_features * in_features <= EXACT_CHECK or out_features <= CHECK_ROWS:
        return None
    g = torch.Generator().manual_seed(out_features * 1_000_003 + in_features)
    return torch.randperm(out_features, generator=g)[:CHECK_ROWS].sort().values


def _rows(m: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return m if rows is None else m[rows.to(m.device)]


def _dense_rows(d, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows of dW, dense or factored (B[rows] @ A: only those rows are formed)."""
    if torch.is_tensor(d):
        return _rows(d, rows)
    return _rows(d[0], rows) @ d[1]


def _energy(d) -> float:
    """||dW||_F^2 in float64, from the factors when factored (no [out, in] product)."""
    return float(d.double().square().sum()) if torch.is_tensor(d) else factored_sq_norm(*d)


def _error(before: torch.Tensor, after: torch.Tensor, dense: torch.Tensor, out_features: int) -> float:
    """||(after - before) - dW||^2 over the rows given, scaled to the whole weight when they are a sample."""
    e = float((after.double() - before.double() - dense.double()).square().sum())
    return e * out_features / before.shape[0]


def lowest_precision(precisions) -> str:
    """The base with the fewest bits (ties: bf16 before fp16, the coarser mantissa)."""
    order = ("fp32", "fp16", "bf16", "nf8", "nf4")
    return max(precisions, key=order.index)
