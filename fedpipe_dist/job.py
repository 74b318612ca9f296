"""Loading a job: a YAML file and overrides (or a results.h5's config_json) into a checked JobConfig.

config/ holds the sections and checks each of them; the checks that depend on the job's method are the
method's own (methods/, `Method.validate`). This module sits above both, so that config/ never imports the
methods (which build on the runtime, which reads config/): load every job through here.
"""

from __future__ import annotations

from pathlib import Path

from .config import PLAN_VARIANTS, REBALANCE_PRESETS, JobConfig, build_job, read_job
from .errors import ConfigError
from .methods import REGISTRY, method_class


def check_method(cfg: JobConfig) -> None:
    """The job's method checks what only it needs (an unknown method name is a ConfigError naming the known
    ones), after filling in lora.rebalance's preset where it applies; a server optimizer, kept AdamW moments and a
    factor wire format other than fp32 each need a method that has them, lora.carry (set to other than
    plan.variant's choice) needs FedPipe, and lora.rebalance a kept adapter of factors and no kept optimizer
    state."""
    method = method_class(cfg.method)
    if cfg.lora.rebalance is None:  # plan.variant's choice where it applies (FedPipe's kept adapter), none elsewhere
        wanted = REBALANCE_PRESETS[cfg.plan.variant]
        # not at one local step a round, where orth measured worse (benchmarks/README.md, federated_gap: +0.005 at a
        # constant lr, +0.06 under train.lr_schedule=cosine, 3 seeds each; it gains 0.03-0.05 at 5 and 10 steps)
        applies = (method.takes_carry and cfg.train.local_steps > 1
                   and rebalance_conflict(cfg, method, wanted) is None)
        cfg.lora.rebalance = wanted if applies else "none"
    method.validate(cfg)
    if cfg.aggregation.server_opt != "none" and not method.takes_server_opt(cfg.lora.carry):
        raise ConfigError(f"aggregation.server_opt: {cfg.aggregation.server_opt} steps a kept global adapter of "
                          f"LoRA factors; method {cfg.method} (with these settings) keeps none. Use it with lora, "
                          "lora_hb or fedpipe with lora.carry=adapter, or set aggregation.server_opt=none",
                          key="aggregation.server_opt")
    if cfg.train.optimizer_state == "kept" and not method.takes_kept_moments:
        raise ConfigError(f"train.optimizer_state: method {cfg.method} starts every server's round with a fresh "
                          f"AdamW; the methods whose servers keep their moments are "
                          f"{sorted(n for n, m in REGISTRY.items() if m.takes_kept_moments)}. Set "
                          "train.optimizer_state=fresh", key="train.optimizer_state")
    preset = PLAN_VARIANTS[cfg.plan.variant]["lora.carry"]
    if cfg.lora.carry != preset and not method.takes_carry:  # the preset: what a job that leaves it unset holds
        raise ConfigError(f"lora.carry: {cfg.lora.carry} says what FedPipe's servers start the next round from; method "
                          f"{cfg.method} has its own rule (docs/methods.md) and would ignore it. Use it with method "
                          f"fedpipe, or leave lora.carry unset (plan.variant={cfg.plan.variant}'s {preset})",
                          key="lora.carry")
    if cfg.lora.rebalance != "none" and (why := rebalance_conflict(cfg, method, cfg.lora.rebalance)):
        raise ConfigError(f"lora.rebalance: {why}", key="lora.rebalance")
    if cfg.aggregation.wire != "fp32" and not method.trains_lora:
        raise ConfigError(f"aggregation.wire: {cfg.aggregation.wire} is a format for LoRA factors; method {cfg.method} "
                          "sends whole tensors in fp32, so set aggregation.wire=fp32", key="aggregation.wire")


def rebalance_conflict(cfg: JobConfig, method, value: str) -> str | None:
    """Why lora.rebalance=`value` cannot apply to this job, with the fix (None: it can). The one rule both the
    refusal of an explicit value and the tuned preset's "where it applies" read."""
    if not method.takes_rebalance:
        return (f"{value} refactors a kept global adapter of factors at one rank; method {cfg.method} keeps none. Use "
                "it with method fedpipe (lora.carry=adapter), lora or lora_hb, or set lora.rebalance=none")
    if method.takes_carry and cfg.lora.carry != "adapter":
        return (f"{value} refactors the kept global adapter, which only lora.carry=adapter keeps (got lora.carry="
                f"{cfg.lora.carry}); set lora.carry=adapter or lora.rebalance=none")
    for key, state, moving in (("aggregation.server_opt", "server optimizer's moments", cfg.aggregation.server_opt),
                               ("train.optimizer_state", "servers' kept AdamW moments", cfg.train.optimizer_state)):
        if moving not in ("none", "fresh"):
            return (f"{value} refactors the kept adapter every round, which would rotate the {state} ({key}={moving}) "
                    "out from under them; use one of the two")
    return None


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a YAML job file (or start from defaults when path is None), apply the dotted overrides, and check
    every section and the method's own settings."""
    return read_job(path, overrides, check=check_method)


def job_from_dict(tree: dict) -> JobConfig:
    """Rebuild a JobConfig from its to_dict() form (e.g. the config_json attribute of results.h5), checked."""
    cfg = build_job(tree)
    check_method(cfg)
    return cfg
