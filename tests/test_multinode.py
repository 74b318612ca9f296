"""Multi-node on nodes made on one machine (issue 29): Linux network namespaces on a private bridge
(slurm/netns_nodes.sh), each with its own address and host name, sharing the filesystem as cluster nodes share
a parallel one. A job started on two such nodes must equal the same job on one host with the same world size.

Skips (saying what is missing) without root or `ip netns`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import REPO, SMALL_RUN, kill_job, subprocess_env

NODES = REPO / "slurm" / "netns_nodes.sh"
JOB = ["run", "jobs/quickstart.yaml", *SMALL_RUN, "--no-progress"]


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 (ip netns) and util-linux (unshare)"
    return None


@pytest.fixture(scope="module")
def nodes():
    """Two nodes: [(namespace index, address, host name)], removed at the end."""
    if (why := _netns_missing()):
        pytest.skip(why)
    name = f"fpm{os.getpid() % 100000}"
    up = subprocess.run(["bash", str(NODES), "up", name, "2"], capture_output=True, text=True)
    if up.returncode != 0:
        subprocess.run(["bash", str(NODES), "down", name], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {up.stderr.strip()[-300:]}")
    rows = [line.split() for line in up.stdout.splitlines() if line.strip()]
    try:
        yield name, [(i, addr, host) for i, (_, addr, host) in enumerate(rows)]
    finally:
        subprocess.run(["bash", str(NODES), "down", name], capture_output=True)


def _on_node(name: str, i: int, argv: list[str], log, *, local_dir=None) -> subprocess.Popen:
    """argv on node i (its own address and host name); `local_dir`: a path that is node-local there (a tmpfs
    mounted over it in a private mount namespace), as node scratch is on a cluster."""
    if local_dir is not None:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', str(local_dir), *argv]
    return subprocess.Popen(["bash", str(NODES), "run", name, str(i), *argv], cwd=REPO, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _start_pair(name, nodes, out, *extra, per_node=2, local_dir=None, elastic=False):
    """`torchrun --nnodes=2 --node_rank=i --rdzv-endpoint=<node 0>:PORT` started in each namespace, as a user
    starts it on two hosts; returns the launchers and their log files."""
    port = 29400 + os.getpid() % 500
    procs, logs = [], []
    for i, _, _ in nodes:
        log = open(out.parent / f"{out.name}.node{i}.log", "w+")
        launch = ["--nnodes=1:2", "--max-restarts=2"] if elastic else ["--nnodes=2", f"--node_rank={i}"]
        argv = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes[0][1]}:{port}", "-m", "fedpipe_dist", *JOB,
                f"output.dir={out}", *extra]
        procs.append(_on_node(name, i, argv, log, local_dir=local_dir if i == 1 else None))
        logs.append(log)
    return procs, logs


def _finish(procs, logs, timeout=300) -> list[tuple[int, str]]:
    """[(rc, log text)] per node, each launcher given `timeout` seconds (then killed)."""
    res = []
    for p, log in zip(procs, logs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(p)
        log.seek(0)
        res.append((p.returncode, log.read()))
        log.close()
    return res


def _torchrun_pair(name, nodes, out, *extra, per_node=2, local_dir=None, timeout=300):
    return _finish(*_start_pair(name, nodes, out, *extra, per_node=per_node, local_dir=local_dir), timeout=timeout)


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc): a launcher, its agent's workers and theirs."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _one_host(out, nproc, *extra):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "fedpipe_dist", *JOB, f"output.dir={out}", *extra], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return Results(out / "results.h5")


def _assert_twins(a: Results, b: Results) -> None:
    np.testing.assert_allclose(a.rounds["eval_loss"], b.rounds["eval_loss"], rtol=0, atol=1e-6)
    for k in ("bytes_up", "bytes_down"):
        np.testing.assert_array_equal(a.rounds[k], b.rounds[k])
    for k in ("batch_size", "local_steps", "ranks", "quant_bits", "samples"):
        np.testing.assert_array_equal(a.clients[k], b.clients[k])


def test_torchrun_on_two_nodes_equals_one_host(nodes, tmp_path):
    name, ns = nodes
    res = _torchrun_pair(name, ns, tmp_path / "two")
    for rc, log in res:
        assert rc == 0, log[-3000:]
    two = Results(tmp_path / "two" / "results.h5")
    _assert_twins(two, _one_host(tmp_path / "one", 4))
    prov = json.loads(two.attrs["provenance_json"][0] if not isinstance(two.attrs["provenance_json"], str)
                      else two.attrs["provenance_json"])
    assert prov["world_size"] == 4 and sorted(prov["hosts"]) == sorted(h for _, _, h in ns), prov["hosts"]


def test_a_node_local_output_dir_is_refused_at_the_start(nodes, tmp_path):
    """Node 1 sees output.dir as its own tmpfs (node-local scratch): every rank stops (exit 2; plain torchrun
    reports 1 and its own traceback of the failed workers) with one message naming the hosts, before any round."""
    name, ns = nodes
    out = tmp_path / "local"
    out.mkdir()
    res = _torchrun_pair(name, ns, out, per_node=1, local_dir=out)
    for rc, log in res:
        assert rc != 0, log[-3000:]
    text = res[0][1]
    assert "is not one folder shared by every rank" in text and ns[1][2] in text, text[-3000:]
    assert not (out / "results.h5").exists() and not list(out.glob(".fedpipe.probe-*"))


def _lose_node_1(name, ns, out, bound_s, *extra, per_node, elastic=False):
    """Start the pair; once round 2 is done, cut node 1's link and kill every process on it (a node that loses
    power). Returns node 0's (rc, log) and the seconds from the loss to node 0's launcher's exit."""
    import signal
    import time

    procs, logs = _start_pair(name, ns, out, *extra, per_node=per_node, elastic=elastic)
    try:
        deadline = time.monotonic() + 240
        while "round 2/" not in open(logs[0].name).read():
            assert time.monotonic() < deadline and procs[0].poll() is None, open(logs[0].name).read()[-3000:]
            time.sleep(0.2)
        subprocess.run(["bash", str(NODES), "cut", name, "1"], check=True)
        for pid in _descendants(procs[1].pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        lost_at = time.monotonic()
        procs[0].wait(timeout=bound_s + 60)
        elapsed = time.monotonic() - lost_at
    finally:
        res = _finish(procs, logs, timeout=5)
        subprocess.run(["ip", "link", "set", f"{name}-v1", "up"], capture_output=True)  # for the next test
    return res[0], elapsed


def test_a_lost_node_ends_every_surviving_rank_within_the_bound(nodes, tmp_path):
    """Mid-run, node 1's link is cut and every process on it killed (a node that loses power): node 0's rank
    stops within comm.timeout_s plus the heartbeat's grace (the bound: timeout + 60 s here) with one message naming
    the lost rank and its host and the rounds results.h5 holds, instead of hanging."""
    name, ns = nodes
    timeout_s = 20
    out = tmp_path / "lost"
    (rc, text), elapsed = _lose_node_1(name, ns, out, timeout_s, "rounds=200", f"comm.timeout_s={timeout_s}",
                                       per_node=1)
    print(f"node 0 ended {elapsed:.1f} s after node 1 was lost (comm.timeout_s={timeout_s})")
    assert rc != 0 and elapsed < timeout_s + 60, (rc, elapsed)
    line = next((x for x in text.splitlines() if "fedpipe: error:" in x), "")
    assert f"rank 1 on {ns[1][2]} (no heartbeat for" in line, text[-3000:]
    done = Results(out / "results.h5")
    assert done.n_rounds >= 2 and not done.attrs["finished"]
    assert f"results.h5 holds rounds 1-{done.n_rounds}" in line and "resume=true" in line, line


def test_elastic_torchrun_continues_on_the_surviving_node(nodes, tmp_path):
    """torchrun --nnodes=1:2 --max-restarts=2 on both nodes; node 1 is lost after round 2. The agent on node 0
    restarts its 2 workers, the job resumes from its newest checkpoint with world size 2 (elastic resume composes
    the 4-rank state) and finishes. It must equal a run that changed world size at that round: 4 ranks on one host
    to that round, then resume=true on 2 ranks."""
    name, ns = nodes
    out = tmp_path / "elastic"
    job = ["rounds=12", "comm.timeout_s=15"]
    (rc, text), _ = _lose_node_1(name, ns, out, 15 + 120, *job, per_node=2, elastic=True)
    assert rc == 0, text[-3000:]
    done = Results(out / "results.h5")
    assert done.attrs["finished"] and done.n_rounds == 12
    k = int(np.asarray(done.attrs["resumed_from"]).ravel()[-1])
    assert 2 <= k < 12 and "this job has 2" in text, text[-3000:]
    ref = tmp_path / "ref"
    _one_host(ref, 4, f"rounds={k}")
    twin = _one_host(ref, 2, "rounds=12", "resume=true")
    _assert_twins(done, twin)
