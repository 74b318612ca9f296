"""Aggregators, one file per algorithm, registered by name (base.py: the interface and the registry)."""

from . import fedadapter, flexlora, flora, ft, hetlora, lora  # noqa: F401  (register the methods)
from .base import REGISTRY, Aggregate, Aggregator, ClientUpdate, get_aggregator
from .fedpipe import aggregate_factored, aggregation_weights, dense_sum, factored_to_dense

__all__ = ["REGISTRY", "Aggregate", "Aggregator", "ClientUpdate", "aggregate_factored", "aggregation_weights",
           "dense_sum", "factored_to_dense", "get_aggregator"]
