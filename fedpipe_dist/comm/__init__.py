"""Transports between edge servers. The round engine only sees the Communicator protocol."""

from .base import Communicator, Traffic
from .local import LocalComm

__all__ = ["Communicator", "Traffic", "LocalComm"]
