"""Datasets as (prompt, target) text pairs, their split over clients, and tokenization.

Every dataset here is a list of (source, reference) string pairs; `format_example` turns one into the
prompt the model conditions on and the target it is trained to produce (the loss covers the target only).
"""

from __future__ import annotations

from ..config import JobConfig
from .e2e import load_e2e_hub, partition_key, read_e2e_csv
from .partition import partition
from .synthetic import synthetic_e2e
from .tokenize import Batch, TokenizedSet, collate, tokenize_pairs

__all__ = ["Batch", "TokenizedSet", "collate", "tokenize_pairs", "partition", "partition_key",
           "load_train_pairs", "load_eval_pairs", "format_example"]

SEPARATOR = " =>"


def format_example(source: str, reference: str) -> tuple[str, str]:
    """(prompt, target): 'name[..], eatType[..] =>' and ' The text.' (EOS is appended at tokenization)."""
    return source + SEPARATOR, " " + reference


def load_train_pairs(cfg: JobConfig) -> list[tuple[str, str]]:
    d = cfg.data
    if d.name == "synthetic-e2e" and d.train_path is None:
        return synthetic_e2e(d.synthetic_train_size, seed=cfg.seed)
    if d.train_path is not None:
        return read_e2e_csv(d.train_path, "data.train_path")
    return load_e2e_hub("train", "data.train_path")


def load_eval_pairs(cfg: JobConfig) -> list[tuple[str, str]]:
    d = cfg.data
    if d.name == "synthetic-e2e" and d.eval_path is None:
        # A different seed stream than training, so eval examples are held out.
        return synthetic_e2e(d.synthetic_eval_size, seed=10_000 + cfg.seed)
    if d.eval_path is not None:
        return read_e2e_csv(d.eval_path, "data.eval_path")
    return load_e2e_hub("validation", "data.eval_path")
