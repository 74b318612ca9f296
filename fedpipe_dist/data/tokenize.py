"""Tokenization with the loss on the target only, and padding into batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # label value that cross-entropy skips


@dataclass
class TokenizedSet:
    """Token ids per example and how many leading tokens are prompt (no loss)."""

    input_ids: list[list[int]]
    prompt_len: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, T] right-padded
    attention_mask: torch.Tensor  # [b, T]
    labels: torch.Tensor  # [b, T]; IGNORE on prompt and padding

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> TokenizedSet:
    """Tokenize (prompt, target) pairs: prompt with the tokenizer's specials (BOS), target + EOS.

    Truncation keeps the prompt whole when it can and cuts the target; an example whose prompt alone
    fills max_length keeps one target token so that it still carries loss.
    """
    if not pairs:  # a rank's share of an eval sample smaller than the world size (fast tokenizers fail on [])
        return TokenizedSet([], [])
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids, plen = [], []
    for p, t in zip(prompts, targets):
        t = list(t) + ([eos] if eos is not None else [])
        p = list(p)[: max_length - 1]
        t = t[: max_length - len(p)]
        ids.append(p + t)
        plen.append(len(p))
    return TokenizedSet(ids, plen)


def collate(ts: TokenizedSet, idx, pad_id: int) -> Batch:
    idx = np.asarray(idx)
    seqs = [ts.input_ids[i] for i in idx]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, (i, s) in enumerate(zip(idx, seqs)):
        n = len(s)
        input_ids[row, :n] = torch.tensor(s)
        mask[row, :n] = 1
        labels[row, ts.prompt_len[i]:n] = input_ids[row, ts.prompt_len[i]:n]
    return Batch(input_ids, mask, labels)
