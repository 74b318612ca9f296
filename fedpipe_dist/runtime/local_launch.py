"""`fedpipe run JOB --nproc N`: torchrun's elastic agent started in this process, N ranks on this machine.

Plain torchrun prints its own warnings and a traceback around a job's error (59 lines for a typo in the job
file, issue 31). Here the agent runs in-process (torch.distributed.launcher.api.elastic_launch) with its
logging quietened, so what reaches the terminal is the job's own output: on a user error, rank 0's message
(which the ranks write into torchrun's error file, cli.report_user_error) in one line and the job's exit code
(2); on Ctrl-C or SIGTERM, the one line of rank 0 naming the round reached and the resume command
(cli.stopped_line). `torchrun ... -m fedpipe_dist run` keeps working as before.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid


def run_local(job: str, overrides: list[str], nproc: int, *, no_progress: bool, max_restarts: int = 0) -> int:
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's logs are about its own bookkeeping; each of its modules' loggers has its own level
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ["FEDPIPE_LOCAL_NPROC"] = str(nproc)  # the ranks' resume line repeats --nproc (cli.stopped_line)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"fedpipe-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                          monitor_interval=0.1, logs_specs=DefaultLogsSpecs())
    args = ["-m", "fedpipe_dist", "run", job, *overrides, *(["--no-progress"] if no_progress else [])]
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
        return 0
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)  # the first to fail
        code = failure.exitcode if failure.exitcode > 0 else 1
        message = failure.message if isinstance(failure.message, str) else ""
        if message and message != "<N/A>" and not message.startswith("Signal "):
            print(message.strip().splitlines()[-1], file=sys.stderr)  # the job's own error, written by its rank
        elif code not in (130, 143):  # a stop already said its line; anything else: where to look
            print(f"fedpipe: rank {rank} exited with code {code}; its output is above", file=sys.stderr)
        return code
    except (SignalException, KeyboardInterrupt):  # the agent stopped its ranks; rank 0 said where it stopped
        return 130
