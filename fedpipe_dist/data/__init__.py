"""Datasets as (prompt, target) text pairs, their split over clients, and tokenization.

Every dataset here is a list of (source, reference) string pairs; `format_example` turns one into the
prompt the model conditions on and the target it is trained to produce (the loss covers the target only).
"""

from __future__ import annotations

import functools

from ..config import DataConfig
from ..errors import UserInputError
from . import alpaca
from .e2e import load_e2e_hub, read_e2e_csv
from .e2e import partition_key as e2e_partition_key
from .partition import partition
from .synthetic import synthetic_e2e
from .tokenize import Batch, TokenizedSet, collate, tokenize_pairs

__all__ = ["Batch", "TokenizedSet", "collate", "tokenize_pairs", "partition", "partition_key",
           "load_train_pairs", "load_eval_pairs", "format_example"]

SEPARATOR = " =>"


def format_example(source: str, reference: str) -> tuple[str, str]:
    """(prompt, target). E2E: 'name[..], eatType[..] =>' and ' The text.'; Alpaca pairs come already
    templated (the source ends in '### Response:\n'). EOS is appended at tokenization."""
    if source.endswith("### Response:\n"):
        return source, reference
    return source + SEPARATOR, " " + reference


def partition_key(source: str) -> str:
    """The label a Dirichlet split draws over: E2E's food type, or Alpaca's task kind."""
    if source.endswith("### Response:\n"):
        return alpaca.partition_key(source)
    return e2e_partition_key(source)


@functools.lru_cache(maxsize=2)  # train and eval pairs come from one read of the file
def _alpaca_split(train_path: str | None, eval_path: str | None, seed: int) -> tuple[list, list]:
    """Alpaca has one split: a seeded 2% (at least one record) is held out for eval when no eval_path."""
    import numpy as np

    pairs = (alpaca.load_alpaca_hub(alpaca.hub_name(train_path), "data.train_path") if alpaca.is_hub_name(train_path)
             else alpaca.read_alpaca_file(train_path, "data.train_path"))
    if eval_path:
        return pairs, alpaca.read_alpaca_file(eval_path, "data.eval_path")
    if len(pairs) < 2:
        raise UserInputError("data.train_path: an Alpaca file needs at least 2 records to hold one out for eval; "
                             "add records or set data.eval_path")
    order = np.random.default_rng([seed, 3]).permutation(len(pairs))
    n_eval = max(1, len(pairs) // 50)
    held = set(order[:n_eval].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def load_train_pairs(d: DataConfig, seed: int) -> list[tuple[str, str]]:
    """The training rows of the job's `data` section (`seed`: the job's, for the synthetic set and Alpaca's split)."""
    if d.name == "alpaca":
        return _alpaca_split(d.train_path, d.eval_path, seed)[0]
    if d.name == "synthetic-e2e" and d.train_path is None:
        return synthetic_e2e(d.synthetic_train_size, seed=seed)
    if d.train_path is not None:
        return read_e2e_csv(d.train_path, "data.train_path")
    return load_e2e_hub("train", "data.train_path")


def load_eval_pairs(d: DataConfig, seed: int) -> list[tuple[str, str]]:
    """The eval rows of the job's `data` section."""
    if d.name == "alpaca":
        return _alpaca_split(d.train_path, d.eval_path, seed)[1]
    if d.name == "synthetic-e2e" and d.eval_path is None:
        # A different seed stream than training, so eval examples are held out.
        return synthetic_e2e(d.synthetic_eval_size, seed=10_000 + seed)
    if d.eval_path is not None:
        return read_e2e_csv(d.eval_path, "data.eval_path")
    return load_e2e_hub("validation", "data.eval_path")
