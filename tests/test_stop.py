"""Stop signals on a real embedded Ray run of 2 workers: Ctrl-C to the driver and
SIGTERM to one worker each stop all ranks at one step boundary with a
checkpoint of that step, one line, exit 128 + signal, and a resume that
equals the uninterrupted run bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from distributed_helpers import free_port
from test_orchestrate import PY, REPO, env, losses, mi_scale, write_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    path = write_cfg(tmp, "ref", "train.steps=8")
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "mi_scale.train.worker", str(path)],
                       capture_output=True, text=True, env=env(), timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(tmp / "ref")


def run_until_waiting(tmp_path, name: str, rank: int) -> tuple[subprocess.Popen, object]:
    """A run whose rank `rank` waits at the start of step 3 (0-based 2) until told to stop."""
    path = write_cfg(tmp_path, name, "train.steps=8", "fault.wait_for_stop_at_step=2", f"fault.fail_rank={rank}")
    proc = subprocess.Popen([PY, "-m", "mi_scale.cli", "train", str(path)], env=env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    marker = tmp_path / name / f".fault-waiting-step2-rank{rank}"
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    return proc, tmp_path / name


def check_stopped_and_resume(proc, run_dir, code: int, reference) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted at step 3: checkpoint step-00000003 written; "
                                            f"resume with mi-scale resume {run_dir.resolve()}")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert len(losses(run_dir)) == 3
    r = mi_scale("resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run_dir) == reference


def test_ctrl_c_to_the_driver_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, reference):
    proc, run_dir = run_until_waiting(tmp_path, "sigint", rank=0)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    check_stopped_and_resume(proc, run_dir, 130, reference)


def test_sigterm_to_one_worker_stops_all_ranks_and_resumes_exactly(tmp_path, reference):
    proc, run_dir = run_until_waiting(tmp_path, "sigterm", rank=1)
    pid = int((run_dir / ".fault-waiting-step2-rank1").read_text())
    os.kill(pid, signal.SIGTERM)  # a preempted node's warning, to rank 1 only
    check_stopped_and_resume(proc, run_dir, 143, reference)
