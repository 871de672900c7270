"""Ray: a worker count the cluster cannot meet (e.g. after a node loss) ends
with one clear error naming the field and the fix."""

from __future__ import annotations

import os
import shutil

import pytest

from mi_scale import config as config_mod

pytestmark = pytest.mark.slow


def test_ray_says_when_num_workers_cannot_be_met(tmp_path, monkeypatch):
    import ray

    from mi_scale import orchestrate
    from mi_scale.errors import UserError

    # Ray's own deadline for starting the worker group; the outcome does not depend
    # on speed: 2 one-CPU workers can never start on this 1-CPU cluster.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    cfg = config_mod.load(None, [f"run.output_dir={tmp_path}", "run.name=short", "model.depth=3", "model.width=16",
                                 "train.steps=2", "tracking.wandb=disabled", "cluster.num_workers=2"])
    temp = f"/tmp/ray-el{os.getpid()}"
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING", _temp_dir=temp)
    try:
        with pytest.raises(UserError) as e:
            orchestrate.run(cfg)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert str(e.value) == (
        f"cluster.num_workers=2: Ray could not start 2 workers of 1 CPU each within 5 s, 1 time(s) "
        f"(cluster.max_failures + 1): the cluster has fewer free resources (a node lost?). Fix: resume "
        f"on the workers there are, `mi-scale resume {cfg.run_dir()} --set cluster.num_workers=M` (the global batch "
        f"is kept), add nodes, or wait longer with RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
