"""Aggregators, one file per algorithm, registered by name."""

from .fedpipe import ClientUpdate, aggregate_factored, aggregation_weights, dense_sum, factored_to_dense

__all__ = ["ClientUpdate", "aggregate_factored", "aggregation_weights", "dense_sum", "factored_to_dense"]
