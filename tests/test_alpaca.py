"""Layer: Alpaca instruction data end to end: Stanford Alpaca's templates, loss on the response only, and
one federated round of the tiny Llama on a small Alpaca-format sample the test writes itself. Seconds.
Issue 6, acceptance 4.

Run: .venv/bin/python -m pytest tests/test_alpaca.py -q
"""

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from fedpipe_dist.comm.local import LocalComm
from fedpipe_dist.data import format_example, load_eval_pairs, load_train_pairs, tokenize_pairs
from fedpipe_dist.data.alpaca import PROMPT_INPUT, PROMPT_NO_INPUT
from fedpipe_dist.data.tokenize import IGNORE, collate
from fedpipe_dist.io.hdf5 import Results
from fedpipe_dist.job import load_job
from fedpipe_dist.metrics.perplexity import lm_loss
from fedpipe_dist.models import load_model, load_tokenizer
from fedpipe_dist.runtime.engine import run_job

TASKS = [("Name a colour of the sky.", "", "Blue."), ("Add the numbers.", "2 and 3", "The sum is 5."),
         ("Translate to French.", "cat", "chat"), ("Give an antonym.", "hot", "Cold."),
         ("Write a greeting.", "", "Hello there, friend!"), ("Count to three.", "", "One, two, three.")]


def _write_sample(folder, n=48):
    records = [{"instruction": f"{ins} (#{i})", "input": inp, "output": out}
               for i in range(n) for ins, inp, out in [TASKS[i % len(TASKS)]]]
    train, ev = folder / "alpaca_train.json", folder / "alpaca_eval.jsonl"
    train.write_text(json.dumps(records[:40]), encoding="utf-8")
    ev.write_text("".join(json.dumps(r) + "\n" for r in records[40:]), encoding="utf-8")
    return train, ev


def test_alpaca_templates_with_and_without_input(tmp_path):
    train, ev = _write_sample(tmp_path)
    cfg = load_job("jobs/quickstart.yaml", ["data.name=alpaca", f"data.train_path={train}", f"data.eval_path={ev}"])
    pairs = load_train_pairs(cfg.data, cfg.seed)
    assert len(pairs) == 40 and len(load_eval_pairs(cfg.data, cfg.seed)) == 8
    assert pairs[0] == (PROMPT_NO_INPUT.format(instruction="Name a colour of the sky. (#0)"), "Blue.")
    assert pairs[1] == (PROMPT_INPUT.format(instruction="Add the numbers. (#1)", input="2 and 3"), "The sum is 5.")
    assert format_example(*pairs[1]) == pairs[1]  # the templated prompt is used as is
    assert pairs[1][0].endswith("### Input:\n2 and 3\n\n### Response:\n")


def test_prompt_tokens_carry_no_loss(tmp_path):
    """Labels are the response (+ EOS) only; the loss equals cross-entropy over those positions, and the
    logits that predict prompt tokens get exactly zero gradient."""
    train, ev = _write_sample(tmp_path)
    cfg = load_job("jobs/quickstart.yaml", ["data.name=alpaca", f"data.train_path={train}", f"data.eval_path={ev}"])
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", seed=0, dtype="float32", tokenizer=tok)
    model.requires_grad_(True)  # loaded frozen; the test needs a graph to read gradients from
    data = tokenize_pairs(tok, [format_example(*p) for p in load_train_pairs(cfg.data, cfg.seed)[:4]], 256)
    batch = collate(data, np.arange(4), tok.pad_token_id)
    for row in range(4):
        p = data.prompt_len[row]
        n = len(data.input_ids[row])
        assert (batch.labels[row, :p] == IGNORE).all() and (batch.labels[row, p:n] != IGNORE).all()
        assert batch.labels[row, n - 1] == tok.eos_token_id
    loss = lm_loss(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    by_hand, count = 0.0, 0
    for row in range(4):
        p, n = data.prompt_len[row], len(data.input_ids[row])
        for t in range(p, n):  # position t - 1 predicts response token t
            by_hand = by_hand + F.cross_entropy(logits[row, t - 1], batch.input_ids[row, t], reduction="sum")
            count += 1
    by_hand = by_hand / count
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    all_tokens = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1))
    assert abs(all_tokens.item() - loss.item()) > 1e-3  # counting the prompt would change it
    kept = []  # the logits lm_loss computes, caught at the LM head, to read their gradient

    def catch(module, args, out):
        out.retain_grad()
        kept.append(out)

    h = model.lm_head.register_forward_hook(catch)
    lm_loss(model, batch).backward()
    h.remove()
    grad = kept[0].grad
    for row in range(4):
        p = data.prompt_len[row]
        assert (grad[row, : p - 1] == 0).all()  # positions predicting prompt tokens: no gradient at all
        assert grad[row, p - 1].abs().sum() > 0  # the position predicting the first response token: some


def test_one_round_of_alpaca_on_the_tiny_llama(tmp_path):
    train, ev = _write_sample(tmp_path)
    cfg = load_job("jobs/quickstart.yaml", [
        "data.name=alpaca", f"data.train_path={train}", f"data.eval_path={ev}", "model.name_or_path=tiny-llama",
        "model.max_length=128", "rounds=1", "train.local_steps=4", "train.batch_max=4", "eval.max_samples=null",
        "clients.slowdown=1", f"output.dir={tmp_path / 'run'}"])
    run_job(cfg, LocalComm(), show_progress=False)
    r = Results(tmp_path / "run" / "results.h5")
    assert r.attrs["dataset"] == "alpaca" and r.n_rounds == 1
    assert (r.clients["completed"][1] == 1).all()
    loss0, loss1 = r.rounds["eval_loss"]
    assert loss1 < loss0  # the response loss on the 8 held-out records fell after one round
    assert r.rounds["eval_ppl"][1] == math.exp(loss1)


def test_a_hub_dataset_name_is_tried_on_the_hub_and_fails_clearly_offline(tmp_path):
    """data.train_path=owner/name (no such file) goes to the hub; offline that is one clear message naming
    the dataset and the local-file fix, exit code 2."""
    import subprocess
    import sys

    from fedpipe_dist.data.alpaca import is_hub_name

    from ._util import REPO, subprocess_env

    assert is_hub_name(None) and is_hub_name("yahma/alpaca-cleaned")
    assert not is_hub_name("data/alpaca.json") and not is_hub_name(str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "fedpipe_dist", "run", "jobs/quickstart.yaml", "data.name=alpaca",
                        "data.train_path=nobody-here/no-such-alpaca", f"output.dir={tmp_path / 'run'}"], cwd=REPO,
                       env=subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "'nobody-here/no-such-alpaca'" in p.stderr and "local Alpaca JSON/JSONL" in p.stderr
    assert "Traceback" not in p.stderr
