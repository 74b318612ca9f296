"""Issue 27: FedPipe with lora.carry=adapter, one global adapter kept across rounds while the aggregate stays
the exact weighted average of the servers' models (algorithm/aggregation/fedpipe.kept_adapter_step).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_carry.py -q      (about 2 minutes on 2 cores)
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedpipe_dist.algorithm.aggregation import ClientUpdate
from fedpipe_dist.algorithm.aggregation.base import to_dense
from fedpipe_dist.algorithm.aggregation.fedpipe import aggregate_factored, kept_adapter_step, split_stack
from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, SMALL_RUN, run_small, subprocess_env, torchrun_cmd

OUT, IN, TOP = 12, 10, 6


def _global(gen):
    """A global adapter at the top rank whose B is not zero (a round after the first)."""
    return {"k": (torch.randn(OUT, TOP, generator=gen), torch.randn(TOP, IN, generator=gen)),
            "j": (torch.randn(OUT, TOP, generator=gen), torch.randn(TOP, IN, generator=gen))}


def _trained(gen, ranks):
    return [{k: (torch.randn(OUT, r, generator=gen), torch.randn(r, IN, generator=gen)) for k, r in rk.items()}
            for rk in ranks]


def _model(bg, ag, b, a):
    """A server's whole adapter product: its trained head and the global tail it left untouched."""
    r = b.shape[1]
    return torch.cat([b, bg[:, r:]], 1) @ torch.cat([a, ag[r:]], 0)


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.5, 1.0, 0.25]])  # sums to one; FedNova-like scale
def test_new_adapter_plus_residual_is_the_exact_average_of_the_servers_models(weights):
    gen = torch.Generator().manual_seed(0)
    g = _global(gen)
    ranks = [{"k": 2, "j": 6}, {"k": 4}, {"k": 6, "j": 3}]  # server 1 has no adapter on j
    ups = _trained(gen, ranks)
    new, residual = kept_adapter_step(g, ups, weights)
    for key in ("k", "j"):
        bg, ag = g[key]
        want = bg @ ag + sum(w * (_model(bg, ag, *u[key]) - bg @ ag) for w, u in zip(weights, ups) if key in u)
        got = new[key][0] @ new[key][1] + to_dense(residual[key])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert new[key][0].shape == (OUT, TOP) and new[key][1].shape == (TOP, IN)
    # weights summing to one: the new adapter is FedAvg of the servers' whole factors (head trained, tail kept)
    if abs(sum(weights) - 1) < 1e-12:
        bg, ag = g["k"]
        want_b = sum(w * torch.cat([u["k"][0], bg[:, u["k"][0].shape[1]:]], 1) for w, u in zip(weights, ups))
        torch.testing.assert_close(new["k"][0], want_b)


def test_rows_no_server_trained_stay_and_one_server_is_its_own_average():
    gen = torch.Generator().manual_seed(1)
    g = _global(gen)
    ups = _trained(gen, [{"k": 3}])
    new, residual = kept_adapter_step(g, ups, [1.0])
    torch.testing.assert_close(new["k"][0][:, :3], ups[0]["k"][0])
    torch.testing.assert_close(new["k"][0][:, 3:], g["k"][0][:, 3:])  # the tail nobody trained
    torch.testing.assert_close(new["k"][1][3:], g["k"][1][3:])
    assert new["j"] is g["j"] and "j" not in residual  # nobody adapted j: unchanged, nothing to merge
    assert float(to_dense(residual["k"]).abs().max()) < 1e-5  # one server: no cross terms to merge


def test_split_stack_reads_back_each_servers_factors():
    gen = torch.Generator().manual_seed(2)
    ranks = [{"k": 2, "j": 6}, {"k": 4}, {"k": 6, "j": 3}]
    ups = _trained(gen, ranks)
    stack = aggregate_factored([ClientUpdate(i, 1, 1, u) for i, u in enumerate(ups)], [1.0] * 3)
    back = split_stack(stack, ranks)
    for u, v in zip(ups, back):
        assert u.keys() == v.keys()
        for k in u:
            assert torch.equal(u[k][0], v[k][0]) and torch.equal(u[k][1], v[k][1])


# the kept adapter as first built: its averaged factors kept as they are (the tuned default refactors them: orth)
CARRY = ["method=fedpipe", "lora.carry=adapter", "lora.rebalance=none", "clients.tflops=[1,2,3,4]"]


