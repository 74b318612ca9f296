"""Layer: evaluation (metrics/perplexity.py): length-bucketed batches give the same loss as batches in order,
and the standard error recorded beside the eval loss is the ratio estimator's, whether computed on one rank
or summed over ranks' shares (issue 19).

Run: .venv/bin/python -m pytest tests/test_eval.py -q      (seconds)
"""

import math

import numpy as np
import pytest
import torch

from fedpipe_dist.data import format_example, tokenize_pairs
from fedpipe_dist.data.synthetic import synthetic_e2e
from fedpipe_dist.metrics.perplexity import evaluate, example_losses, length_buckets, summarize
from fedpipe_dist.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", seed=3)
    data = tokenize_pairs(tok, [format_example(*p) for p in synthetic_e2e(45, seed=5)], 512)
    return model, tok, data


def test_bucketed_eval_equals_eval_in_order(setup):
    model, tok, data = setup
    lengths = sorted(len(x) for x in data.input_ids)
    assert lengths[0] < lengths[-1] - 20  # the examples really differ in length, so padding differs
    a = evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id, bucket=True)
    b = evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id, bucket=False)
    assert a["tokens"] == b["tokens"]
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"])
    assert abs(a["se"] - b["se"]) <= 1e-6 * b["se"]
    # bucketing pads less: the padded positions computed
    padded = lambda batches: sum(len(ix) * max(len(data.input_ids[i]) for i in ix) for ix in batches)  # noqa: E731
    in_order = [list(range(i, min(i + 8, len(data)))) for i in range(0, len(data), 8)]
    assert padded(length_buckets(data, 8)) < padded(in_order)


def test_the_standard_error_is_the_ratio_estimators_and_adds_up_over_ranks(setup):
    from fedpipe_dist.data.tokenize import TokenizedSet, collate

    model, tok, data = setup
    with torch.inference_mode():
        loss, n = example_losses(model, collate(data, range(len(data)), tok.pad_token_id))
    loss, n = loss.double().numpy(), n.double().numpy()
    k, m = len(loss), loss.sum() / n.sum()
    se = math.sqrt(((loss - m * n) ** 2).sum() / (k * (k - 1))) / n.mean()
    whole = evaluate(model, data, batch_size=8, pad_id=tok.pad_token_id)
    assert abs(whole["loss"] - m) <= 1e-6 * m and abs(whole["se"] - se) <= 1e-6 * se
    assert 0 < se < 0.1 * m
    # three ranks' strided shares, their moments summed, as Run.evaluate does
    shares = [TokenizedSet([data.input_ids[i] for i in range(r, len(data), 3)],
                           [data.prompt_len[i] for i in range(r, len(data), 3)]) for r in range(3)]
    parts = [evaluate(model, s, batch_size=8, pad_id=tok.pad_token_id)["moments"] for s in shares]
    summed = summarize(*np.sum(parts, axis=0))
    assert abs(summed["loss"] - m) <= 1e-6 * m and abs(summed["se"] - se) <= 1e-6 * se
    assert math.isnan(summarize(1.0, 3.0, 1.0, 3.0, 9.0, 1.0)["se"])  # one example: no standard error
