"""Token-level cross-entropy on target tokens, and perplexity over an eval set."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE, Batch, TokenizedSet, collate


def _token_losses(model, batch: Batch, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over labelled (target) positions only, and the shifted labels."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Position t predicts token t+1: drop the last logit and the first label.
    logits = logits[:, :-1, :].float()
    labels = batch.labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction), labels


def lm_loss(model, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labelled (target) positions only."""
    return _token_losses(model, batch, reduction)[0]


def example_losses(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed cross-entropy of its target tokens, and how many there are."""
    token_loss, labels = _token_losses(model, batch, "none")
    return token_loss.view(labels.shape).sum(dim=1), (labels != IGNORE).sum(dim=1)


def length_buckets(data: TokenizedSet, batch_size: int) -> list[list[int]]:
    """Batches of examples of similar length (sorted by length, stable): padding to each batch's longest
    member then costs little, unlike batches drawn in a random order."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def evaluate(model, data: TokenizedSet, *, batch_size: int, pad_id: int, device="cpu", bucket: bool = True,
             groups: np.ndarray | None = None, n_groups: int = 0) -> dict:
    """Mean loss per target token over the whole set, its perplexity, and the moments its standard error
    needs (summarize). `bucket`: batches of similar length (the same loss, less padding computed).
    `groups` (a group id in [0, n_groups) per example, -1 for none) adds "group_sums": per group, the summed
    loss, target tokens and examples ([n_groups, 3], float64), for reweighted_losses."""
    was_training = model.training
    model.eval()
    batches = length_buckets(data, batch_size) if bucket else \
        [list(range(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]
    sums = torch.zeros(6, dtype=torch.float64)  # loss, tokens, loss^2, loss*tokens, tokens^2, examples
    by_group = np.zeros((n_groups, 3))
    for idx in batches:
        batch = collate(data, idx, pad_id).to(device)
        loss, n = (t.double().cpu() for t in example_losses(model, batch))
        sums += torch.stack([loss.sum(), n.sum(), (loss * loss).sum(), (loss * n).sum(), (n * n).sum(),
                             torch.tensor(float(len(idx)), dtype=torch.float64)])
        if groups is not None:
            g = groups[idx]
            kept = g >= 0
            np.add.at(by_group, g[kept], np.stack([loss.numpy(), n.numpy(), np.ones(len(idx))], axis=1)[kept])
    model.train(was_training)
    out = summarize(*sums.tolist())
    if groups is not None:
        out["group_sums"] = by_group
    return out


def reweighted_losses(group_sums: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Per target distribution (a row of `mix`: its share of each group), the loss per target token it would
    see, estimated on the scored examples by importance weights: an example of group k counts mix[k] / q[k],
    q[k] being group k's share of the scored examples, so the estimate is
    sum_k w_k loss_k / sum_k w_k tokens_k. Groups it holds that were not scored are left out (the weights are
    renormalized over the rest); NaN when none of its groups was scored."""
    loss, tokens, examples = group_sums[:, 0], group_sums[:, 1], group_sums[:, 2]
    q = examples / max(examples.sum(), 1.0)
    w = np.divide(mix, q[None, :], out=np.zeros_like(mix, dtype=float), where=q[None, :] > 0)
    num, den = w @ loss, w @ tokens
    return np.divide(num, den, out=np.full(len(mix), np.nan), where=den > 0)


def scored_share(group_sums: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Per target distribution, the share of it whose groups were scored: what reweighted_losses' estimate
    covers (E2E's dev set holds 3 of the 8 food types, so a server of other food types is barely covered)."""
    return mix @ (group_sums[:, 2] > 0).astype(float)


def summarize(loss_sum: float, tokens: float, loss_sq: float = 0.0, loss_tokens: float = 0.0,
              tokens_sq: float = 0.0, examples: float = 0.0) -> dict:
    """Mean loss per target token, perplexity, and the standard error of that mean, from sums that add up
    over ranks. The mean is a ratio of per-example sums (loss_i / tokens_i over the sampled examples), so
    its standard error is the ratio estimator's: sqrt(sum_i (loss_i - m tokens_i)^2 / (k (k - 1))) / mean
    tokens, with m the mean and k the examples (NaN for fewer than 2 examples)."""
    loss = loss_sum / max(tokens, 1)
    k = examples
    spread = loss_sq - 2 * loss * loss_tokens + loss * loss * tokens_sq
    se = math.sqrt(max(spread, 0.0) / (k * (k - 1))) / (tokens / k) if k >= 2 and tokens > 0 else math.nan
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_sum": loss_sum, "tokens": int(tokens),
            "se": se, "moments": (loss_sum, tokens, loss_sq, loss_tokens, tokens_sq, examples)}
