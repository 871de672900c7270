"""Two hosts with their own addresses (network namespaces, tests/netns_hosts.py),
each hostname resolving to loopback, one Ray cluster formed with the SLURM
script's `ray start` lines: the main job trains with one worker per host, and
a start-up failure names its cause."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mi_scale import config as config_mod
from netns_hosts import A, B, PY, REPO, Hosts, can_make_namespaces
from test_orchestrate import losses  # each step once, then the losses

pytestmark = [pytest.mark.slow, pytest.mark.skipif(can_make_namespaces() is not None,
                                                     reason=str(can_make_namespaces()))]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        h.up()
        h.start_ray(cpus=1)
        yield h
    finally:
        h.close()


def write_cfg(tmp: Path, name: str, *overrides: str) -> Path:
    cfg = config_mod.load(None, [
        f"run.output_dir={tmp}", f"run.name={name}", "model.depth=2", "model.width=16", "data.batch_size=16",
        "mi.sketch_dim=4", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=2",
        "train.log_every=2", "tracking.wandb=disabled", "cluster.num_workers=2", *overrides])
    path = tmp / f"{name}.yaml"
    config_mod.save(cfg, path)
    return path


def train_on_a(hosts: Hosts, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`mi-scale train ... --address auto` from host A, as slurm.sbatch runs it (RAY_ADDRESS set)."""
    return subprocess.run(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "train", *args, "--address", "auto"]),
                          env={**hosts.env, **env}, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_trains_with_one_worker_per_host(hosts, tmp_path):
    assert hosts.alive_nodes() == [A, B]
    r = train_on_a(hosts, str(write_cfg(tmp_path, "twohost")))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # placement from Ray's actor table: one training worker on each host
    assert hosts.worker_ips() == [A, B]
    lines = r.stdout.splitlines()
    assert sorted(line for line in lines if "collectives on" in line) == [
        f"[mi-scale] node {ip}: collectives on interface {dev} (carries its Ray address; GLOO_SOCKET_IFNAME)"
        for ip, dev in zip((A, B), hosts.veth)]
    rows = [json.loads(line) for line in (tmp_path / "twohost" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]


def test_loopback_binding_fails_with_its_cause(hosts, tmp_path):
    r = train_on_a(hosts, str(write_cfg(tmp_path, "unbound", "cluster.bind_interface=false")))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    # Ray picks which host holds rank 0; the line names the first rank that would bind to loopback
    assert r.stderr.strip().splitlines() in [[
        f"error: gloo would bind rank {rank} ({ip}) to 127.0.0.1: its hostname {socket.gethostname()!r} resolves "
        "to loopback, so the other nodes cannot reach it; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to "
        "the interface of each node's Ray address in the driver's environment, make the hostname resolve to that "
        "address, or leave cluster.bind_interface at true"] for rank, ip in ((0, A), (0, B))]
    assert f"[mi-scale] node {A}: collectives on 127.0.0.1 (its hostname's address; cluster.bind_interface is false)" \
        in r.stdout.splitlines()
    # the start-up failure is in the run dir's log too
    assert "gloo would bind rank 0" in (tmp_path / "unbound" / "logs" / "driver.log").read_text()


FIX = ("set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface that carries each node's Ray address, "
       "or unset it and leave cluster.bind_interface at true (that picks the interface), and check that the nodes "
       "accept TCP connections from each other on all ports")


@pytest.mark.parametrize("iface", ["lo", "nosuch0"])
def test_wrong_interface_fails_at_once_with_its_cause(hosts, tmp_path, iface):
    """GLOO_SOCKET_IFNAME in the driver's environment reaches the workers. `lo`: the pre-flight
    cannot connect the hosts; an interface that does not exist: gloo's own start-up fails, and
    its line is passed on with the rank and the fix."""
    r = train_on_a(hosts, str(write_cfg(tmp_path, "wrongif")), GLOO_SOCKET_IFNAME=iface)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    # Ray picks which host holds rank 0; the port is the kernel's
    if iface == "lo":
        pattern = (rf"error: gloo could not connect rank 1 \((?P<b>{A}|{B})\) to rank 0 \((?P<a>{A}|{B})\) at "
                   rf"127\.0\.0\.1:\d+ \(interface lo of your GLOO_SOCKET_IFNAME\): \[Errno 111\] Connection "
                   rf"refused; {re.escape(FIX)}")
    else:
        pattern = (rf"error: gloo could not start the process group on rank [01] \((?P<a>{A}|{B})\): ifa != "
                   rf"nullptr\. Unable to find address for: nosuch0; {re.escape(FIX)}")
    [line] = r.stderr.strip().splitlines()  # the one line, naming no log file
    m = re.fullmatch(pattern, line)
    assert m, line
    if iface == "lo":
        assert {m["a"], m["b"]} == {A, B}
    assert line[len("error: "):] in (tmp_path / "wrongif" / "logs" / "driver.log").read_text()


def test_address_auto_refuses_several_clusters(hosts, tmp_path):
    """A second cluster on this machine (its head in host A): `auto` without RAY_ADDRESS is refused."""
    env = {**hosts.env, "RAY_TMPDIR": f"{hosts.ray_tmp}-2"}
    del env["RAY_ADDRESS"]
    second = subprocess.Popen(hosts.cmd(A, ["ray", "start", "--head", f"--node-ip-address={A}", "--port=6380",
                                            "--num-cpus=0", "--block"]), env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from ray._private.services import _find_address_from_flag  # uncached, unlike find_gcs_addresses
        while f"{A}:6380" not in _find_address_from_flag("--gcs-address"):
            assert second.poll() is None, "the second Ray head did not start"
            time.sleep(0.5)
        r = subprocess.run(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "train", str(write_cfg(tmp_path, "auto")),
                                         "--address", "auto"]), env=env, capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    finally:
        second.kill()
        hosts.kill_matching(env["RAY_TMPDIR"])  # the second cluster's processes, all of them
        second.wait(timeout=30)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = r.stderr.strip().splitlines()
    # every cluster on the machine is named (other Ray instances may run here too)
    found = line.split("(", 1)[1].split(")", 1)[0].split(", ")
    assert {f"{A}:{6379}", f"{A}:6380"} <= set(found)
    assert line == (f"error: cluster.address: 'auto' sees {len(found)} Ray clusters on this machine "
                    f"({', '.join(found)}): pass --address HOST:PORT (or set RAY_ADDRESS) to pick one")


def start_until_b_stalls(hosts: Hosts, tmp_path: Path, name: str, *overrides: str):
    """A 2-host run whose rank on host B stalls at step 5, after the step-4 checkpoint."""
    path = write_cfg(tmp_path, name, "train.steps=8", "train.checkpoint_every=4", "train.eval_every=8",
                     "fault.stall_at_step=4", f"fault.fail_node={B}", *overrides)
    proc = subprocess.Popen(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "train", str(path), "--address", "auto"]),
                            env=hosts.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    run_dir = tmp_path / name
    while not list(run_dir.glob(".fault-stalled-step4-rank*")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    rank_b = int(next(run_dir.glob(".fault-stalled-step4-rank*")).name.rsplit("rank", 1)[1])
    return proc, run_dir, rank_b


def test_losing_host_b_without_elastic_says_so_and_exits_1(hosts, tmp_path):
    proc, run_dir, rank_b = start_until_b_stalls(hosts, tmp_path, "lost")
    hosts.kill_host(B)
    out, err = proc.communicate(timeout=300)
    hosts.restart_b()
    assert proc.returncode == 1, err[-3000:]
    assert f"[mi-scale] node {B} lost (Ray marked it dead): it held rank {rank_b} of 2" in out.splitlines()
    assert err.strip().splitlines() == [
        f"error: node {B} lost with rank {rank_b} of 2: the run stopped; continue on the workers left with "
        f"`mi-scale resume {run_dir} --set cluster.num_workers=1` (the global batch is kept), or set "
        f"cluster.elastic: true to do so automatically"]


def test_losing_host_b_elastic_finishes_on_a_like_a_resume(hosts, tmp_path):
    proc, run_dir, rank_b = start_until_b_stalls(hosts, tmp_path, "elastic", "cluster.elastic=true")
    # the run dir as it stands at the loss: the step-4 checkpoint, for the reference resume below
    shutil.copytree(run_dir, tmp_path / "ref")
    hosts.kill_host(B)
    out, err = proc.communicate(timeout=300)
    hosts.restart_b()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    lines = out.splitlines()
    assert f"[mi-scale] node {B} lost (Ray marked it dead): it held rank {rank_b} of 2" in lines
    assert (f"[mi-scale] elastic: continuing on 1 of 2 workers from the latest complete checkpoint, as "
            f"`mi-scale resume {run_dir} --set cluster.num_workers=1`") in lines
    elastic = losses(run_dir)  # every step logged once
    assert len(elastic) == 8
    # the same resume by hand, from the same checkpoint, on the cluster (host B is back)
    # without the faults: Ray may place this one worker on host B, whose rank would stall again
    r = subprocess.run(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "resume", str(tmp_path / "ref"), "--set",
                                     "cluster.num_workers=1", "--set", "fault.stall_at_step=null",
                                     "--set", "fault.fail_node=null"]), env=hosts.env, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "ref")[4:] == pytest.approx(elastic[4:], rel=1e-5)


