"""Every rank stops alike: a user error found on any rank is raised on all of them, so no rank waits in a
collective for a peer that has quit. The one place the engine agrees on an error (issue 30)."""

from __future__ import annotations

from ..errors import ConfigError, UserInputError


def raise_on_all_ranks(comm, err: str | None) -> None:
    """Raise UserInputError on every rank if any rank found a problem (the first one's message)."""
    errs = [e for e in comm.all_gather_object(err) if e]
    if errs:
        raise UserInputError(errs[0])


def agree(comm, fn):
    """Run fn on rank 0; if it raises a user error, every rank raises it too. Returns fn's result on rank 0."""
    err, result = None, None
    if comm.rank == 0:
        try:
            result = fn()
        except (ConfigError, UserInputError) as e:
            err = str(e)
    raise_on_all_ranks(comm, err)
    return result
