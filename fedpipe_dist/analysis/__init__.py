"""Analysis of results.h5 files: run discovery (runs.py) and the paper's figures and tables (figures.py),
shared by the notebooks in analysis/ and `fedpipe report`."""

from . import figures
from .runs import Run, load_runs

__all__ = ["Run", "figures", "load_runs"]
