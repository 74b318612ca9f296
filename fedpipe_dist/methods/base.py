"""The method interface and its registry: one class owns everything that makes a method what it is.

The round engine (runtime/engine.py) runs the same phases for every method and asks the method, through
the hooks below, what a server trains and from which start, what a plan costs, how the updates travel and
fold back, and what is checkpointed, recorded and exported. Adding a method is one file (docs/architecture.md,
"Adding a method"):

    @register_method
    class MyMethod(LoRAMethod):          # or Method, for a method that is not LoRA
        name = "mymethod"                # `method: mymethod` in a job file
        aggregator_name = "fedpipe"      # the math in algorithm/aggregation/ its updates are combined with

Lifecycle, per rank: `Method(cfg)` once the job is validated; `setup(run)` once the model, bases and planner
exist (`run` is runtime/setup.Run: model, sites, shards, planner, bases, comm, evaluate()); then per round
`begin_round` -> `train` (each hosted server) -> `update_norm` -> `exchange` -> `end_round` -> `record`;
at the end `finish` then `export`. Everything a hook computes must be the same on every rank except
what `train` produces for the rank's own servers.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

from ..algorithm.aggregation import get_aggregator
from ..algorithm.aggregation.base import REGISTRY as AGGREGATORS
from ..algorithm.sanitize import update_norm
from ..errors import ConfigError
from ..runtime.client import LocalTraining
from ..runtime.trees import tree_to


class Report(NamedTuple):
    """What each server tells every rank after training (all-gathered): the sanitization's input and
    HetLoRA's pruning signal."""

    completed: bool
    prune_norm: float
    update_norm: float


@dataclass
class Exchanged:
    """A round's exchange, the same on every rank: `deltas` for every base to merge now ({} when the method
    keeps a global adapter or moved its parameters itself), the traffic counters (runtime/exchange.py),
    and the servers rank 0 left out after receiving their update (its norm was not the one reported)."""

    deltas: dict
    traffic: dict
    late: list[int] = field(default_factory=list)


def require(cond: bool, key: str, msg: str) -> None:
    """A method's job check: a ConfigError naming the key (as config.validate raises them)."""
    if not cond:
        raise ConfigError(f"{key}: {msg}", key=key)


