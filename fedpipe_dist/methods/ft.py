"""Full fine-tuning FedAvg (`method: ft`), the paper's FT baseline: every parameter trains on every server
(runtime/client.train_full), the weight changes travel whole and are averaged with |D_i| weights
(algorithm/aggregation/ft.py), and every rank adds the average to its parameters. The base is the model's own
fp32 weights, so there is no other precision, and the checkpoint holds every parameter."""

from __future__ import annotations

import torch

from ..algorithm.cost import ft_flops_per_sample, ft_memory_bytes
from ..errors import UserInputError
from ..runtime.client import model_parameters, train_full
from ..runtime.exchange import fedavg_exchange, tensor_layout
from .base import Exchanged, Method, register_method, require


@register_method
class FullFineTuning(Method):
    name = "ft"
    precision_options = ("fp32",)  # it trains its fp32 weights: a server they do not fit under-trains
    checkpoints_base = False
    central_trains = "full"  # its centralized limit fine-tunes every parameter too
    takes_kept_moments = True  # train.optimizer_state=kept: each server's AdamW moments of every parameter

    @classmethod
    def validate(cls, cfg) -> None:
        require(cfg.model.dtype == "float32", "model.dtype",
                f"method ft trains every weight in place, which needs model.dtype=float32 (got {cfg.model.dtype})")
        asked = cfg.clients.precision if isinstance(cfg.clients.precision, list) else [cfg.clients.precision]
        require(all(p in ("auto", "fp32") for p in asked), "clients.precision",
                f"method ft cannot train a quantized or 16-bit frozen base (got {cfg.clients.precision}); set "
                "clients.precision=auto or fp32")
        require(cfg.eval.precision in ("auto", "fp32"), "eval.precision",
                f"method ft evaluates its fp32 weights (got {cfg.eval.precision}); set eval.precision=auto or fp32")

    def step_cost(self, c, plan, shape, seq_len, act_bytes):
        b = plan.batch_size
        return b * ft_flops_per_sample(shape, seq_len), ft_memory_bytes(shape, batch=b, seq_len=seq_len,
                                                                        act_bytes=act_bytes)

    def setup(self, run) -> None:
        super().setup(run)
        self.parameters = model_parameters(run.model)

    def train(self, c, plan, shard, **common):
        return train_full(self.run.model, plan, shard, self.training, opt_memory=self.kept_moments(c), **common)

    def exchange(self, t, plans, contributors, updates, claims) -> Exchanged:
        run = self.run
        (average,), traffic = fedavg_exchange(run.comm, [contributors], [tensor_layout(self.parameters)], updates,
                                              run.owner, self.aggregator, plans, run.shard_sizes)
        with torch.no_grad():  # every parameter moves by the averaged change (a tied embedding / LM head once)
            for name, p in self.parameters.items():
                p.add_(average[name].to(device=p.device, dtype=p.dtype))
        return Exchanged({}, traffic)

    def state_dict(self) -> dict:
        return {"parameters": {k: p.detach().cpu() for k, p in self.parameters.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("parameters")
        if saved is None or set(saved) != set(self.parameters):
            raise UserInputError("resume: the checkpoint does not hold this model's parameters (method ft needs "
                                 "them all); resume with the job that wrote it")
        with torch.no_grad():
            for k, p in self.parameters.items():
                p.copy_(saved[k])
