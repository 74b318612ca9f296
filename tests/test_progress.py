"""Layer: the rank-0 progress log (runtime/record.py Log): a bar on a terminal, one flushed line per round in a
log file (a Slurm job's .out), so a long job shows how far it is (issue 17).

Run: .venv/bin/python -m pytest tests/test_progress.py -q
"""

import io
import math
import re

from fedpipe_dist.runtime.record import Log


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _row(t, loss=math.nan):
    return {"round": t, "eval_loss": loss, "wall_s": 2.5, "bytes_up": 3_100_000, "bytes_down": 12_400_000}


def test_a_log_file_gets_one_line_per_round_with_loss_time_eta_and_bytes():
    out = io.StringIO()
    log = Log(True, show_bar=True, stream=out)  # a bar was asked for, but this is not a terminal
    log.open_bar(4, done=1)  # a resumed run: round 1 was done before
    log.step(_row(2, 2.84312))
    log.step(_row(3))
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"round 2/4  eval loss 2\.8431  round 2\.5 s  elapsed 0m\d\ds  ETA 0m\d\ds  up 3\.1 MB  "
                        r"down 12\.4 MB", lines[0]), lines[0]
    assert lines[1].startswith("round 3/4  eval loss -  round 2.5 s"), lines[1]


def test_a_terminal_gets_the_bar_and_other_ranks_nothing():
    tty = _Terminal()
    log = Log(True, stream=tty)
    log.open_bar(2)
    log.step(_row(1, 3.0))
    log.close()
    assert "rounds" in tty.getvalue() and "round 1/2  eval loss" not in tty.getvalue()
    quiet = io.StringIO()
    other = Log(False, stream=quiet)
    other.open_bar(2)
    other.step(_row(1, 3.0))
    other("hello")
    assert quiet.getvalue() == ""
