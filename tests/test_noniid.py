"""Non-iid splits (issue 27): Dirichlet shards dealt so that the slowest servers hold the rarest keys, and each
server's own-data eval loss (clients/eval_loss_own), checked against a recomputation by hand."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fedpipe_dist.config import ConfigError, UserInputError
from fedpipe_dist.data import partition
from fedpipe_dist.data.partition import rarity
from fedpipe_dist.job import load_job
from fedpipe_dist.metrics.perplexity import reweighted_losses
from tests._util import run_small

KEYS = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5  # d is the rarest key


def test_dirichlet_covers_every_example_once():
    for alpha in (0.1, 0.5, 5.0):
        shards = partition(KEYS, 4, scheme="dirichlet", alpha=alpha, seed=3)
        assert sorted(np.concatenate(shards).tolist()) == list(range(len(KEYS)))
        assert all(len(s) for s in shards)


def test_rare_to_slow_deals_the_same_shards_rarest_to_the_slowest():
    freq = Counter(KEYS)
    for seed in range(5):
        plain = partition(KEYS, 4, scheme="dirichlet", alpha=0.3, seed=seed)
        speeds = [1.0, 1 / 3, 1 / 1.5, 1 / 2]  # server 1 is the slowest, server 0 the fastest
        dealt = partition(KEYS, 4, scheme="dirichlet", alpha=0.3, seed=seed, speeds=speeds)
        assert sorted(map(tuple, dealt)) == sorted(map(tuple, plain))  # the same shards, dealt again
        r = [rarity(s, KEYS, freq) for s in dealt]
        by_speed = sorted(range(4), key=lambda c: speeds[c])  # slowest first
        assert [r[c] for c in by_speed] == sorted(r)  # the slower, the rarer


def test_small_alpha_redraws_until_no_server_is_empty_and_says_when_it_cannot():
    few = ["x"] * 40 + ["y"] * 40  # 2 keys over 4 servers at alpha 0.05: the first draws leave servers empty
    shards = partition(few, 4, scheme="dirichlet", alpha=0.05, seed=0)
    assert all(len(s) for s in shards) and sum(map(len, shards)) == 80
    with pytest.raises(UserInputError, match="raise data.dirichlet_alpha"):
        partition(["x"] * 8, 4, scheme="dirichlet", alpha=0.001, seed=0)  # one key, alpha ~0: never four parts


def test_rare_to_slow_needs_a_dirichlet_split():
    with pytest.raises(ConfigError, match="data.partition=dirichlet"):
        load_job("jobs/quickstart.yaml", ["data.rare_to_slow=true"])


def test_scored_share_by_hand():
    from fedpipe_dist.metrics.perplexity import scored_share

    g = np.array([[10.0, 5.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
    assert scored_share(g, np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])).tolist() == [0.75, 0.0]


def test_reweighted_losses_by_hand():
    # groups: loss sums, tokens, examples
    g = np.array([[10.0, 5.0, 1.0], [30.0, 10.0, 2.0], [0.0, 0.0, 0.0]])
    mix = np.array([[1.0, 0.0, 0.0],  # only group 0: its loss per token
                    [1 / 3, 2 / 3, 0.0],  # the scored share itself: the plain mean
                    [0.5, 0.0, 0.5],  # group 2 was not scored: renormalized over group 0
                    [0.0, 0.0, 1.0]])  # none of its groups scored
    out = reweighted_losses(g, mix)
    assert out[0] == pytest.approx(2.0)
    assert out[1] == pytest.approx(40.0 / 15.0)
    assert out[2] == pytest.approx(2.0)
    assert np.isnan(out[3])
    # a mix of 3 parts group 0 to 1 part group 1: weights 0.75 / (1/3) and 0.25 / (2/3) on the examples
    w0, w1 = 0.75 * 3, 0.25 * 1.5
    want = (w0 * 10 + w1 * 30) / (w0 * 5 + w1 * 10)
    assert reweighted_losses(g, np.array([[0.75, 0.25, 0]]))[0] == pytest.approx(want)


def test_own_data_losses_equal_a_recomputation_on_the_base_model(tmp_path):
    """Round 0 (the untrained base): each server's recorded own-data loss is the eval sample's per-example
    losses reweighted by hand to the server's key shares."""
    from fedpipe_dist.data import format_example, load_eval_pairs, load_train_pairs, partition_key, tokenize_pairs
    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.metrics.perplexity import example_losses
    from fedpipe_dist.models import load_model, load_tokenizer

    extra = ["data.partition=dirichlet", "data.dirichlet_alpha=0.3", "data.rare_to_slow=true",
             "clients.slowdown=[1,2,3,1.5]", "rounds=1", "train.local_steps=1"]
    cfg, r = run_small(tmp_path, "niid", *extra)
    own = r.clients["eval_loss_own"]
    assert own.shape == (2, 4) and np.isfinite(own).all()
    assert len(set(np.round(own[0], 6))) == 4  # four different mixes, four different losses

    pairs = load_train_pairs(cfg.data, cfg.seed)
    keys = [partition_key(s) for s, _ in pairs]
    shards = partition(keys, 4, scheme="dirichlet", alpha=0.3, seed=cfg.seed, speeds=[1, 1 / 2, 1 / 3, 1 / 1.5])
    ev = load_eval_pairs(cfg.data, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(ev))[: cfg.eval.max_samples]
    tok = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, tokenizer=tok).eval()
    data = tokenize_pairs(tok, [format_example(*ev[i]) for i in order], cfg.model.max_length)
    with torch.no_grad():
        loss, n = example_losses(model, collate(data, list(range(len(data))), tok.pad_token_id))
    ev_keys = [partition_key(ev[i][0]) for i in order]
    q = Counter(ev_keys)
    coverage = r.clients["eval_own_coverage"]
    for c, shard in enumerate(shards):
        p = Counter(keys[i] for i in shard)
        w = np.array([p[k] / len(shard) / (q[k] / len(order)) for k in ev_keys])
        want = float((w * loss.double().numpy()).sum() / (w * n.double().numpy()).sum())
        assert own[0, c] == pytest.approx(want, rel=1e-5), c
        # the share of the server's examples whose key the eval sample holds
        assert coverage[0, c] == pytest.approx(sum(keys[i] in q for i in shard) / len(shard), abs=1e-9), c


