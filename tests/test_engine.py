"""Layer: runtime/server round engine with the in-process communicator (world size 1), seconds each.

Run: .venv/bin/python -m pytest tests/test_engine.py -q
"""

import math

import h5py
import numpy as np
import pytest
import torch

from fedpipe_dist.adapters.sites import add_to_base, find_sites
from fedpipe_dist.algorithm.planner import uniform_plan
from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.data import (
    format_example,
    load_eval_pairs,
    load_train_pairs,
    partition,
    partition_key,
    tokenize_pairs,
)
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.io.schema import (
    CLIENT_FIELDS,
    CLIENT_LAYER_FIELDS,
    PROFILE_FIELDS,
    ROOT_ATTRS,
    ROUND_FIELDS,
)
from fedpipe_dist.job import load_job
from fedpipe_dist.metrics.perplexity import evaluate
from fedpipe_dist.models import load_model, load_tokenizer
from fedpipe_dist.runtime.client import LocalTraining, train_client
from fedpipe_dist.runtime.engine import run_job

SMALL = ["rounds=2", "train.local_steps=3", "train.batch_max=4", "data.synthetic_train_size=96",
         "data.synthetic_eval_size=24", "model.max_length=96", "eval.max_samples=24", "lora.rank=4"]


def _job(tmp_path, *extra):
    return load_job("jobs/quickstart.yaml", [*SMALL, f"output.dir={tmp_path}", *extra])


def test_run_writes_schema_and_loadable_final(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _job(tmp_path / "run")
    summary = run_job(cfg, LocalComm(), show_progress=False)
    with h5py.File(summary.results_path, "r") as f:
        for a in ROOT_ATTRS:
            assert a in f.attrs, a
        assert bool(f.attrs["finished"])
        for name in ROUND_FIELDS:
            assert f["rounds"][name].shape == (3,), name  # row 0 (base) + 2 rounds
        for name in CLIENT_FIELDS:
            assert f["clients"][name].shape == (3, 4), name
        for name in CLIENT_LAYER_FIELDS:
            assert f["clients"][name].shape == (3, 4, 2, 4), name
        for name in PROFILE_FIELDS:
            assert f["profile"][name].shape == (4,), name
        assert list(f["rounds"]["round"][()]) == [0, 1, 2]
    r = Results(summary.results_path)
    ranks = r.clients["ranks"][1:]
    assert (r.clients["completed"][1:] == 1).all() and (ranks.sum(axis=(2, 3)) > 0).all()
    # bytes_up per client = fp32 factors: sum of r x (in + out) over adapted sites, all 64 x 64 here.
    assert (r.clients["bytes_up"][1:] == 4 * (64 + 64) * ranks.sum(axis=(2, 3))).all()
    assert (r.rounds["bytes_up"][1:] == r.clients["bytes_up"][1:].sum(axis=1)).all()
    assert list(r.profile["slowdown"]) == [1, 1.5, 2, 3]

    # final/ is a plain HF folder whose eval loss equals the last recorded one.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    ev = load_eval_pairs(cfg.data, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))[: cfg.eval.max_samples]
    data = tokenize_pairs(tok, [format_example(*ev[i]) for i in order], cfg.model.max_length)
    got = evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id)["loss"]
    assert abs(got - r.last_eval_loss()) < 1e-3
    assert r.last_eval_loss() < r.rounds["eval_loss"][0]


def _final_params(path):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


@pytest.mark.parametrize("rank", [4, 16])  # 3 x 4 < 32: stacked downlink; 3 x 16 > 32: dense downlink
def test_factored_and_dense_transport_give_same_model(tmp_path, rank):
    p = {}
    for transport in ("factored", "dense"):
        cfg = _job(tmp_path / transport, f"aggregation.transport={transport}", "rounds=1", f"lora.rank={rank}",
                   "plan.mode=uniform", "lora.carry=none",  # (the kept adapter needs the factored stack)
                   "clients.n=3", "clients.memory_gb=24", "clients.slowdown=1")
        run_job(cfg, LocalComm(), show_progress=False)
        p[transport] = _final_params(tmp_path / transport / "final")
    base = load_model("tiny-gpt2", seed=0)
    for name, param in base.named_parameters():
        d_f = p["factored"][name].detach() - param.detach()
        d_d = p["dense"][name].detach() - param.detach()
        if d_f.norm() == 0:
            assert d_d.norm() == 0, name
            continue
        assert (d_f - d_d).norm() / d_f.norm() < 1e-5, name


