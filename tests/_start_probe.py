"""`fedpipe_dist run ...` with every LoRA server's starting factors saved (not a test module): tests/test_central.py
launches it under torchrun to see what each rank's servers start from.

    FEDPIPE_START_PROBE=DIR python -m tests._start_probe run JOB.yaml [overrides]   # DIR/start_r{round}_c{server}.pt
"""

import os

import torch

from fedpipe_dist.cli import main
from fedpipe_dist.methods import lora as lora_module

OUT = os.environ["FEDPIPE_START_PROBE"]
_train_client = lora_module.train_client


def _recording_train_client(model, sites, plan, shard, cfg, *, start=None, round_idx, **kw):
    torch.save({k: (b.clone(), a.clone()) for k, (b, a) in (start or {}).items()},
               os.path.join(OUT, f"start_r{round_idx}_c{plan.client}.pt"))
    return _train_client(model, sites, plan, shard, cfg, start=start, round_idx=round_idx, **kw)


lora_module.train_client = _recording_train_client

if __name__ == "__main__":
    raise SystemExit(main())
