"""Two hosts with their own addresses (network namespaces, tests/netns_hosts.py),
each hostname resolving to loopback, one Ray cluster formed with the SLURM
script's `ray start` lines: the main job trains with one worker per host, and
a start-up failure names its cause."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from mi_scale import config as config_mod
from netns_hosts import A, B, PY, REPO, Hosts, can_make_namespaces

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


def train_on_a(hosts: Hosts, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`mi-scale train ... --address auto` from host A, as slurm.sbatch runs it (RAY_ADDRESS set)."""
    return subprocess.run(hosts.cmd(A, [PY, "-m", "mi_scale.cli", "train", *args, "--address", "auto"]),
                          env=hosts.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


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
