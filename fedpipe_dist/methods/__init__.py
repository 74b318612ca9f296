"""Methods, one module each, registered by name (base.py: the interface every method implements and the
registry; lora.py: what the LoRA methods share). `make_method(cfg)` gives the one a job names."""

from . import fedadapter, fedpipe, flexlora, flora, ft, hetlora, lora  # noqa: F401  (register the methods)
from .base import REGISTRY, Exchanged, Method, Report, make_method, method_class, register_method, require
from .lora import LoRAMethod

__all__ = ["REGISTRY", "Exchanged", "LoRAMethod", "Method", "Report", "make_method", "method_class",
           "register_method", "require"]
