"""The DeepSpeed training worker: equality with a plain DeepSpeed loop,
multi-rank ZeRO runs, exact resume, crash-safe checkpoints, wandb, errors."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wandb_reader
from distributed_helpers import free_port, run_world
from mi_scale import config as config_mod

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def tiny(tmp_path: Path, *overrides: str, name: str = "tiny") -> config_mod.Config:
    base = [f"run.output_dir={tmp_path}", f"run.name={name}", "model.depth=4", "model.width=32",
            "data.batch_size=16", "mi.sketch_dim=4", "mi.weight=0.01", "train.steps=12",
            "train.eval_every=6", "train.checkpoint_every=5", "train.log_every=4", "train.keep_last=3",
            "train.warmup_steps=2", "tracking.wandb=disabled", "tracking.heatmap_every=6"]
    return config_mod.load(None, base + list(overrides))


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([PY, "-m", "mi_scale.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO)


# -- 1 rank, in process ---------------------------------------------------------


def test_weight_zero_equals_plain_deepspeed_loop(tmp_path):
    import deepspeed
    import torch.nn.functional as F

    from mi_scale.data import ShardedBatches, build_data
    from mi_scale.models import build_model
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "mi.weight=0", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=0",
               "deepspeed.zero_stage=0")
    run_worker(cfg)
    ours = [r["loss"] for r in metrics(cfg.run_dir())]

    # The same training written as a plain DeepSpeed loop.
    torch.manual_seed(cfg.run.seed)
    bundle = build_data(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, input_dim=bundle.input_dim, num_classes=bundle.num_classes)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.train.lr, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    batches = ShardedBatches(bundle.train, 16, 0, 1, cfg.run.seed)
    plain = []
    for _ in range(cfg.train.steps):
        b = batches.next_batch()
        loss = F.cross_entropy(engine(b["x"]), b["y"])
        engine.backward(loss)
        engine.step()
        plain.append(loss.item())
    assert ours == plain


def test_resume_reproduces_uninterrupted_run_one_rank(tmp_path):
    from mi_scale.train.worker import InjectedFault, run_worker

    full = tiny(tmp_path, "train.steps=20", name="full")
    run_worker(full)
    part = tiny(tmp_path, "train.steps=20", "fault.fail_at_step=10", name="part")
    with pytest.raises(InjectedFault):
        run_worker(part)  # interrupted at step 10, right after the step-10 checkpoint
    run_worker(part, resume=True)
    a, b = metrics(full.run_dir()), metrics(part.run_dir())
    assert [r["step"] for r in b] == list(range(1, 21))  # each step exactly once
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["data_batch"] for r in a] == [r["data_batch"] for r in b]
    assert [r["mi_mean"] for r in a] == [r["mi_mean"] for r in b]
    assert (part.run_dir() / "plots" / "mi_heatmap.png").stat().st_size > 5000


def test_wandb_offline_matches_metrics_and_resume_keeps_run_id(tmp_path):
    from mi_scale.train.worker import InjectedFault, run_worker

    cfg = tiny(tmp_path, "tracking.wandb=offline", "train.steps=10", "fault.fail_at_step=6")
    with pytest.raises(InjectedFault):
        run_worker(cfg)
    run_worker(cfg, resume=True)
    files = sorted(glob.glob(str(cfg.run_dir() / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2
    ids = {wandb_reader.run_id(f) for f in files}
    assert ids == {(cfg.run_dir() / "wandb_id.txt").read_text().strip()}
    logged = {}
    for f in files:
        for row in wandb_reader.history(f):
            if "loss" in row:
                logged[row["_step"]] = row
    expected = metrics(cfg.run_dir())
    assert sorted(logged) == [r["step"] for r in expected] == list(range(1, 11))
    for r in expected:
        mi_keys = [k for k in r if k.startswith("mi/")]
        assert len(mi_keys) == 3
        for k in mi_keys + ["loss", "task_loss", "mi_loss", "lr"]:
            assert logged[r["step"]][k] == pytest.approx(r[k], rel=1e-12)


def test_corrupt_latest_checkpoint_is_skipped_for_previous(tmp_path):
    from mi_scale.train.checkpoint import complete_checkpoints
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "train.steps=10")
    run_worker(cfg)
    ckpts = complete_checkpoints(cfg.run_dir())
    assert [c.name for c in ckpts] == ["step-00000010", "step-00000005"]
    for f in ckpts[0].rglob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])  # truncated file
    cfg.train.steps = 12
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000010: failed to load"):
        run_worker(cfg, resume=True)
    steps = [r["step"] for r in metrics(cfg.run_dir())]
    assert steps == list(range(1, 13))


# -- subprocess: crash mid-save, torchrun, errors ---------------------------------


def test_kill_during_checkpoint_write_keeps_previous_loadable(tmp_path):
    cfg = tiny(tmp_path, "train.steps=12", "fault.kill_during_checkpoint=10")
    config_mod.save(cfg, tmp_path / "c.yaml")
    r = cli("train", str(tmp_path / "c.yaml"), "--launcher", "local")
    assert r.returncode == 137, r.stderr[-2000:]
    ckroot = cfg.run_dir() / "checkpoints"
    assert sorted(p.name for p in ckroot.iterdir()) == [".partial-step-00000010", "step-00000005"]
    r = cli("resume", str(cfg.run_dir()), "--launcher", "local", "--set", "fault.kill_during_checkpoint=null")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step-00000005" in r.stdout
    ref = tiny(tmp_path, "train.steps=12", name="ref")
    from mi_scale.train.worker import run_worker
    run_worker(ref)
    assert [x["loss"] for x in metrics(cfg.run_dir())] == [x["loss"] for x in metrics(ref.run_dir())]
    assert sorted(p.name for p in ckroot.iterdir()) == ["step-00000005", "step-00000010", "step-00000012"]


def _torchrun(cfg_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "mi_scale.train.worker", str(cfg_path), *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def test_torchrun_two_ranks_resume_equals_uninterrupted(tmp_path):
    full = tiny(tmp_path, "train.steps=20", name="full")
    config_mod.save(full, tmp_path / "full.yaml")
    r = _torchrun(tmp_path / "full.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    part = tiny(tmp_path, "train.steps=20", "fault.fail_at_step=10", "fault.fail_rank=1", name="part")
    config_mod.save(part, tmp_path / "part.yaml")
    r = _torchrun(tmp_path / "part.yaml")
    assert r.returncode != 0 and "injected fault on rank 1 at step 10" in r.stderr
    r = _torchrun(tmp_path / "part.yaml", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(full.run_dir()), metrics(part.run_dir())
    assert [x["step"] for x in b] == list(range(1, 21))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["data_batch"] for x in a] == [x["data_batch"] for x in b]
    assert a[-1]["samples_seen"] == 20 * 16 * 2
    # a 2-rank checkpoint resumes on 1 rank with the same global batch, and says so
    r = cli("resume", str(full.run_dir()), "--launcher", "local", "--set", "train.steps=21")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("[mi-scale] resuming a 2-rank checkpoint (step 20) on 1 ranks: data.batch_size 16 -> 32 per rank "
            "keeps the global batch of 32; ZeRO state resharded") in r.stdout.splitlines()
    assert [x["step"] for x in metrics(full.run_dir())] == list(range(1, 22))


def _zero_run(rank, world, cfg_dict):
    from mi_scale.train.worker import run_worker
    cfg = config_mod.from_dict(cfg_dict)
    summary = run_worker(cfg)
    return summary, metrics(cfg.run_dir()) if rank == 0 else None


ZERO_COMMON = ("train.steps=30", "train.lr=0.01", "mi.sketch=learned", "train.checkpoint_every=30")


@pytest.fixture(scope="module")
def one_rank_zero0_reference(tmp_path_factory):
    """The 2-rank runs' reference: 1 rank, ZeRO-0, the same global batch of 32."""
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path_factory.mktemp("zero0"), "deepspeed.zero_stage=0", "data.batch_size=32", *ZERO_COMMON)
    run_worker(cfg)
    return metrics(cfg.run_dir())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_two_ranks_learn_and_agree_on_mi(tmp_path, stage, one_rank_zero0_reference):
    cfg = tiny(tmp_path, f"deepspeed.zero_stage={stage}", *ZERO_COMMON)
    res = run_world(2, _zero_run, cfg.to_dict())
    (s0, rows), (s1, _) = res
    mi0 = {k: v for k, v in s0.items() if k.startswith("mi/")}
    assert len(mi0) == 3 and mi0 == {k: v for k, v in s1.items() if k.startswith("mi/")}
    # every step's loss and MI equal the 1-rank ZeRO-0 run on the same global batch
    ref = one_rank_zero0_reference
    assert [r["data_batch"] for r in rows] == [r["data_batch"] for r in ref]
    for ours, theirs in zip(rows, ref, strict=True):
        for key in ["loss", "task_loss"] + [k for k in theirs if k.startswith("mi/")]:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (stage, ours["step"], key)
    first = sum(r["task_loss"] for r in rows[:5]) / 5
    last = sum(r["task_loss"] for r in rows[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_grad_accum_on_two_ranks_equals_the_accumulated_batch(tmp_path):
    """train.grad_accum=2 through DeepSpeed on 2 ranks (micro-batch 8 per rank)
    takes the same steps as 1 rank on the whole global batch of 32 (weight 0:
    the MI is measured every step, outside the loss, so the task path is the
    only one), and its logged MI is the mean over the 2 micro-batches."""
    from mi_scale.data import ShardedBatches, build_data
    from mi_scale.train.worker import build_objective, run_worker, seed_everything

    common = ("mi.weight=0", "mi.log_every=1", "train.steps=6", "train.lr=0.01", "train.checkpoint_every=6")
    cfg = tiny(tmp_path, "data.batch_size=8", "train.grad_accum=2", *common)
    (_, rows), _ = run_world(2, _zero_run, cfg.to_dict())
    ref_cfg = tiny(tmp_path, "data.batch_size=32", *common, name="ref")
    run_worker(ref_cfg)
    ref = metrics(ref_cfg.run_dir())
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["samples_seen"] == 6 * 32
    for ours, theirs in zip(rows, ref, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), ours["step"]
    # step 1 runs the initial model: its MI on each micro-batch of 16 global rows, by hand
    seed_everything(cfg.run.seed)
    bundle = build_data(cfg.data, cfg.run.seed)
    objective, _ = build_objective(cfg, bundle, 1)
    batches = ShardedBatches(bundle.train, 16, 0, 1, cfg.run.seed)  # global batches of 16 = the micro-batches
    per_micro = []
    with torch.no_grad():
        for _ in range(2):
            b = batches.next_batch()
            per_micro.append(objective(b["x"], b["y"], 1)[3])
    assert per_micro[0] != per_micro[1]
    for pair, value in per_micro[0].items():
        assert rows[0][f"mi/{pair}"] == pytest.approx((value + per_micro[1][pair]) / 2, rel=1e-5), pair
    assert rows[0]["mi/blocks.0->blocks.1"] != pytest.approx(ref[0]["mi/blocks.0->blocks.1"], rel=1e-3)


@pytest.mark.parametrize("case,expected", [
    (("--set", "model.kind=gpt", "--set", "model.preset=gpt-2m", "--set", "data.name=text"),
     "error: model.preset: invalid value 'gpt-2m': expected one of 'gpt-1m', 'gpt-5m', 'gpt-125m', "
     "'gpt-350m', 'gpt-1b', 'gpt-1.3b', 'gpt-7b' (did you mean 'gpt-125m'?)"),
    (("--set", "data.name=files", "--set", "data.path=/nonexistent/train.jsonl"), "error: data.path: "),
    (("--set", "data.name=hub", "--set", "data.path=some-user/some-dataset"), "error: data.path="),
])
def test_bad_inputs_fail_before_training(tmp_path, case, expected):
    r = cli("train", "--launcher", "local", "--set", f"run.output_dir={tmp_path}", *case,
            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(expected)
    assert "step " not in r.stdout
    assert not list(tmp_path.rglob("checkpoints/step-*"))


def test_gaussian_needs_more_rows_than_joint_sketch_dims(tmp_path):
    """2*sketch_dim+1 = 9 rows (batch 9 x 1 token) is refused at the first step,
    naming the three fields that fix it; 10 rows train."""
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "data.batch_size=9", "mi.sketch_dim=4", "train.steps=2", "train.checkpoint_every=1")
    config_mod.save(cfg, tmp_path / "c.yaml")
    r = cli("train", str(tmp_path / "c.yaml"), "--launcher", "local")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: mi.sketch_dim=4: the gaussian estimator needs more than 2*sketch_dim+1=9 sketched rows per step, "
        "got 9 (global batch x tokens per sample); lower mi.sketch_dim or raise data.batch_size or "
        "mi.tokens_per_sample"]
    assert not list(cfg.run_dir().rglob("step-*"))  # stopped before any step or checkpoint
    ok = tiny(tmp_path, "data.batch_size=10", "mi.sketch_dim=4", "train.steps=1", name="ok")
    assert run_worker(ok)["steps"] == 1 and len([k for k in metrics(ok.run_dir())[0] if k.startswith("mi/")]) == 3


def test_checkpoint_from_another_config_is_refused(tmp_path):
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "train.steps=5")
    run_worker(cfg)
    (cfg.run_dir() / "config.yaml").write_text(
        (cfg.run_dir() / "config.yaml").read_text().replace("width: 32", "width: 48"))
    before = (cfg.run_dir() / "metrics.jsonl").read_text()
    r = cli("resume", str(cfg.run_dir()), "--launcher", "local")
    assert r.returncode == 2
    assert "was written by a different configuration (differs in: model.width)" in r.stderr
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == before  # nothing lost or rewritten