class Method:
    name = ""
    aggregator_name = ""  # the aggregator in algorithm/aggregation/ (default: the method's own name)
    trains_lora = False  # plans carry LoRA ranks per attention weight
    precision_options: tuple[str, ...] | None = None  # what precision=auto may pick (None: every one that loads)
    checkpoints_base = True  # False: the method checkpoints every parameter itself (ft)
    central_trains = "lora"  # what its centralized limit trains (runtime/central.py): "lora" or "full" (ft)
    takes_kept_moments = False  # True: its train() passes kept_moments(c) on (train.optimizer_state=kept)
    takes_carry = False  # True: lora.carry says what its next round starts from (fedpipe)
    takes_rebalance = False  # True: lora.rebalance can refactor its kept global adapter of factors each round

    def __init__(self, cfg):
        self.cfg = cfg
        self.training = LocalTraining.of(cfg)  # what its servers' local training reads (runtime/client.py)
        self.aggregator = get_aggregator(self.aggregator_name or self.name, weights=cfg.aggregation.weights,
                                         carry=cfg.lora.carry)
        self.run = None
        self.opt_memory: dict[int, dict] = {}  # train.optimizer_state=kept: each hosted server's AdamW state

    # ---- the job ------------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg) -> None:
        """Checks of the job that only this method needs (ConfigError via `require`)."""

    @classmethod
    def takes_server_opt(cls, carry: str) -> bool:
        """True: aggregation.server_opt can step this method's kept global adapter with lora.carry = `carry`
        (methods/lora.py)."""
        return False

    # ---- planning (runtime/planning.py) ---------------------------------------------------------------------
    def adaptive(self) -> bool:
        """True: FedPipe's Algorithm 1 plans every round; False: the uniform plan (batch_max, the server's rank)."""
        return False

    def initial_ranks(self, flops: list[float]) -> list[int]:
        """Each server's LoRA rank in a uniform plan."""
        return [self.cfg.lora.rank] * self.cfg.clients.n

    def batch_sizes(self, flops_per_s: list[float], shape, seq_len: int) -> list[int]:
        """Each server's batch in a uniform plan: train.batch_max everywhere (the baselines as published)."""
        return [self.cfg.train.batch_max] * self.cfg.clients.n

    def step_cost(self, c: int, plan, shape, seq_len: int, act_bytes: int) -> tuple[float, float]:
        """FLOPs of one local step and peak memory of server c's uniform plan (algorithm/cost.py)."""
        raise NotImplementedError

    # ---- a run --------------------------------------------------------------------------------------------
    def setup(self, run) -> None:
        """Called once the run's model, bases and planner exist (and before a resume puts state back)."""
        self.run = run

    def begin_round(self, t: int, selected: list[int]) -> None:
        """Before planning round t."""

    def train(self, c: int, plan, shard, **common):
        """Train hosted server c for its plan on its shard; returns (ClientUpdate, ClientStats)."""
        raise NotImplementedError

    def update_norm(self, c: int, update) -> float:
        """The norm of the change server c's update stands for (what sanitization compares)."""
        return update_norm(update.factors)

    def exchange(self, t: int, plans, contributors: list[int], updates: dict, claims: dict | None) -> Exchanged:
        """Combine the contributors' updates (every rank calls it; each holds its own servers' updates)."""
        raise NotImplementedError

    def end_round(self, t: int, contributors: list[int], reports: dict[int, Report]) -> None:
        """After the exchange, before the bases merge `deltas`."""

    def attach(self, state=None):
        """A context manager that puts the method's kept global adapter (or `state`) on the model for
        evaluation and generation; nothing for a method that merges every round."""
        return nullcontext()

    def record(self, arrays: dict) -> None:
        """Add the method's own per-server columns to the round's HDF5 arrays."""

    # ---- checkpoints (runtime/resume.py) --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What this rank needs to continue after the round just finished (CPU tensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Put state_dict() back (raise UserInputError when it does not fit this job)."""

    def kept_moments(self, c: int) -> dict | None:
        """Server c's AdamW state to carry through its round (train.optimizer_state=kept; runtime/client's
        `opt_memory`); None: a fresh AdamW, as the field's FedAvg code starts every round."""
        return self.opt_memory.setdefault(c, {}) if self.cfg.train.optimizer_state == "kept" else None

    def server_states(self) -> dict[int, dict]:
        """Per hosted server, what only that server keeps (its AdamW moments with train.optimizer_state=kept);
        a resume on another number of ranks takes each from the rank that hosted the server."""
        return {c: {"opt": tree_to(m, "cpu")} for c, m in self.opt_memory.items()}

    def load_server_states(self, states: dict[int, dict]) -> None:
        """Put server_states() back."""
        self.opt_memory = {c: tree_to(st["opt"], "cpu", copy=True) for c, st in states.items()}

    # ---- the end ------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """After the last round, before final/ is written (a kept LoRA adapter joins the base here)."""

    def export(self, folder) -> None:
        """Write what the merged model alone does not hold into final/ (FedAdapter's adapters)."""


REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make `method: <cls.name>` available to job files (a class decorator)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    if (cls.aggregator_name or cls.name) not in AGGREGATORS:
        raise ValueError(f"method {cls.name!r}: no aggregator {cls.aggregator_name or cls.name!r} in "
                         f"algorithm/aggregation (registered: {sorted(AGGREGATORS)})")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"method: unknown method {name!r}; choose one of {list(REGISTRY)}", key="method")
    return REGISTRY[name]


def make_method(cfg) -> Method:
    """The method a job names, set up from the job."""
    return method_class(cfg.method)(cfg)
