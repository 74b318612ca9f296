"""Token-level cross-entropy on target tokens, and perplexity over an eval set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE, Batch, TokenizedSet, collate


def lm_loss(model, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labelled (target) positions only."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Position t predicts token t+1: drop the last logit and the first label.
    logits = logits[:, :-1, :].float()
    labels = batch.labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


@torch.no_grad()
def evaluate(model, data: TokenizedSet, *, batch_size: int, pad_id: int, device="cpu") -> dict:
    """Mean loss per target token over the whole set, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data, range(start, min(start + batch_size, len(data))), pad_id).to(device)
        total += lm_loss(model, batch, reduction="sum").item()
        count += int((batch.labels[:, 1:] != IGNORE).sum())
    model.train(was_training)
    return summarize(total, count)


def summarize(loss_sum: float, tokens: int) -> dict:
    """Mean loss per target token and perplexity from a summed loss (e.g. added up over ranks)."""
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "loss_sum": loss_sum, "tokens": tokens}