def test_a_results_file_written_before_the_column_gains_it_when_reopened(tmp_path):
    import h5py

    from fedpipe_dist.io.hdf5 import Results, ResultsWriter
    from fedpipe_dist.runtime.record import round_row

    path = tmp_path / "results.h5"
    w = ResultsWriter(path, n_clients=3, n_layers=2, attrs={})
    for t in range(2):
        w.append_round(round_row(t, eval={"loss": 1.0, "ppl": 2.7}, n_selected=0), {"batch_size": np.full(3, 4)})
    with h5py.File(path, "a") as f:  # as written by schema 8 before eval_loss_own
        del f["clients"]["eval_loss_own"]
    w = ResultsWriter.reopen(path, n_clients=3, n_layers=2, resumed_from=1)
    w.append_round(round_row(2, eval=None, n_selected=0), {"eval_loss_own": np.array([1.0, 2.0, 3.0])})
    r = Results(path)
    assert np.isnan(r.clients["eval_loss_own"][:2]).all()
    assert r.clients["eval_loss_own"][2].tolist() == [1.0, 2.0, 3.0]
    assert r.clients["batch_size"][:, 0].tolist() == [4, 4, 0]


def test_held_out_own_examples_never_train_and_their_losses_equal_a_recomputation(tmp_path):
    """data.own_eval_samples: each server's shard loses min(k, a quarter of it) examples before anything trains;
    every evaluation scores the global model on them (clients/eval_loss_heldout). Round 0's recorded loss is the
    base model's loss per target token on exactly those examples; the central limit trains on what is left."""
    from fedpipe_dist.data import format_example, load_train_pairs, partition_key, tokenize_pairs
    from fedpipe_dist.data.tokenize import collate
    from fedpipe_dist.metrics.perplexity import example_losses
    from fedpipe_dist.models import load_model, load_tokenizer
    from fedpipe_dist.runtime.setup import _hold_out, set_up

    shards = [np.arange(0, 40), np.arange(40, 46), np.arange(46, 100)]
    train, held = _hold_out(shards, 12, seed=0)
    assert [len(h) for h in held] == [10, 1, 12]  # at most a quarter of a shard
    for s, t, h in zip(shards, train, held):
        assert sorted([*t, *h]) == s.tolist() and not set(t) & set(h)  # disjoint, together the shard
    assert [h.tolist() for h in _hold_out(shards, 12, seed=0)[1]] == [h.tolist() for h in held]  # seeded

    extra = ["data.partition=dirichlet", "data.dirichlet_alpha=0.3", "rounds=1", "train.local_steps=1",
             "data.own_eval_samples=6"]
    cfg, r = run_small(tmp_path, "held", *extra)
    got = r.clients["eval_loss_heldout"]
    assert got.shape == (2, 4) and np.isfinite(got).all() and (got[1] != got[0]).all()  # round 1 moved them

    pairs = load_train_pairs(cfg.data, cfg.seed)
    shards = partition([partition_key(s) for s, _ in pairs], 4, scheme="dirichlet", alpha=0.3, seed=cfg.seed)
    train, held = _hold_out(shards, 6, seed=cfg.seed)
    tok = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model.name_or_path, seed=cfg.seed, tokenizer=tok).eval()
    for c, ix in enumerate(held):
        data = tokenize_pairs(tok, [format_example(*pairs[i]) for i in ix], cfg.model.max_length)
        with torch.no_grad():
            loss, n = example_losses(model, collate(data, list(range(len(data))), tok.pad_token_id))
        assert got[0, c] == pytest.approx(float(loss.double().sum() / n.double().sum()), rel=1e-5), c

    # what trains, federated or central (both draw batches from run.shards), is the rest
    from fedpipe_dist.comm.local import LocalComm
    from fedpipe_dist.runtime.record import Log

    run = set_up(cfg, LocalComm(), Log(False))
    assert run.shard_sizes == [len(t) for t in train] == [len(run.shards[c]) for c in range(4)]
    assert [len(run.own_eval[c]) for c in range(4)] == [min(6, len(s) // 4) for s in shards] == list(map(len, held))


def test_own_eval_samples_must_not_be_negative():
    with pytest.raises(ConfigError, match="data.own_eval_samples"):
        load_job("jobs/quickstart.yaml", ["data.own_eval_samples=-1"])