def test_run_dir_not_shared_between_hosts_is_refused(hosts, tmp_path):
    """Host B keeps the output dir on its own tmpfs: rank 0 on A cannot see B's files.
    Host B stays that way until the next test restarts it."""
    (tmp_path / "local").mkdir()
    hosts.restart_b(private_dir=str(tmp_path / "local"))
    r = train_on_a(hosts, str(write_cfg(tmp_path / "local", "unshared")))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.strip().splitlines() in [[
        f"error: run.output_dir: {tmp_path / 'local'} is not shared between nodes: rank 0 on {a} does not see "
        f"the files of rank 1 on {b}, so checkpoint shards would stay on each node; set run.output_dir to a "
        f"filesystem every node mounts at the same path (NFS, Lustre, a cloud file store), or set "
        f"cluster.storage_path (a folder every node sees, or s3:// / gs://) to carry the checkpoints"]
        for a, b in ((A, B), (B, A))]


def test_storage_path_carries_checkpoints_between_node_local_run_dirs(hosts, tmp_path):
    """Host B keeps run.output_dir on its own tmpfs; cluster.storage_path (a folder
    both hosts see, standing in for s3://) carries the checkpoints. Rank 1 fails
    at step 6: the restarted group downloads the stored step-4 checkpoint into
    each node's run dir and finishes with the losses of an uninterrupted run.
    Then a resume to step 16 downloads the stored step 8 where a run dir holds
    an older one (host B's step 4), loses host B at step 14 and continues
    elastic on host A. The module's last test: host B stays lost until the teardown."""
    from distributed_helpers import free_port
    from test_orchestrate import env as local_env

    steps = ("train.steps=8", "train.checkpoint_every=4", "train.eval_every=8")
    ref_cfg = write_cfg(tmp_path, "ref", *steps)
    ref = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "mi_scale.train.worker", str(ref_cfg)],
                         capture_output=True, text=True, env=local_env(), timeout=300, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-3000:]

    local, store = tmp_path / "local", tmp_path / "store"
    local.mkdir()
    hosts.restart_b(private_dir=str(local))
    # max_failures=2: the fault fires once per node's run dir, and Ray may move rank 1 to the other host
    r = train_on_a(hosts, str(write_cfg(local, "stored", *steps, f"cluster.storage_path={store}",
                                        "cluster.max_failures=2", "fault.fail_at_step=6", "fault.fail_rank=1")))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(line.startswith("[mi-scale] run.output_dir is not shared between nodes (rank 0 on ")
               and line.endswith(f"each node keeps its own run dir, and checkpoints go through "
                                 f"cluster.storage_path={store}") for line in lines), r.stdout
    assert any(line.startswith("[mi-scale] worker rank 1 ") and line.endswith("resumed from step 4")
               for line in lines), r.stdout
    run_dir = local / "stored"  # the driver's (host A's) run dir
    assert losses(run_dir) == losses(tmp_path / "ref")  # every step once, equal to the uninterrupted run
    # storage holds whole checkpoints (both ranks' files, the run's files); the driver's run dir got the final one
    final = json.loads((run_dir / "checkpoints" / "step-00000008" / "mi_scale.json").read_text())
    assert final["step"] == 8 and final["world_size"] == 2
    stored = sorted(p for p in (store / "stored").glob("checkpoint_*") if p.is_dir())
    assert len(stored) == 2
    for ckpt in stored:
        names = {p.name for p in ckpt.iterdir()}
        assert {"rank-0000.pt", "rank-0001.pt", "mi_scale.json", "metrics.jsonl", "config.yaml"} <= names, names
    assert {p.name for p in (run_dir / "checkpoints" / "step-00000008").iterdir()} == \
        {p.name for p in stored[-1].iterdir()}
    # host B's run dir holds no checkpoint with only its own files: what it uploaded is deleted there,
    # and what it downloaded to resume from is whole
    on_b = json.loads(hosts.python(B, f"import json, pathlib; print(json.dumps({{p.name: sorted(f.name for f in "
                                      f"p.iterdir()) for p in pathlib.Path({str(run_dir / 'checkpoints')!r}).iterdir()}}))", as_node=True))
    assert set(on_b) <= {"step-00000004"}, on_b
    for files in on_b.values():
        assert {"rank-0000.pt", "rank-0001.pt", "mi_scale.json"} <= set(files), files

    # resume to 16 steps; host B's rank stalls at step 14 and the host is lost
    r = subprocess.Popen(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "resume", str(run_dir), "--address", "auto",
                                       "--set", "train.steps=16", "--set", "cluster.elastic=true",
                                       "--set", "cluster.max_failures=0", "--set", "fault.fail_at_step=null",
                                       "--set", "fault.stall_at_step=14", "--set", f"fault.fail_node={B}"]),
                         env=hosts.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stalled = f"import pathlib; print(len(list(pathlib.Path({str(run_dir)!r}).glob('.fault-stalled-step14-rank*'))))"
    deadline = time.time() + 300  # ranks that resumed from different steps would hang, not fail
    while hosts.python(B, stalled, as_node=True).strip() == "0":
        assert r.poll() is None, r.communicate()[1][-3000:]
        assert time.time() < deadline, "host B's rank never reached step 14"
        time.sleep(1)
    hosts.kill_host(B)
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, out[-2000:] + err[-3000:]
    lines = out.splitlines()
    assert any(line.startswith("[mi-scale] elastic: continuing on 1 of 2 workers") for line in lines), out
    resumed = [line.split(" (loaded")[0] for line in lines if line.startswith("[mi-scale] resumed from")]
    # both ranks from the stored step 8 (host B's run dir held only step 4), then elastic from the newest
    # checkpoint Ray had registered when host B was lost: 12, or 8 when the step-12 report was not yet in
    assert resumed[0] == f"[mi-scale] resumed from {run_dir}/checkpoints/step-00000008 at step 8", out
    assert resumed[1] in [f"[mi-scale] resumed from {run_dir}/checkpoints/step-{s:08d} at step {s}"
                          for s in (8, 12)], out
    assert len(losses(run_dir)) == 16  # every step once
