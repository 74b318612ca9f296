"""Layer: the baselines' starting point and the centralized limit (issue 26), on the quickstart job (tiny GPT-2,
synthetic E2E): FedAvg-LoRA's servers all start round 1 from one adapter drawn from the job's seed, in one process
and on 2 gloo ranks; `central=true` trains on exactly the samples the federated servers train on. About 40 s.

Run: .venv/bin/python -m pytest tests/test_central.py -q
"""

import subprocess
from collections import Counter

import numpy as np
import pytest
import torch

import fedpipe_dist.runtime.central as central_module
import fedpipe_dist.runtime.client as client_module
from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.config import UserInputError
from fedpipe_dist.job import load_job
from fedpipe_dist.methods import lora as lora_module
from fedpipe_dist.runtime.engine import run_job

from ._util import REPO, SMALL_RUN, load_benchmark, run_small, subprocess_env, torchrun_cmd


def _record_starts(monkeypatch) -> dict:
    """(round, server) -> the factors train_client is given to start from."""
    seen, real = {}, lora_module.train_client

    def recording(model, sites, plan, shard, cfg, *, start=None, round_idx, **kw):
        seen[(round_idx, plan.client)] = {k: (b.clone(), a.clone()) for k, (b, a) in (start or {}).items()}
        return real(model, sites, plan, shard, cfg, start=start, round_idx=round_idx, **kw)

    monkeypatch.setattr(lora_module, "train_client", recording)
    return seen


def _assert_one_start(starts: dict, n: int) -> None:
    """Round 1: every server starts from the same A (B = 0), cut to its rank; A is a real draw, not zeros."""
    first = [starts[(1, c)] for c in range(n)]
    assert first[0], "no start factors: the server drew an adapter of its own"
    for key, (b0, a0) in first[0].items():
        assert torch.count_nonzero(a0) == a0.numel()
        for other in first[1:]:
            b, a = other[key]
            r = min(a.shape[0], a0.shape[0])
            assert torch.equal(a[:r], a0[:r]), key
            assert torch.count_nonzero(b) == 0 and torch.count_nonzero(b0) == 0


@pytest.mark.parametrize("method,extra", [("lora", []), ("hetlora", ["lora.client_ranks=[8,4,4,2]"]),
                                          ("flexlora", ["lora.client_ranks=[8,4,4,2]"]), ("lora_hb", [])])
def test_global_adapter_methods_start_round_1_from_one_adapter(tmp_path, monkeypatch, method, extra):
    starts = _record_starts(monkeypatch)
    run_small(tmp_path, method, f"method={method}", "rounds=2", *extra)
    _assert_one_start(starts, 4)
    # round 2 starts from the global adapter, which the servers' training moved away from the draw
    assert not torch.equal(starts[(2, 0)][next(iter(starts[(2, 0)]))][1], starts[(1, 0)][next(iter(starts[(1, 0)]))][1])


def test_the_shared_start_follows_the_job_seed(tmp_path, monkeypatch):
    starts = _record_starts(monkeypatch)
    run_small(tmp_path, "a", "method=lora", "rounds=1")
    first = dict(starts)
    starts.clear()
    run_small(tmp_path, "b", "method=lora", "rounds=1", "seed=1")
    key = next(iter(first[(1, 0)]))
    assert not torch.equal(first[(1, 0)][key][1], starts[(1, 0)][key][1])  # another seed, another draw


def test_fedavg_lora_on_two_gloo_ranks_starts_every_server_from_one_adapter(tmp_path):
    """Servers 0, 2 live on rank 0 and 1, 3 on rank 1: each rank draws the adapter itself, and they agree."""
    args = ["run", "jobs/quickstart.yaml", *SMALL_RUN, "rounds=1", "method=lora", f"output.dir={tmp_path / 'run'}",
            "--no-progress"]
    cmd = torchrun_cmd(2, *args)
    cmd[cmd.index("fedpipe_dist")] = "tests._start_probe"
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(FEDPIPE_START_PROBE=str(tmp_path)), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    starts = {(1, c): torch.load(tmp_path / f"start_r1_c{c}.pt") for c in range(4)}
    _assert_one_start(starts, 4)


def _record_sequences(monkeypatch, module) -> Counter:
    """Every training example `module`'s collate is asked for, as its token ids (a multiset)."""
    seen, real = Counter(), module.collate

    def recording(ts, idx, pad_id):
        seen.update(tuple(ts.input_ids[i]) for i in np.asarray(idx))
        return real(ts, idx, pad_id)

    monkeypatch.setattr(module, "collate", recording)
    return seen