def test_one_client_full_participation_equals_its_own_merge(tmp_path):
    cfg = _job(tmp_path / "one", "clients.n=1", "clients.memory_gb=24", "clients.slowdown=1", "rounds=1",
               "plan.mode=uniform", "lora.carry=none")  # the paper's fresh adapters: the client draws its own A
    run_job(cfg, LocalComm(), show_progress=False)
    merged = _final_params(tmp_path / "one" / "final")

    # The same client trained by hand, then its own (alpha/r) B A folded into the base.
    tok = load_tokenizer("tiny-gpt2")
    model = load_model("tiny-gpt2", seed=cfg.seed, tokenizer=tok)
    sites = find_sites(model)
    pairs = load_train_pairs(cfg.data, cfg.seed)
    shard = partition([partition_key(s) for s, _ in pairs], 1, scheme="iid", alpha=1.0, seed=cfg.seed)[0]
    data = tokenize_pairs(tok, [format_example(*pairs[i]) for i in shard], cfg.model.max_length)
    plan = uniform_plan(sites, 1, targets=cfg.lora.targets, rank=cfg.lora.rank, batch_size=cfg.train.batch_max)[0]
    update, _ = train_client(model, sites, plan, data, LocalTraining.of(cfg), round_idx=1, pad_id=tok.pad_token_id,
                             device=torch.device("cpu"))
    by_key = {s.key: s for s in sites}
    for key, (b, a) in update.factors.items():
        add_to_base(model, by_key[key], b @ a)
    changed = 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(merged[name], param, rtol=1e-6, atol=1e-7)
        changed += int(not torch.equal(param, load_model("tiny-gpt2", seed=cfg.seed).get_parameter(name)))
    assert changed > 0


def test_refuses_to_overwrite_results(tmp_path):
    from fedpipe_dist.config import UserInputError

    cfg = _job(tmp_path / "x", "rounds=1")
    run_job(cfg, LocalComm(), show_progress=False)
    before = (tmp_path / "x" / "results.h5").read_bytes()
    with pytest.raises(UserInputError, match="output.overwrite"):
        run_job(cfg, LocalComm(), show_progress=False)
    assert (tmp_path / "x" / "results.h5").read_bytes() == before
    assert math.isfinite(Results(tmp_path / "x" / "results.h5").last_eval_loss())


@pytest.mark.shared_data
def test_stories260k_on_real_e2e_subset(tmp_path):
    """The pretrained Llama-architecture stories260K on real E2E rows: one round lowers the dev loss."""
    from ._util import shared_data

    root = shared_data()
    if root is None:
        pytest.skip("needs ../shared/data (or FEDPIPE_SHARED_DATA) with models/stories260K-hf and e2e/")
    cfg = load_job("jobs/e2e_stories260k.yaml", [
        f"model.name_or_path={root / 'models' / 'stories260K-hf'}", f"data.train_path={root / 'e2e' / 'trainset.csv'}",
        f"data.eval_path={root / 'e2e' / 'devset.csv'}", "data.max_train_samples=400", "eval.max_samples=64",
        "rounds=1", "train.local_steps=5", f"output.dir={tmp_path}"])
    summary = run_job(cfg, LocalComm(), show_progress=False)
    r = Results(summary.results_path)
    assert r.attrs["dataset"] == "e2e" and r.n_rounds == 1
    assert r.rounds["eval_loss"][1] < r.rounds["eval_loss"][0]
    ranks = r.clients["ranks"][1]  # [client, layer, 4]
    assert set(np.unique(ranks)) <= {0, 16, 12, 8, 4, 2} and (ranks.sum(axis=2) > 0).all()
    # The FLOPs budget is uniform LoRA's (rank 8 on q, k, v, o): at most 32 rank units per layer.
    assert (ranks.sum(axis=2) <= 4 * 8).all()
