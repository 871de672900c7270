"""Ray orchestration on a real local Ray: equality with torchrun, a two-node
cluster on this machine, worker failure recovery, driver kill + resume, and
fast errors for bad cluster settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_helpers import free_port
from mi_scale import config as config_mod

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def env() -> dict:
    e = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        e.pop(k, None)
    return e


def write_cfg(tmp_path: Path, name: str, *overrides: str) -> Path:
    cfg = config_mod.load(None, [
        f"run.output_dir={tmp_path}", f"run.name={name}", "model.depth=4", "model.width=32",
        "data.batch_size=16", "mi.sketch_dim=4", "mi.weight=0.01", "train.steps=16", "train.eval_every=8",
        "train.checkpoint_every=4", "train.log_every=4", "train.keep_last=2", "tracking.wandb=offline",
        "cluster.num_workers=2", *overrides])
    path = tmp_path / f"{name}.yaml"
    config_mod.save(cfg, path)
    return path


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "each step exactly once"
    return [r["loss"] for r in train]


def final_params(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    states = torch.load(next(last.rglob("mp_rank_00_model_states.pt")), weights_only=False)
    return states["module"]


def mi_scale(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mi_scale.cli", *args], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    path = write_cfg(tmp, "torchrun")
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "mi_scale.train.worker", str(path)],
                       capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "torchrun"


def test_embedded_ray_equals_torchrun_and_summarizes(tmp_path, torchrun_reference):
    r = mi_scale("train", str(write_cfg(tmp_path, "ray")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "ray") == losses(torchrun_reference)
    assert "== mi-scale run summary ==" in r.stdout and "final eval_accuracy" in r.stdout
    assert "blocks.0->blocks.1" in r.stdout
    # keep-last-K honoured in the run dir and in Ray's copy
    assert len(list((tmp_path / "ray" / "checkpoints").glob("step-*"))) == 2
    assert len([p for p in (tmp_path / "ray" / "ray_train").glob("checkpoint_*") if p.is_dir()]) == 2


def test_worker_failure_recovers_with_identical_result(tmp_path, torchrun_reference):
    # Rank 1 is killed with SIGKILL at the start of step 7 (0-based 6); the
    # last checkpoint is step 4.
    r = mi_scale("train", str(write_cfg(tmp_path, "faulty", "fault.kill_at_step=6", "fault.fail_rank=1",
                                        "cluster.max_failures=1")))
    assert r.returncode == 0, r.stderr[-3000:]
    recovery = [line for line in r.stdout.splitlines() if "restarted the group" in line]
    assert recovery == ["[mi-scale] worker rank 1 died (its process was killed or crashed); restarted the "
                        "group (1 of 1 retries); resumed from step 4"]
    assert "Traceback" not in r.stdout + r.stderr  # the traces are in RUN_DIR/logs
    assert losses(tmp_path / "faulty") == losses(torchrun_reference)
    ours, ref = final_params(tmp_path / "faulty"), final_params(torchrun_reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_out_of_retries_prints_one_error_line_and_exits_1(tmp_path):
    r = mi_scale("train", str(write_cfg(tmp_path, "fails", "fault.fail_at_step=6", "fault.fail_rank=1",
                                        "cluster.max_failures=0")))
    assert r.returncode == 1
    logs = (tmp_path / "fails" / "logs").resolve()
    assert r.stderr.strip().splitlines() == [
        "error: training failed: worker rank 1 failed: InjectedFault: injected fault on rank 1 at step 6 "
        f"(fault.fail_at_step), after 0 of cluster.max_failures=0 restarts; full trace in {logs}/driver.log "
        f"and {logs}/rank-*.log"]
    assert "Traceback" not in r.stdout
    trace = (logs / "rank-1.log").read_text()
    assert "Traceback" in trace and "InjectedFault: injected fault on rank 1 at step 6" in trace


def test_two_node_cluster_one_worker_per_node(tmp_path, torchrun_reference):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        import ray
        ray.init(address=cluster.address)
        # Two nodes of one CPU each and two 1-CPU workers: one worker per node.
        assert sorted(n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"]) == [1.0, 1.0]
        ray.shutdown()
        r = mi_scale("train", str(write_cfg(tmp_path, "twonode")), "--address", cluster.address)
        assert r.returncode == 0, r.stderr[-3000:]
        assert losses(tmp_path / "twonode") == losses(torchrun_reference)
    finally:
        cluster.shutdown()


def test_driver_killed_then_resume(tmp_path, torchrun_reference):
    # rank 0 stalls at step 9, after the step-8 checkpoint: the kill lands at the
    # same point however fast or busy the machine is (pytest's timeout guards a hang)
    path = write_cfg(tmp_path, "killed", "train.steps=16", "fault.stall_at_step=9")
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "mi_scale.cli", "train", str(path)], env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not (run_dir / ".fault-stalled-step9-rank0").exists():
        assert proc.poll() is None, "the run ended before it reached step 9"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray with it
    proc.wait()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008"]
    r = mi_scale("resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run_dir) == losses(torchrun_reference)


def test_resume_falls_back_to_rays_copies_in_storage_path(tmp_path, torchrun_reference):
    """The run dir lost every checkpoint (a fresh node): resume takes the latest
    one Ray Train kept in cluster.storage_path and continues exactly."""
    store = tmp_path / "store"
    path = write_cfg(tmp_path, "lost", f"cluster.storage_path={store}", "fault.fail_at_step=9", "fault.fail_rank=1",
                     "cluster.max_failures=0")
    r = mi_scale("train", str(path))
    assert r.returncode == 1, r.stderr[-3000:]  # failed at step 10, after the step-8 checkpoint
    run_dir = tmp_path / "lost"
    assert len([p for p in (store / "lost").glob("checkpoint_*") if p.is_dir()]) == 2  # Ray's copies: 4, 8
    import shutil
    shutil.rmtree(run_dir / "checkpoints")
    r = mi_scale("resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[mi-scale] resumed from" in r.stdout and "step-00000008" in r.stdout, r.stdout
    assert losses(run_dir) == losses(torchrun_reference)


def test_bad_cluster_settings_fail_fast(tmp_path):
    """Fail fast = before anything starts: exit 2, one `error:` line, no run dir
    (so no worker ran or logged), no embedded Ray session dir."""
    from mi_scale.orchestrate import _temp_dir

    cpus = os.cpu_count()
    path = write_cfg(tmp_path, "toomany", f"cluster.num_workers={cpus + 2}")
    r = mi_scale("train", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: cluster.num_workers={cpus + 2} x cluster.cpus_per_worker=1 needs {cpus + 2} CPUs but this "
        f"machine has {cpus}: lower them, or pass --address of a Ray cluster"]
    assert not Path(_temp_dir(config_mod.load(path))).exists()  # where its Ray session would be
    port = free_port()
    r = mi_scale("train", str(write_cfg(tmp_path, "unreachable")), "--address", f"ray://127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: cluster.address: cannot reach 'ray://127.0.0.1:{port}' ([Errno 111] Connection refused); check "
        f"the head node is up and the port is open, or leave cluster.address unset for an embedded local Ray"]
    assert not (tmp_path / "toomany").exists() and not (tmp_path / "unreachable").exists()


def test_a_kill_for_low_memory_is_named_with_the_figures_and_the_fix(tmp_path):
    """Ray's own memory monitor, with its threshold set below what the node already
    uses, kills a process of the run for real (no memory is consumed for it)."""
    r = subprocess.run([PY, "-m", "mi_scale.cli", "train", str(write_cfg(tmp_path, "oom", "cluster.max_failures=0"))],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**env(), "RAY_memory_usage_threshold": "0.02", "RAY_memory_monitor_refresh_ms": "100"})
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    m = re.fullmatch(r"error: training failed: (a Ray process|worker rank \d) was killed by Ray for low memory "
                     r"\(([\d.]+) of ([\d.]+) GB in use on node [\d.]+\), above Ray's RAY_memory_usage_threshold "
                     r"\(default 0\.95\)\. Fix: see what each rank holds with `mi-scale plan CONFIG`, then lower "
                     r"data\.batch_size, use fewer workers per node \(cluster\.num_workers\) or a higher ZeRO stage, "
                     r"after 0 of cluster\.max_failures=0 restarts; full trace in .*", line)
    assert m, line
    assert 0 < float(m[2]) < float(m[3])
