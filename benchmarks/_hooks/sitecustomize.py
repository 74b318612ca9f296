"""Loaded by every Python process started with benchmarks/_hooks on PYTHONPATH (benchmarks/heldout_pairs.py does
that for the jobs time_to_quality.py starts). With FEDPIPE_HELDOUT_DUMP set it records per-example held-out
losses; without it, it does nothing."""
import os

if os.environ.get("FEDPIPE_HELDOUT_DUMP"):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from heldout_pairs import install

    install(os.environ["FEDPIPE_HELDOUT_DUMP"])
