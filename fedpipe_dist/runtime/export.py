"""`fedpipe export RUN --adapter [--rank R]`: a run's total update as a peft LoRA adapter.

    fedpipe export runs/quickstart --adapter                 # -> runs/quickstart/adapter/
    python -c "from peft import PeftModel; PeftModel.from_pretrained(base, 'runs/quickstart/adapter')"

final/ holds the merged model (every method's updates folded into the base, at eval.precision): about 27 GB at
LLaMA-2-7B, while users share and serve adapters. This writes, per adapted module (lora.targets), the update
dW = W_final - W_pretrained as a rank-R factorization B A from its truncated SVD, in peft's format (adapter_config
.json + adapter_model.safetensors, lora_alpha = r so that peft's scale is 1). Exact (up to float rounding)
where the run's total update has rank <= R on every module: method=lora and lora_hb keep one global adapter of
rank lora.rank, merged once at the end. Elsewhere (methods that fold a new update into the base every round,
a quantized eval base whose rounding is in W_final) the SVD keeps the largest share of ||dW||: the retained
share sum_k s_k^2 / ||dW||_F^2 is printed and written to adapter/fedpipe_export.json per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserInputError
from ..job import job_from_dict


def export_adapter(run_dir: str, rank: int | None, out: str | None, log=print) -> Path:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from ..adapters.sites import find_sites
    from ..io.hdf5 import Results
    from ..models import load_model, load_tokenizer

    folder = Path(run_dir).expanduser()
    final = folder / "final"
    if not (folder / "results.h5").is_file() or not (final / "config.json").is_file():
        raise UserInputError(f"fedpipe export: {str(folder)!r} is not a finished run with its merged model (needs "
                             "results.h5 and final/); run the job with output.save_final=true first")
    tree = json.loads(Results(folder / "results.h5").attrs["config_json"])
    cfg = job_from_dict(tree)
    from ..methods import method_class

    if not method_class(cfg.method).trains_lora:
        raise UserInputError(f"fedpipe export --adapter: method {cfg.method} does not train LoRA adapters, so its "
                             "update has no LoRA form; its final/ folder is the model to share")
    if rank is not None and rank < 1:
        raise UserInputError(f"fedpipe export: --rank must be >= 1 (got {rank})")
    tok = load_tokenizer(str(final))
    base = load_model(cfg.model.name_or_path, seed=cfg.seed, dtype="float32", tokenizer=tok)
    tuned = load_model(str(final), seed=cfg.seed, dtype="float32", tokenizer=tok)
    sites = [s for s in find_sites(base) if s.kind in cfg.lora.targets]
    modules = sorted({s.module_name for s in sites})
    # default rank of a module: lora.rank per adapted weight in it (GPT-2's fused c_attn holds q, k and v)
    ranks = {m: rank or cfg.lora.rank * sum(s.module_name == m for s in sites) for m in modules}
    factors, retained = {}, {}
    for name in modules:
        delta = _weight(tuned, name) - _weight(base, name)  # [out, in]
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(ranks[name], s.numel())
        ranks[name] = k
        total = float((s ** 2).sum())
        retained[name] = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        root = s[:k].sqrt()
        factors[name] = ((u[:, :k] * root).float(), (root[:, None] * vh[:k]).float())  # B [out, k], A [k, in]
    fan_in_fan_out = any(type(base.get_submodule(n)).__name__ == "Conv1D" for n in modules)
    r = max(ranks.values())
    # per module its own rank, and alpha = rank so that peft's scale alpha / r is 1
    config = LoraConfig(r=r, lora_alpha=r, rank_pattern=dict(ranks), alpha_pattern=dict(ranks), lora_dropout=0.0,
                        target_modules=modules, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    state = {}
    for name, (b, a) in factors.items():
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = a.contiguous(), b.contiguous()
    target = Path(out) if out else folder / "adapter"
    target.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
    peft_model.peft_config["default"].save_pretrained(str(target))
    save_file(state, str(target / "adapter_model.safetensors"))
    worst = min(retained.values()) if retained else 1.0
    (target / "fedpipe_export.json").write_text(json.dumps(
        {"run": str(folder), "method": cfg.method, "ranks": ranks, "retained_share": retained,
         "min_retained_share": worst}, indent=1))
    log(f"fedpipe export: {len(modules)} modules at rank {min(ranks.values())}-{r} -> {target} (retained share of "
        f"||dW||^2: min {worst:.6f}{'; exact' if worst > 1 - 1e-9 else ''})")
    return target


def _weight(model, name: str) -> torch.Tensor:
    """A module's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    mod = model.get_submodule(name)
    w = mod.weight.detach().double()
    return w.t() if type(mod).__name__ == "Conv1D" else w
