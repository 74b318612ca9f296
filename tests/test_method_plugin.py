"""Layer: the method interface (fedpipe_dist/methods/base.py). A method written here, in the test file alone,
registers itself and runs through the real round engine on 2 gloo ranks (spawned processes) and on one process.

FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in privacy-preserving federated learning"): A stays frozen at its
random initialization and only B trains; here with FLoRA's exact stacking (each server's fresh random A
differs, so the products are summed, not the B's averaged) merged into the base every round.

Run: .venv/bin/python -m pytest tests/test_method_plugin.py -q      (about 30 s)
"""

import os

import numpy as np
import torch
import torch.multiprocessing as mp

from fedpipe_dist.methods import REGISTRY, LoRAMethod, register_method

from ._util import REPO, SMALL_RUN, free_port

NAME = "ffa-lora-test"


class FFALoRA(LoRAMethod):
    name = NAME
    aggregator_name = "flora"  # |D_i| weights, the exact sum of products, merged every round
    hetero_ranks = True  # one rank per server (lora.client_ranks)

    def trainable(self, adapters) -> list:
        for a in adapters.A.values():
            a.requires_grad_(False)  # frozen: no gradient, no optimizer state
        return list(adapters.B.values())


if NAME not in REGISTRY:  # a spawned rank imports this module again: register once per process
    register_method(FFALoRA)

JOB = [*SMALL_RUN, f"method={NAME}", "lora.client_ranks=[8,4,4,2]"]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    os.chdir(REPO)
    from fedpipe_dist.job import load_job
    from fedpipe_dist.runtime.engine import run_job
    from fedpipe_dist.runtime.launch import make_comm

    cfg = load_job("jobs/quickstart.yaml", [*JOB, f"output.dir={out_dir}"])
    comm = make_comm(cfg.comm)
    try:
        run_job(cfg, comm, show_progress=False)
    finally:
        comm.close()


def test_a_method_defined_in_a_test_runs_on_two_gloo_ranks_and_one_process(tmp_path):
    from fedpipe_dist.adapters.sites import KIND_INDEX, find_sites
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.io.hdf5 import Results
    from fedpipe_dist.job import load_job
    from fedpipe_dist.models import load_model
    from fedpipe_dist.runtime.engine import run_job

    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path / "dist")), nprocs=2, join=True,
                       start_method="spawn")
    cfg = load_job(REPO / "jobs/quickstart.yaml", [*JOB, f"output.dir={tmp_path / 'single'}"])
    run_job(cfg, LocalComm(), show_progress=False)
    d, s = Results(tmp_path / "dist" / "results.h5"), Results(tmp_path / "single" / "results.h5")
    assert d.attrs["method"] == NAME and d.attrs["world_size"] == 2 and d.attrs["finished"]
    np.testing.assert_allclose(d.rounds["eval_loss"], s.rounds["eval_loss"], rtol=1e-5)
    assert d.rounds["eval_loss"][-1] < d.rounds["eval_loss"][0] - 0.5  # it learns
    # Only B trained: each server's trainable parameters are out_features x rank per adapted weight.
    sites = find_sites(load_model(cfg.model.name_or_path, seed=cfg.seed))
    out = {(s.layer, KIND_INDEX[s.kind]): s.out_features for s in sites}
    ranks = d.clients["ranks"][1]  # round 1, [client, layer, 4]
    want = [sum(out[(layer, j)] * int(ranks[c, layer, j]) for layer, j in out) for c in range(4)]
    assert list(d.clients["trainable_params"][1]) == want
    assert (ranks[:, 0, 0] == [8, 4, 4, 2]).all()
