"""Layer: launcher detection (runtime/launch.py): the environment of torchrun, srun, Open MPI's mpirun and
MPICH/Intel MPI mapped to rank, world size, local rank. Pure functions, milliseconds.

Run: .venv/bin/python -m pytest tests/test_launch.py -q
"""

import pytest

from fedpipe_dist.config import CommConfig, UserInputError
from fedpipe_dist.runtime.launch import LaunchInfo, detect_launch, make_comm


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, LaunchInfo(5, 16, 1, "torchrun")),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}, LaunchInfo(3, 8, 3, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     LaunchInfo(2, 4, 0, "mpi")),
    ({"PMI_RANK": "7", "PMI_SIZE": "12", "MPI_LOCALRANKID": "3"}, LaunchInfo(7, 12, 3, "mpi")),
    ({}, LaunchInfo(0, 1, 0, "single")),
    # torchrun inside an sbatch allocation: torchrun's own variables win over Slurm's
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, LaunchInfo(1, 2, 0, "torchrun")),
    # ranks per node, where the launcher says
    ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, LaunchInfo(0, 8, 0, "torchrun", 4)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     LaunchInfo(1, 2, 0, "mpi", 2)),
])
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


def test_srun_without_a_rendezvous_address_is_a_clear_error(monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserInputError, match="MASTER_ADDR"):
        make_comm(CommConfig(backend="torch"), LaunchInfo(0, 2, 0, "slurm"))


def test_local_backend_refuses_several_processes():
    with pytest.raises(UserInputError, match="comm.backend=local runs one process"):
        make_comm(CommConfig(backend="local"), LaunchInfo(0, 4, 0, "torchrun"))


def test_more_ranks_than_gpus_on_a_node_is_a_clear_error(monkeypatch):
    """Found on a 1-GPU machine: 4 torchrun ranks all took cuda:0 and NCCL failed at the first collective with
    'invalid usage'. Now the launch stops before any collective and says how to fix it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    with pytest.raises(UserInputError, match="4 ranks on this node share 1 GPU"):
        make_comm(CommConfig(backend="torch"), LaunchInfo(1, 4, 1, "torchrun", 4))