@pytest.mark.parametrize("method", ["lora", "lora_hb", "ft"])
def test_central_trains_on_exactly_the_union_of_the_servers_samples(tmp_path, monkeypatch, method):
    """The federated run's local batches (lora_hb: batches 8, 5, 4, 2 under the quickstart's slowdowns) and
    central's steps see the same examples, as often."""
    extra = [f"method={method}", "clients.slowdown=[1,1.5,2,3]"]
    fed = _record_sequences(monkeypatch, client_module)
    run_small(tmp_path, "fed", *extra)
    cen = _record_sequences(monkeypatch, central_module)
    _, res = run_small(tmp_path, "central", *extra, "central=true")
    assert sum(fed.values()) > 0 and fed == cen
    assert res.attrs["method"] == "central" and res.attrs["mirrors"] == method
    samples = res.clients["samples"][1:]
    assert samples.sum() == sum(fed.values())
    loss = res.rounds["eval_loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]


def test_a_central_step_is_every_server_s_batch_of_that_step(tmp_path):
    cfg = load_job("jobs/quickstart.yaml", [*SMALL_RUN, "method=lora_hb", "clients.slowdown=[1,1.5,2,3]",
                                            f"output.dir={tmp_path}"])
    from fedpipe_dist.runtime.record import Log
    from fedpipe_dist.runtime.setup import set_up

    run = set_up(cfg, LocalComm(), Log(False))
    steps = central_module.round_steps(run, 1)
    assert len(steps) == cfg.train.local_steps
    # lora_hb's batches at batch_max 4: floor(4 / slowdown)
    assert [[(c, len(ix)) for c, ix in parts] for parts in steps] == [[(0, 4), (1, 2), (2, 2), (3, 1)]] * 3
    batch = central_module.union_batch(run, steps[0])
    assert batch.input_ids.shape[0] == sum(len(ix) for _, ix in steps[0])


def test_central_refuses_more_than_one_rank_and_resume(tmp_path):
    cfg = load_job("jobs/quickstart.yaml", [*SMALL_RUN, "central=true", f"output.dir={tmp_path}"])
    with pytest.raises(UserInputError, match="one process"):
        central_module.check_central(cfg, 2)
    cfg = load_job("jobs/quickstart.yaml", [*SMALL_RUN, "central=true", "resume=true", f"output.dir={tmp_path}"])
    with pytest.raises(UserInputError, match="no checkpoints"):
        run_job(cfg, LocalComm(), show_progress=False)


def test_the_shared_adapter_at_rank_r_is_the_first_r_rows_of_any_larger_one():
    from fedpipe_dist.adapters.lora import shared_initial_adapter
    from fedpipe_dist.adapters.sites import find_sites
    from fedpipe_dist.models import load_model, load_tokenizer

    sites = find_sites(load_model("tiny-llama", seed=0, dtype="float32", tokenizer=load_tokenizer("tiny-llama")))
    big, small = shared_initial_adapter(sites, 16, 0), shared_initial_adapter(sites, 4, 0)
    for key, (b, a) in small.items():
        assert torch.equal(big[key][1][:4], a) and torch.count_nonzero(b) == 0
    assert not torch.equal(small[sites[0].key][1], small[sites[1].key][1])  # each site its own draw


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_method_lora_is_fedavg_of_peft_lora_as_the_field_writes_it(tmp_path, schedule):
    """benchmarks/peft_fedavg.py (peft + OpenFedLLM's loop, none of the engine's LoRA) and method=lora, on a tiny
    Llama with the same samples and initial A: the same eval loss every round, with a constant lr and with
    OpenFedLLM's cosine across rounds (written on its own there)."""
    pytest.importorskip("peft", reason="peft is not installed")
    ref = load_benchmark("peft_fedavg")
    extra = ["model.name_or_path=tiny-llama", "lora.rank=4", "method=lora", f"train.lr_schedule={schedule}"]
    want = ref.peft_fedavg(load_job("jobs/quickstart.yaml", [*SMALL_RUN, *extra, f"output.dir={tmp_path / 'ref'}"]))
    _, res = run_small(tmp_path, "engine", *extra)
    np.testing.assert_allclose(res.rounds["eval_loss"], want, rtol=1e-5)
    assert want[-1] < want[0] - 0.5  # it trained


def test_the_cosine_schedule_is_openfedllm_s_across_rounds():
    """OpenFedLLM's utils.cosine_learning_rate(round, num_rounds, lr, 1e-6) at its 0-based round."""
    lrs = [client_module.round_lr(2e-3, "cosine", 1e-6, t, 4) for t in range(1, 5)]
    np.testing.assert_allclose(lrs, [2e-3, 1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + np.cos(np.pi / 4)),
                                     1e-6 + 0.5 * (2e-3 - 1e-6), 1e-6 + 0.5 * (2e-3 - 1e-6) * (1 - np.cos(np.pi / 4))])
    assert client_module.round_lr(2e-3, "constant", 1e-6, 3, 4) == 2e-3


def test_servers_and_their_central_limit_train_at_each_round_s_scheduled_lr(tmp_path, monkeypatch):
    """train.lr_schedule=cosine: every server's AdamW in round t starts at round t's lr, and the centralized
    limit steps at the same lr in that round."""
    made, real = [], torch.optim.AdamW

    def recording(params, lr, **kw):
        made.append(lr)
        return real(params, lr=lr, **kw)

    monkeypatch.setattr(client_module.torch.optim, "AdamW", recording)
    cfg, _ = run_small(tmp_path, "fed", "method=lora", "train.lr_schedule=cosine")
    want = [client_module.round_lr(cfg.train.lr, "cosine", cfg.train.lr_min, t, cfg.rounds)
            for t in range(1, cfg.rounds + 1)]
    assert made == [lr for lr in want for _ in range(cfg.clients.n)] and want[0] > want[1] > want[2]

    stepped, step = [], central_module._Trainer.step
    monkeypatch.setattr(central_module._Trainer, "step",
                        lambda self, batch, t, k: stepped.append((t, self.opt.param_groups[0]["lr"]))
                        or step(self, batch, t, k))
    run_small(tmp_path, "central", "method=lora", "train.lr_schedule=cosine", "central=true")
    assert stepped == [(t, want[t - 1]) for t in range(1, cfg.rounds + 1) for _ in range(cfg.train.local_steps)]
