"""FedAvg-LoRA written the way the field's code writes it, with peft, as a reference for `method: lora` (issue 26).

It follows OpenFedLLM's main_sft.py (rui-ye/OpenFedLLM): `get_peft_model` once, `global_dict =
get_peft_model_state_dict(model)`, and every round, for every client: `set_peft_model_state_dict(model,
global_dict)`, a fresh optimizer (their new trainer per round; here torch's AdamW at the job's lr, weight decay and
gradient clipping; with train.lr_schedule=cosine, their cosine lr across rounds), the client's local steps, its
`get_peft_model_state_dict` kept; then global_dict = the sample-count-weighted average of the clients' state dicts
(their fed_global.py for fedavg). Nothing of the engine's LoRA (adapters/, methods/, runtime/exchange.py) is used:
only the job's data, shards, batch streams and eval sample (runtime/setup.set_up, runtime/client.batch_indices), so
that both see the same samples, and the engine's shared initial A (copied into peft's lora_A), so that both start
from the same adapter.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peft_fedavg.py JOB.yaml [overrides]   # eval loss per round, JSON

tests/test_central.py checks that `method: lora` reproduces it on a tiny Llama; benchmarks/federated_gap.py
--peft-reference runs it beside the engine on stories260K.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PEFT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}  # Llama-style attention only


def peft_fedavg(cfg) -> list[float]:
    """Run cfg (method lora's job: uniform rank, batch_max, every server each round) as peft FedAvg; returns the
    eval loss after each round, round 0 (the base) first."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.utils import logging as hf_logging

    from fedpipe_dist.adapters.lora import shared_initial_adapter
    from fedpipe_dist.algorithm.planner import sample_clients
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.metrics.perplexity import evaluate, lm_loss
    from fedpipe_dist.models import load_model
    from fedpipe_dist.runtime.client import batch_indices, client_seed
    from fedpipe_dist.runtime.record import Log
    from fedpipe_dist.runtime.setup import set_up

    hf_logging.disable_progress_bar()
    run = set_up(cfg, LocalComm(), Log(False))  # the job's shards, batch streams' sizes and eval sample
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, dtype="float32", tokenizer=run.tok)
    lc = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=[PEFT_TARGETS[k] for k in cfg.lora.targets])
    model = get_peft_model(model, lc)
    start = shared_initial_adapter(run.sites, cfg.lora.rank, cfg.seed)
    with torch.no_grad():  # the same initial A as the engine (B is zero in both)
        for s in run.sites:
            layer = model.base_model.model.get_submodule(s.module_name)
            layer.lora_A["default"].weight.copy_(start[s.key][1])
    global_dict = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def eval_loss() -> float:
        model.eval()
        return evaluate(model, run.eval_slice, batch_size=cfg.eval.batch_size, pad_id=run.pad_id)["loss"]

    def lr_of_round(t: int) -> float:  # OpenFedLLM's main_sft.py: cosine_learning_rate(round, num_rounds, lr, 1e-6)
        tr = cfg.train
        if tr.lr_schedule == "constant":
            return tr.lr
        return tr.lr_min + 0.5 * (tr.lr - tr.lr_min) * (1 + math.cos(math.pi * (t - 1) / cfg.rounds))

    losses = [eval_loss()]
    for t in range(1, cfg.rounds + 1):
        clients = sample_clients(cfg.clients.n, cfg.clients.fraction, seed=cfg.seed, round_idx=t)
        local, sizes = [], []
        for c in clients:
            set_peft_model_state_dict(model, global_dict)
            opt = torch.optim.AdamW(trainable, lr=lr_of_round(t), weight_decay=cfg.train.weight_decay)
            seed = client_seed(cfg.seed, t, c)
            draws = batch_indices(len(run.shards[c]), cfg.train.batch_max, np.random.default_rng(seed))
            model.train()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for _ in range(cfg.train.local_steps):
                    loss = lm_loss(model, collate(run.shards[c], next(draws), run.pad_id))
                    loss.backward()
                    if cfg.train.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            local.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(run.shards[c]))
        w = np.asarray(sizes, dtype=float) / sum(sizes)  # fed_global.py: sample_num_list weights
        global_dict = {k: sum(float(wi) * d[k] for wi, d in zip(w, local)) for k in global_dict}
        set_peft_model_state_dict(model, global_dict)
        losses.append(eval_loss())
    return losses


def main(argv=None) -> None:
    from fedpipe_dist.job import load_job

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_job(a.job, [*a.overrides, "method=lora"])
    print(json.dumps({"eval_loss": peft_fedavg(cfg)}))


if __name__ == "__main__":
    main()
