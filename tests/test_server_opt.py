"""Issue 27: a server-side optimizer on the kept global adapter (`aggregation.server_opt`,
algorithm/server_opt.py; Reddi et al. 2021 as OpenFedLLM applies it to LoRA factors).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_server_opt.py -q      (about a minute on 2 cores)
"""

import numpy as np
import pytest
import torch

from fedpipe_dist.algorithm.server_opt import ServerOptimizer

from ._util import SMALL_RUN, run_small


def _pair(gen, shape=(5, 3)):
    return {"k": (torch.randn(*shape, generator=gen), torch.randn(shape[1], 4, generator=gen))}


def test_fedadagrad_is_torch_adagrad_on_the_negated_pseudo_gradient():
    """An independent reference: torch.optim.Adagrad with initial_accumulator_value=tau^2 and eps=tau, fed
    -Delta as the gradient, is FedAdagrad's step (v = tau^2 + sum Delta^2; w += eta Delta / (sqrt(v) + tau))."""
    gen = torch.Generator().manual_seed(0)
    opt = ServerOptimizer("fedadagrad", lr=0.05, tau=1e-2)
    start = _pair(gen)
    b = torch.nn.Parameter(start["k"][0].clone())
    a = torch.nn.Parameter(start["k"][1].clone())
    ref = torch.optim.Adagrad([b, a], lr=0.05, initial_accumulator_value=1e-4, eps=1e-2)
    g = start
    for _ in range(3):
        noise = (0.1 * torch.randn(5, 3, generator=gen), 0.1 * torch.randn(3, 4, generator=gen))
        avg = {"k": (g["k"][0] + noise[0], g["k"][1] + noise[1])}
        b.grad, a.grad = -(avg["k"][0] - b.detach()), -(avg["k"][1] - a.detach())
        ref.step()
        g = opt.step(g, avg)
        torch.testing.assert_close(g["k"][0], b.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g["k"][1], a.detach(), rtol=1e-6, atol=1e-7)


def test_fedadam_and_fedyogi_two_rounds_by_hand_on_one_number():
    """Two rounds on a 1x1 adapter, the arithmetic written out: m = Delta first, then b1 m + (1 - b1) Delta;
    v from tau^2 (Adam: b2 v + (1 - b2) Delta^2; Yogi: v - (1 - b2) Delta^2 sign(v - Delta^2))."""
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    for name in ("fedadam", "fedyogi"):
        opt = ServerOptimizer(name, lr=eta, betas=(b1, b2), tau=tau)
        w, m, v = 1.0, None, tau**2
        state = {"k": (torch.tensor([[w]], dtype=torch.float64), torch.tensor([[w]], dtype=torch.float64))}
        for delta in (0.5, -0.2):
            m = delta if m is None else b1 * m + (1 - b1) * delta
            if name == "fedadam":
                v = b2 * v + (1 - b2) * delta**2
            else:
                v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            w = w + eta * m / (np.sqrt(v) + tau)
            avg = {"k": tuple(t + delta for t in state["k"])}
            state = opt.step(state, avg)
            assert state["k"][0].item() == pytest.approx(w, rel=1e-12), name
            assert state["k"][1].item() == pytest.approx(w, rel=1e-12), name


def test_fedavgm_without_momentum_is_the_plain_average_and_untrained_tensors_stay():
    gen = torch.Generator().manual_seed(1)
    opt = ServerOptimizer("fedavgm", betas=(0.0, 0.99))
    start = {**_pair(gen), "untouched": (torch.ones(2, 1), torch.ones(1, 2))}
    avg = _pair(gen)
    out = opt.step(start, avg)
    torch.testing.assert_close(out["k"][0], avg["k"][0])
    torch.testing.assert_close(out["k"][1], avg["k"][1])
    assert out["untouched"][0] is start["untouched"][0]


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer("adam")


@pytest.mark.parametrize("method", [["method=lora"], ["method=fedpipe", "lora.carry=adapter", "lora.rebalance=none"]])
def test_a_run_with_fedavgm_at_b1_0_is_the_run_without_and_fedadam_is_not(tmp_path, method):
    """Wiring: the pseudo-gradient is taken from the adapter every client started from (the shared initial one
    in round 1), so FedAvgM without momentum reproduces the plain average run for run; FedAdam moves
    elsewhere and still learns."""
    _, plain = run_small(tmp_path, "plain", *method)
    _, m0 = run_small(tmp_path, "m0", *method, "aggregation.server_opt=fedavgm", "aggregation.server_beta1=0")
    np.testing.assert_allclose(m0.rounds["eval_loss"], plain.rounds["eval_loss"], rtol=1e-6)
    _, adam = run_small(tmp_path, "adam", *method, "aggregation.server_opt=fedadam", "aggregation.server_lr=1e-2")
    assert not np.allclose(adam.rounds["eval_loss"][1:], plain.rounds["eval_loss"][1:], rtol=1e-4)
    assert adam.rounds["eval_loss"][-1] < adam.rounds["eval_loss"][0]


def test_server_state_resumes_to_the_uninterrupted_run(tmp_path):
    """The moments are in the checkpoint: stopped after round 2 and resumed, FedYogi ends as the run that
    never stopped."""
    opt = ["method=lora_hb", "aggregation.server_opt=fedyogi", "aggregation.server_lr=1e-2"]
    _, whole = run_small(tmp_path, "whole", *opt, "rounds=4")
    run_small(tmp_path, "split", *opt, "rounds=2")
    _, split = run_small(tmp_path, "split", *opt, "rounds=4", "resume=true")
    assert list(split.attrs["resumed_from"]) == [2]
    np.testing.assert_allclose(split.rounds["eval_loss"], whole.rounds["eval_loss"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra", [["method=flora"], ["method=fedpipe", "lora.carry=none"], ["method=ft"]])
def test_a_method_without_a_kept_factor_adapter_is_refused_naming_the_fix(tmp_path, capsys, extra):
    from fedpipe_dist.cli import main

    assert main(["run", "jobs/quickstart.yaml", *extra, "aggregation.server_opt=fedadam",
                 f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "aggregation.server_opt" in err and "server_opt=none" in err


def test_two_gloo_ranks_step_the_same_state_as_one_process(tmp_path):
    """Every rank holds the server optimizer's state and steps it from the same broadcast average: 2 ranks and
    1 process give the same losses (the kept adapter, FedAdam, servers of different speeds and ranks)."""
    from .test_carry import CARRY, _ranks_and_one_process

    extra = [*SMALL_RUN, *CARRY, "aggregation.server_opt=fedadam", "aggregation.server_lr=1e-2"]
    d, s = _ranks_and_one_process(tmp_path, 2, extra)
    np.testing.assert_allclose(d.rounds["eval_loss"], s.rounds["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(d.clients["train_loss"], s.clients["train_loss"], rtol=1e-5)