def test_one_server_carrying_its_adapter_trains_as_fedavg_lora_does(tmp_path):
    """With one server the exact average is that server's adapter and nothing merges, so FedPipe with the
    kept adapter and the uniform plan is FedAvg-LoRA: the same start, the same steps, the same eval losses."""
    one = ["clients.n=1", "clients.memory_gb=24", "clients.slowdown=1", "plan.mode=uniform", "lora.rank=4",
           "rounds=3"]
    _, carry = run_small(tmp_path, "carry", *CARRY[:3], *one)
    _, lora = run_small(tmp_path, "lora", "method=lora", *one)
    np.testing.assert_allclose(carry.rounds["eval_loss"], lora.rounds["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(carry.clients["train_loss"], lora.clients["train_loss"], rtol=1e-5)
    _, fresh = run_small(tmp_path, "fresh", "method=fedpipe", "lora.carry=none", *one)
    assert not np.allclose(fresh.rounds["eval_loss"][2:], lora.rounds["eval_loss"][2:], rtol=1e-4)


def _ranks_and_one_process(tmp_path, nproc: int, extra: list[str]) -> tuple[Results, Results]:
    """The same job on `nproc` gloo ranks and in one process: (dist, single) results."""

    def run(cmd):
        p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]

    run(torchrun_cmd(nproc, "run", "jobs/quickstart.yaml", *extra, f"output.dir={tmp_path / 'dist'}", "--no-progress"))
    run([sys.executable, "-m", "fedpipe_dist", "run", "jobs/quickstart.yaml", *extra,
         f"output.dir={tmp_path / 'single'}", "--no-progress"])
    return Results(tmp_path / "dist" / "results.h5"), Results(tmp_path / "single" / "results.h5")


def test_four_gloo_ranks_match_one_process_with_mixed_precisions_and_ranks(tmp_path):
    """Every rank forms the new adapter and the residual itself from the broadcast stack: 4 ranks and 1
    process give the same losses, plans and bytes (planned ranks and bases differ by server)."""
    extra = [*SMALL_RUN, *CARRY, "clients.precision=[fp32,fp16,nf8,nf4]", "plan.variant=paper",
             "plan.granularity=layer", "plan.importance=random"]  # adapters on different weights by server
    d, s = _ranks_and_one_process(tmp_path, 4, extra)
    np.testing.assert_allclose(d.rounds["eval_loss"], s.rounds["eval_loss"], rtol=1e-5)
    for name in ("ranks", "batch_size", "quant_bits", "bytes_up"):
        assert (d.clients[name] == s.clients[name]).all(), name
    assert (d.rounds["bytes_down"] == s.rounds["bytes_down"]).all()
    assert len(set(map(tuple, d.clients["ranks"][1].reshape(4, -1).tolist()))) > 1  # ranks differ by server
    assert d.rounds["eval_loss"][-1] < d.rounds["eval_loss"][0]


@pytest.mark.dist
def test_kept_adapter_and_moments_resume_on_another_number_of_ranks(tmp_path):
    """A 4-rank run with the kept adapter and each server's kept AdamW moments, stopped after round 2 and
    resumed on 2 ranks, ends as the run that never stopped: each server's moments come from the rank that
    hosted it."""
    job = ["run", "jobs/quickstart.yaml", *SMALL_RUN, *CARRY, "train.optimizer_state=kept", "--no-progress",
           "clients.precision=[fp32,fp16,nf8,nf4]"]

    def run(nproc, out, *extra):
        p = subprocess.run(torchrun_cmd(nproc, *job, f"output.dir={out}", *extra), cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]

    run(4, tmp_path / "whole", "rounds=4")
    run(4, tmp_path / "split", "rounds=2")
    run(2, tmp_path / "split", "rounds=4", "resume=true")
    whole, split = Results(tmp_path / "whole" / "results.h5"), Results(tmp_path / "split" / "results.h5")
    assert list(split.attrs["resumed_from"]) == [2]
    np.testing.assert_allclose(split.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(split.clients["train_loss"], whole.clients["train_loss"], rtol=0, atol=1e-6)


def test_the_dense_transport_with_the_kept_adapter_is_refused_naming_both_fixes(tmp_path, capsys):
    from fedpipe_dist.cli import main

    assert main(["run", "jobs/quickstart.yaml", "aggregation.transport=dense", f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "aggregation.transport=factored" in err and "lora.carry=none" in err


def test_kept_moments_for_a_method_without_them_are_refused_naming_the_fix(tmp_path, capsys):
    """fedadapter starts every round with a fresh AdamW: train.optimizer_state=kept would be ignored."""
    from fedpipe_dist.cli import main

    assert main(["run", "jobs/quickstart.yaml", "method=fedadapter", "train.optimizer_state=kept",
                 f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer_state=fresh" in err and "method fedadapter" in err and "'ft'" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("method", ["lora", "ft"])
def test_kept_moments_leave_round_1_alone_and_change_round_2(tmp_path, method):
    """Round 1 has no moments to keep, so it trains as with a fresh AdamW; from round 2 the kept moments damp
    each server's steps, so its train losses differ."""
    _, fresh = run_small(tmp_path, "fresh", f"method={method}", "rounds=2")
    _, kept = run_small(tmp_path, "kept", f"method={method}", "rounds=2", "train.optimizer_state=kept")
    a, b = kept.clients["train_loss"], fresh.clients["train_loss"]  # [row = round 0, 1, 2; server]
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[2] - b[2]).min() > 1e-6


# ---- lora.rebalance=svd: the kept adapter split by its SVD each round ----------------------------------------


def test_svd_rebalance_keeps_the_product_balances_the_factors_and_leaves_an_untrained_tail():
    from fedpipe_dist.algorithm.aggregation.fedpipe import svd_rebalance

    gen = torch.Generator().manual_seed(3)
    (bg, ag), (bj, aj) = _global(gen).values()
    bg[:, 4:] = 0  # columns 4-5: no server has trained them yet
    out = svd_rebalance({"k": (bg, ag), "j": (bj, aj), "z": (torch.zeros(OUT, TOP), ag)})
    for (b, a), (nb, na) in (((bg, ag), out["k"]), ((bj, aj), out["j"])):
        torch.testing.assert_close(nb @ na, b @ a, rtol=0, atol=2e-5)
        head = nb.shape[1] if b[:, 4:].any() else 4
        s = torch.linalg.svdvals(b @ a)[:head]
        torch.testing.assert_close(nb[:, :head].norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-6)  # |B col| = sqrt(s)
        torch.testing.assert_close(na[:head].norm(dim=1), s.sqrt(), rtol=1e-5, atol=1e-6)  # = |A row|, descending
    assert torch.equal(out["k"][1][4:], ag[4:]) and not out["k"][0][:, 4:].any()  # the tail's A kept, B still 0
    assert not out["z"][0].any() and torch.equal(out["z"][1], ag)  # nothing trained: left as it was


def test_orth_rebalance_keeps_the_product_with_orthogonal_rows_of_a_at_a_fresh_norm():
    """lora.rebalance=orth: the same SVD, A = c V^T with c a fresh A row's norm, B = U S / c."""
    from fedpipe_dist.algorithm.aggregation.fedpipe import FRESH_A_ROW_NORM, svd_rebalance

    gen = torch.Generator().manual_seed(4)
    (bg, ag), _ = _global(gen).values()
    bg[:, 4:] = 0
    nb, na = svd_rebalance({"k": (bg, ag)}, FRESH_A_ROW_NORM)["k"]
    torch.testing.assert_close(nb @ na, bg @ ag, rtol=0, atol=2e-5)
    s = torch.linalg.svdvals(bg @ ag)[:4]
    gram = na[:4] @ na[:4].T
    torch.testing.assert_close(gram, torch.eye(4) / 3, rtol=0, atol=1e-5)  # orthogonal rows of norm 1/sqrt(3)
    torch.testing.assert_close(nb[:, :4].norm(dim=0), s * 3 ** 0.5, rtol=1e-5, atol=1e-6)  # B holds the scale
    assert torch.equal(na[4:], ag[4:]) and not nb[:, 4:].any()
    poisoned = bg.clone()
    poisoned[0, 0] = float("nan")  # a NaN update let in (aggregation.sanitize=false): left as it is, no SVD error
    pb, pa = svd_rebalance({"k": (poisoned, ag)}, FRESH_A_ROW_NORM)["k"]
    assert pb is poisoned and pa is ag
    fresh = torch.empty(4096, 64)
    torch.nn.init.kaiming_uniform_(fresh, a=5 ** 0.5, generator=gen)
    assert abs(fresh.norm(dim=1).mean() - FRESH_A_ROW_NORM) < 0.01  # what peft's draw gives a row of A


@pytest.mark.parametrize("row_norm", [None, 3 ** -0.5])
def test_rebalance_signs_are_fixed_by_the_data_not_by_the_lapack(row_norm):
    """Every rank refactors the global adapter on its own; a singular pair's sign is the library's choice, so
    svd_rebalance fixes it (the entry of each A row largest in magnitude is positive): factors that differ only
    by a sign per direction, as another LAPACK or cuSOLVER may return them, refactor to the same factors."""
    from fedpipe_dist.algorithm.aggregation.fedpipe import svd_rebalance

    gen = torch.Generator().manual_seed(5)
    (bg, ag), _ = _global(gen).values()
    nb, na = svd_rebalance({"k": (bg, ag)}, row_norm)["k"]
    top = na.gather(1, na.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    assert (top > 0).all()
    d = torch.tensor([1.0, -1.0] * (TOP // 2))  # the same product, every other direction's pair negated
    fb, fa = svd_rebalance({"k": (bg * d, d[:, None] * ag)}, row_norm)["k"]
    torch.testing.assert_close(fb, nb, rtol=0, atol=1e-5)
    torch.testing.assert_close(fa, na, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rebalance,job", [("svd", CARRY), ("orth", CARRY),
                                           ("orth", ["method=lora_hb", "clients.tflops=[1,2,3,4]"])])
def test_rebalanced_round_is_the_same_model_and_the_next_round_trains_from_other_factors(tmp_path, rebalance, job):
    """Refactoring changes no product, so after round 1 the global model (its eval loss) is the default's; round 2
    trains from other factors of it, so the servers' train losses differ (FedPipe's kept adapter, and FedAvg-LoRA's
    global one)."""
    _, plain = run_small(tmp_path, "plain", *job, "rounds=2")
    _, svd = run_small(tmp_path, "svd", *job, "rounds=2", f"lora.rebalance={rebalance}")
    np.testing.assert_allclose(svd.rounds["eval_loss"][:2], plain.rounds["eval_loss"][:2], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(svd.clients["train_loss"][1], plain.clients["train_loss"][1])
    assert np.abs(svd.clients["train_loss"][2] - plain.clients["train_loss"][2]).min() > 1e-6


def test_rebalance_without_a_kept_adapter_is_refused_naming_the_fix(tmp_path, capsys):
    from fedpipe_dist.cli import main

    assert main(["run", "jobs/quickstart.yaml", "method=fedpipe", "lora.carry=none", "lora.rebalance=svd",
                 f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "lora.rebalance" in err and "lora.carry=adapter" in err and not any(tmp_path.iterdir())
    assert main(["run", "jobs/quickstart.yaml", "method=flexlora", "lora.rebalance=svd", f"output.dir={tmp_path}"]) == 2
    assert "method fedpipe (lora.carry=adapter), lora or lora_hb" in capsys.readouterr().err
    for moving in ("train.optimizer_state=kept", "aggregation.server_opt=fedadam"):  # moments a rotation would scramble
        for method in ("fedpipe", "lora_hb"):
            assert main(["run", "jobs/quickstart.yaml", f"method={method}", "lora.rebalance=orth", moving,
                         f"output.dir={tmp_path}"]) == 2
            err = capsys.readouterr().err
            assert "lora.rebalance" in err and moving in err and not any(tmp_path.iterdir())


def test_the_tuned_default_refactors_fedpipes_kept_adapter_by_orth_where_it_applies():
    """lora.rebalance left unset: orth for FedPipe's kept adapter under plan.variant=tuned (fresh AdamW, no server
    optimizer, more than one local step), none for the paper variant, at one local step, the other carries and
    every other method (the baselines stay as the field runs them); an explicit value wins and a stored config
    loads as it ran."""
    from fedpipe_dist.job import job_from_dict, load_job

    def rebalance(*overrides):
        return load_job("jobs/quickstart.yaml", list(overrides)).lora.rebalance

    assert rebalance() == rebalance("method=fedpipe", "lora.carry=adapter") == "orth"
    assert rebalance("train.local_steps=2") == "orth"
    for unset in (["plan.variant=paper"], ["lora.carry=none"], ["lora.carry=shared_a"], ["train.optimizer_state=kept"],
                  ["aggregation.server_opt=fedadam"], ["method=lora"], ["method=lora_hb"], ["method=flexlora"],
                  ["train.local_steps=1"]):
        assert rebalance(*unset) == "none", unset
    assert rebalance("lora.rebalance=svd") == "svd" and rebalance("method=lora_hb", "lora.rebalance=orth") == "orth"
    cfg = load_job("jobs/quickstart.yaml", [])
    assert job_from_dict(cfg.to_dict()).lora.rebalance == "orth"
    old = cfg.to_dict()
    old["lora"]["rebalance"] = "none"  # a run recorded before orth was the default resumes as it ran
    assert job_from_dict(old).lora.rebalance == "none"


@pytest.mark.parametrize("method", ["lora", "lora_hb", "flexlora", "hetlora", "flora", "ft", "fedadapter"])
def test_carry_set_for_a_method_that_ignores_it_is_refused(method, capsys):
    """lora.carry is FedPipe's: another method starts its rounds by its own rule, so a value other than
    plan.variant's preset (which every job holds once loaded, and a results.h5's config_json keeps) is refused
    rather than silently ignored; the preset, spelled out or left unset, loads."""
    from fedpipe_dist.errors import ConfigError
    from fedpipe_dist.job import job_from_dict, load_job

    for variant, other in (("tuned", "none"), ("paper", "adapter"), ("tuned", "shared_a")):
        with pytest.raises(ConfigError, match="lora.carry") as e:
            load_job("jobs/quickstart.yaml", [f"method={method}", f"plan.variant={variant}", f"lora.carry={other}"])
        assert "method fedpipe" in str(e.value) and f"method {method} " in str(e.value)
    for variant, preset in (("tuned", "adapter"), ("paper", "none")):
        cfg = load_job("jobs/quickstart.yaml", [f"method={method}", f"plan.variant={variant}"])
        assert cfg.lora.carry == preset
        assert job_from_dict(cfg.to_dict()).lora.carry == preset  # a stored run's config loads again
        load_job("jobs/quickstart.yaml", [f"method={method}", f"plan.variant={variant}", f"lora.carry={preset}"])
    load_job("jobs/quickstart.yaml", ["method=fedpipe", "plan.variant=tuned", "lora.carry=none"])  # FedPipe's own


# ---- lora.carry=shared_a: one frozen A for every server; only the B's train and travel --------------------------


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.5, 1.0, 0.25]])
def test_shared_a_global_b_is_the_exact_average_of_the_servers_models(weights):
    from fedpipe_dist.algorithm.aggregation.fedpipe import shared_a_delta

    gen = torch.Generator().manual_seed(1)
    bg, a = torch.randn(OUT, TOP, generator=gen), torch.randn(TOP, IN, generator=gen)
    trained = [torch.randn(OUT, r, generator=gen) for r in (6, 4, 2)]  # each server's B at its rank
    deltas = [shared_a_delta(bg, b) for b in trained]
    assert all(torch.equal(d[:, b.shape[1]:], torch.zeros(OUT, TOP - b.shape[1])) for d, b in zip(deltas, trained))
    b_new = bg + sum(w * d for w, d in zip(weights, deltas))
    # each server's model: its head, the global tail it left untouched, all on the one A
    models = [_model(bg, a, b, a[: b.shape[1]]) for b in trained]
    want = bg @ a + sum(w * (m - bg @ a) for w, m in zip(weights, models))
    torch.testing.assert_close(b_new @ a, want, rtol=1e-5, atol=1e-5)


SHARED = ["method=fedpipe", "lora.carry=shared_a", "clients.tflops=[1,2,3,4]", "plan.variant=paper",
          "plan.granularity=layer", "plan.importance=random"]  # ranks and weights differ by server


def test_shared_a_two_gloo_ranks_match_one_process_and_send_b_only(tmp_path):
    """The B changes are reduced (each rank pre-sums its own servers): 2 ranks and 1 process give the same losses
    and plans; each server sends, and the downlink carries, B's change at the top rank on each weight (fp32)."""
    extra = [*SMALL_RUN, *SHARED]
    d, s = _ranks_and_one_process(tmp_path, 2, extra)
    np.testing.assert_allclose(d.rounds["eval_loss"], s.rounds["eval_loss"], rtol=1e-5)
    for name in ("ranks", "batch_size", "bytes_up"):
        assert (d.clients[name] == s.clients[name]).all(), name
    assert (d.rounds["bytes_down"] == s.rounds["bytes_down"]).all()
    assert d.rounds["eval_loss"][-1] < d.rounds["eval_loss"][0]
    assert len({tuple(r.ravel()) for r in d.clients["ranks"][1]}) > 1  # ranks differ by server
    for t in range(1, d.n_rounds + 1):
        sent = d.clients["bytes_up"][t][d.clients["completed"][t] == 1]
        assert len(set(sent.tolist())) == 1  # every server: B's change at the top rank, on the round's weights
        assert d.rounds["bytes_down"][t] == 4 * sent[0]  # the same layout down, to each of the 4 servers
