"""JobConfig: a whole job, one field per section (sections.py), checked across its fields when it is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .sections import (  # noqa: F401 (every section class: JobConfig's annotations are resolved here)
    AggregationConfig,
    CheckpointConfig,
    ClientsConfig,
    CommConfig,
    DataConfig,
    EvalConfig,
    FaultsConfig,
    FedAdapterConfig,
    GenerationConfig,
    HetLoRAConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PlanConfig,
    QuantConfig,
    TrainConfig,
)
from .validation import validate


@dataclass(kw_only=True)
class JobConfig:
    """A whole federated fine-tuning job. See jobs/quickstart.yaml for a documented example."""

    method: str = "fedpipe"
    rounds: int = 20
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    hetlora: HetLoRAConfig = field(default_factory=HetLoRAConfig)
    fedadapter: FedAdapterConfig = field(default_factory=FedAdapterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: bool = False
    """Continue the run in output.dir from its newest complete checkpoint, appending to its results.h5
    (a restart under torchrun --max-restarts resumes without it). Nothing to resume from: a fresh start."""
    central: bool = False
    """The job's centralized limit instead of the job (runtime/central.py): one process trains LoRA at lora.rank
    (every parameter for method ft) on exactly the samples the servers would train on, each step the union of
    the servers' batches of that step, one AdamW for the whole run. results.h5 records method=central."""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