def test_tiny_gpt_text_config_under_torchrun(tmp_path):
    cfg = config_mod.load(REPO / "configs" / "tiny-gpt-text.yaml",
                          [f"run.output_dir={tmp_path}", "train.steps=6", "train.eval_every=6",
                           "train.checkpoint_every=6", "train.log_every=2", "train.warmup_steps=0",
                           "tracking.wandb=disabled"])
    config_mod.save(cfg, tmp_path / "gpt.yaml")
    r = _torchrun(tmp_path / "gpt.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(cfg.run_dir())
    assert [x["step"] for x in rows] == list(range(1, 7))
    for x in rows:  # 2 ranks x batch 16 x seq_len 64 tokens in the step's own time
        assert x["samples_per_s"] == pytest.approx(2 * 16 / x["step_time_s"], rel=1e-9)
        assert x["tokens_per_s"] == pytest.approx(2 * 16 * 64 / x["step_time_s"], rel=1e-9)
        assert x["samples_seen"] == x["step"] * 2 * 16
    # it learns: a fresh byte-level model starts near log(256) and 6 AdamW steps lower it
    assert rows[0]["task_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert rows[-1]["task_loss"] < rows[0]["task_loss"] - 0.5
    assert len([k for k in rows[-1] if k.startswith("mi/")]) == 3  # 4 blocks -> 3 pairs
    ev = metrics(cfg.run_dir(), "eval")[-1]
    assert ev["eval_ppl"] == pytest.approx(math.exp(ev["eval_loss"]), rel=1e-9)


# -- resume at another world size (train/reshard.py) -------------------------------


def _train(rank, world, cfg_dict, resume):
    from mi_scale.train.worker import run_worker
    run_worker(config_mod.from_dict(cfg_dict), resume=resume)


@pytest.mark.parametrize("stage,old,new", [(2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2), (0, 2, 1)])
def test_resume_at_another_world_size_matches_uninterrupted(tmp_path, stage, old, new):
    """A checkpoint of `old` ranks resumed on `new` ranks continues exactly like
    a run on `new` ranks from the start: same global batch, same data order,
    Adam moments resharded (a reset optimizer would change the losses)."""
    common = (f"deepspeed.zero_stage={stage}", "train.steps=8", "train.checkpoint_every=4", "train.lr=0.01")
    ref = tiny(tmp_path, *common, f"data.batch_size={32 // new}", name="ref")
    run_world(new, _train, ref.to_dict(), False)
    part = tiny(tmp_path, *common, f"data.batch_size={32 // old}", "fault.fail_at_step=4", name="part")
    with pytest.raises(AssertionError, match="injected fault"):
        run_world(old, _train, part.to_dict(), False)
    run_world(new, _train, part.to_dict(), True)
    a, b = metrics(ref.run_dir()), metrics(part.run_dir())
    assert [r["step"] for r in b] == list(range(1, 9))  # each step logged once
    assert [r["data_batch"] for r in b] == [r["data_batch"] for r in a]
    for x, y in zip(a[4:], b[4:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
    assert b[-1]["samples_seen"] == 8 * 32
    assert config_mod.load(part.run_dir() / "config.yaml").data.batch_size == 32 // new
    if stage > 0:
        assert (part.run_dir() / "checkpoints" / "step-00000004" / "universal" / "zero").is_dir()


def test_resume_refuses_a_world_size_that_cannot_keep_the_global_batch(tmp_path):
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "data.batch_size=15", "train.steps=2", "train.checkpoint_every=2")
    run_worker(cfg)
    before = (cfg.run_dir() / "metrics.jsonl").read_text()
    # through the CLI and Ray: the workers' refusal reaches the console as one line
    r = cli("resume", str(cfg.run_dir()), "--set", "cluster.num_workers=2", "--set", "train.steps=4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"error: cluster.num_workers: invalid value 2: checkpoint {cfg.run_dir()}/checkpoints/"
        f"step-00000002 was trained with a global batch of 15 (data.batch_size=15 x 1 ranks), which 2 ranks "
        f"cannot split evenly; resume with a world size that divides 15 (e.g. cluster.num_workers in "
        f"[1, 3, 5, 15]), or start a new run"]
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == before  # nothing trained or rewritten
    assert [p.name for p in (cfg.run_dir() / "checkpoints").glob("step-*")] == ["step-00000002"]


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _plant(path: Path, marker: Path) -> None:
    """Add a pickle payload to a checkpoint file, keeping what it held."""
    state = torch.load(path, weights_only=False)
    state = state if isinstance(state, dict) else {"held": state}
    state["evil"] = _Payload(str(marker))
    torch.save(state, path)


@pytest.mark.parametrize("target,env", [
    ("rank-0000.pt", {}), ("mp_rank_00_model_states.pt", {}),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", {}),
    # the switch that turns torch's weights_only default off does not reopen it
    ("mp_rank_00_model_states.pt", {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})],
    ids=["rank-file", "model-file", "optimizer-file", "model-file-force-no-weights-only-env"])
def test_resume_refuses_a_pickle_payload_without_running_it(tmp_path, target, env):
    """Our rank file and DeepSpeed's model and optimizer files all load as
    weights_only: a planted payload is refused with a clear error and never runs."""
    cfg = tiny(tmp_path, "train.steps=2", "train.checkpoint_every=2", "deepspeed.zero_stage=2")
    from mi_scale.train.worker import run_worker
    run_worker(cfg)
    marker = tmp_path / "pwned"
    path = cfg.run_dir() / "checkpoints" / "step-00000002" / target
    _plant(path, marker)
    r = cli("resume", str(cfg.run_dir()), "--launcher", "local", "--set", "train.steps=4", env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint file {path} holds objects other than tensors and plain types"
                           if target.startswith("rank") else
                           f"error: checkpoint file {path.parent} holds objects other than tensors and plain types")
    assert last.endswith("refusing to load it, because unpickling them could run code. Resume from a checkpoint "
                         "you trust (delete this step's folder to fall back to the previous one)")
    assert not marker.exists()
    assert [r["step"] for r in metrics(cfg.run_dir())] == [1, 2]  # nothing trained or rewritten


def test_resume_refuses_a_payload_in_rank_1s_file_and_in_the_universal_files(tmp_path):
    """2 ranks: a payload in rank 1's own file stops both ranks (they agree);
    resharded onto 1 rank, a payload in the converted universal files is refused."""
    from mi_scale.train.checkpoint import UnsafeCheckpointError
    from mi_scale.train.worker import run_worker

    cfg = tiny(tmp_path, "train.steps=2", "train.checkpoint_every=2", "deepspeed.zero_stage=2")
    run_world(2, _train, cfg.to_dict(), False)
    step = cfg.run_dir() / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    rank1 = step / "rank-0001.pt"
    clean = rank1.read_bytes()
    _plant(rank1, marker)
    with pytest.raises(AssertionError) as e:
        run_world(2, _train, cfg.to_dict(), True)
    assert f"UnsafeCheckpointError: checkpoint file {rank1} holds objects other than tensors" in str(e.value)
    assert f"UnsafeCheckpointError: checkpoint {step} holds a file another rank refused to unpickle" \
        in str(e.value)  # rank 0, whose own files were clean
    assert not marker.exists()
    rank1.write_bytes(clean)
    run_worker(config_mod.from_dict(cfg.to_dict()), resume=True)  # 1 rank: converts to universal/, 0 steps
    universal = sorted((step / "universal").rglob("*.pt"))
    assert universal
    _plant(universal[0], marker)
    with pytest.raises(UnsafeCheckpointError, match=f"^checkpoint file {step} holds objects other than tensors"):
        run_worker(config_mod.from_dict(cfg.to_dict()), resume=True)
    assert not marker.exists()
    assert [r["step"] for r in metrics(cfg.run_dir())] == [1, 2]


def test_corrupt_rank_1_file_is_skipped_by_both_ranks(tmp_path):
    """Only rank 1's file of the newest checkpoint is corrupt: both ranks
    agree to fall back to the previous one and continue exactly."""
    from mi_scale.train.checkpoint import complete_checkpoints

    cfg = tiny(tmp_path, "train.steps=10")  # checkpoints at steps 5 and 10
    run_world(2, _train, cfg.to_dict(), False)
    uninterrupted = metrics(cfg.run_dir())
    newest, previous = complete_checkpoints(cfg.run_dir())
    assert (newest.name, previous.name) == ("step-00000010", "step-00000005")
    rank1 = newest / "rank-0001.pt"
    rank1.write_bytes(rank1.read_bytes()[:100])  # truncated
    run_world(2, _train, cfg.to_dict(), True)  # steps=10: redoes 6..10 from step 5
    again = metrics(cfg.run_dir())
    assert [r["step"] for r in again] == list(range(1, 11))
    assert [r["loss"] for r in again] == [r["loss"] for r in uninterrupted]
    assert [r["data_batch"] for r in again] == [r["data_batch"] for r in uninterrupted]


def test_hf_model_trains_through_the_worker_with_deepspeed_and_mi(tmp_path):
    """model.kind=hf (a 2-layer GPT-2 from transformers) under ZeRO-2 with the
    MI term between its blocks: the term is in the loss and the model learns."""
    transformers = pytest.importorskip("transformers")
    from mi_scale.train.worker import run_worker

    hf_dir = tmp_path / "tiny-gpt2"
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                            bos_token_id=0, eos_token_id=0).save_pretrained(hf_dir)
    cfg = tiny(tmp_path, "model.kind=hf", f"model.hf_name_or_path={hf_dir}", "data.name=text", "data.seq_len=16",
               "data.batch_size=8", "mi.sketch_dim=4", "mi.tokens_per_sample=4", "mi.weight=0.5", "mi.log_every=1",
               "deepspeed.zero_stage=2", "train.steps=8", "train.lr=0.01", "train.warmup_steps=0",
               "train.checkpoint_every=8", "train.eval_every=8", "train.eval_batches=1", name="hf")
    run_worker(cfg)
    rows = metrics(cfg.run_dir())
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert list(k for k in r if k.startswith("mi/")) == ["mi/transformer.h.0->transformer.h.1"]
        mi = r["mi/transformer.h.0->transformer.h.1"]
        assert mi > 0 and r["mi_loss"] == pytest.approx(-0.5 * mi, rel=1e-5)  # -weight x MI, in the loss
        assert r["loss"] == pytest.approx(r["task_loss"] + r["mi_loss"], rel=1e-6)
    assert rows[0]["task_loss"] == pytest.approx(math.log(256), abs=0.2)
    assert rows[-1]["task_loss"] < rows[0]["task_loss"] - 0.3
    states = torch.load(next((cfg.run_dir() / "checkpoints").rglob("mp_rank_00_model_states.pt")),
                        weights_only=False)["module"]
    assert "model.transformer.h.0.attn.c_attn.weight" in states  # the objective's model, Hugging Face names
