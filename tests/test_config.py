"""Config: malformed input is rejected with the field path, value and fix."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
import sys

import pytest

from mi_scale import config
from mi_scale.config import ConfigError

BAD = [
    ({"mi": {"wieght": 0.1}}, "mi.wieght: unknown field (did you mean 'weight'?)"),
    ({"trian": {}}, "trian: unknown field (did you mean 'train'?)"),
    ({"mi": {"weight": "high"}}, "mi.weight: invalid value 'high' (str): expected float"),
    ({"train": {"steps": 1.5}}, "train.steps: invalid value 1.5 (float): expected int"),
    ({"train": {"steps": 0}}, "train.steps: invalid value 0: use steps >= 1"),
    ({"train": {"lr": -1e-3}}, "train.lr: invalid value -0.001: use a learning rate > 0, e.g. 1e-3"),
    ({"mi": {"estimator": "gausian"}},
     "mi.estimator: invalid value 'gausian': expected one of 'gaussian', 'renyi2', 'infonce', 'hsic', 'ksg' "
     "(did you mean 'gaussian'?)"),
    ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: invalid value 4: use 0, 1, 2 or 3"),
    ({"deepspeed": {"offload_params": True}},
     "deepspeed.offload_params: invalid value 'cpu': parameter offload needs deepspeed.zero_stage=3"),
    ({"deepspeed": {"offload_optimizer": "nvme", "zero_stage": 2}},
     "deepspeed.offload_optimizer: invalid value 'nvme': NVMe offload (ZeRO-Infinity) needs deepspeed.zero_stage=3"),
    ({"deepspeed": {"offload_optimizer": "disk", "zero_stage": 3}},
     "deepspeed.offload_optimizer: invalid value 'disk': expected 'none' | 'cpu' | 'nvme' | bool"),
    ({"train": {"precision": "fp16"}},
     "train.precision: invalid value 'fp16': expected one of 'auto', 'fp32', 'bf16' (did you mean 'bf16'?)"),
    ({"mi": {"weight": 0.1, "estimator": "ksg"}},
     "mi.estimator: invalid value 'ksg': ksg is not differentiable: use it with mi.weight=0 (monitoring) "
     "or pick gaussian"),
    ({"data": {"name": "files"}},
     "data.path: invalid value None: data.name=files needs data.path (a local file or a hub dataset id)"),
    ({"cluster": {"num_workers": 0}}, "cluster.num_workers: invalid value 0: use num_workers >= 1"),
    ({"tracking": {"wandb": "yes"}},
     "tracking.wandb: invalid value 'yes': expected one of 'online', 'offline', 'disabled'"),
    ({"model": "mlp"}, "model: expected a mapping of fields, got 'mlp'"),
    ({"train": {"grad_accum": True}}, "train.grad_accum: invalid value True (bool): expected int"),
    ({"mi": {"layers": ["blocks.0"]}},
     "mi.layers: invalid value ['blocks.0']: name at least two layers (or a glob like 'blocks.*')"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_malformed_config_rejected_with_field_and_fix(data, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert str(e.value) == message


def test_overrides_are_typed_yaml_scalars(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mi:\n  weight: 0.5\ntrain:\n  steps: 20\n")
    cfg = config.load(p, ["mi.weight=0.1", "train.activation_checkpointing=true",
                          "mi.layers=[blocks.0, blocks.2]", "cluster.address=auto"])
    assert cfg.mi.weight == 0.1 and cfg.train.steps == 20
    assert cfg.train.activation_checkpointing is True
    assert cfg.mi.layers == ["blocks.0", "blocks.2"] and cfg.cluster.address == "auto"
    with pytest.raises(ConfigError, match=r"^--set 'mi.weight': expected KEY=VALUE"):
        config.load(p, ["mi.weight"])


def test_round_trip_and_training_hash(tmp_path):
    cfg = config.load(None, ["mi.weight=0.2"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg and again.training_hash() == cfg.training_hash()
    # steps and cluster may change on resume; the model may not
    assert config.load(None, ["mi.weight=0.2", "train.steps=999", "cluster.num_workers=1"]).training_hash() \
        == cfg.training_hash()
    assert config.load(None, ["mi.weight=0.2", "model.width=64"]).training_hash() != cfg.training_hash()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mi: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(bad)


def test_cli_exits_nonzero_with_one_line_error():
    r = subprocess.run([sys.executable, "-m", "mi_scale.cli", "train", "--set", "mi.wieght=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: mi.wieght: unknown field (did you mean 'weight'?)"


COMMANDS = ["train", "resume", "prepare", "report", "sweep", "bench", "mi-check", "plan", "export", "generate", "eval"]


def test_cli_help_lists_subcommands(capsys):
    r = subprocess.run([sys.executable, "-m", "mi_scale.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: mi-scale [-h] COMMAND ...\n")
    # argparse's subcommand list: "    NAME   help" lines under "positional arguments"
    section = r.stdout.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0]
    listed = [m[1] for m in re.finditer(r"^    (\S+) +\S", section, re.M)]
    assert listed == COMMANDS
    from mi_scale import cli
    for cmd in COMMANDS:  # each has its own help
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: mi-scale {cmd} ")


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = sorted(root.glob("*.yaml"))
    assert [p.name for p in shipped] == ["gpt-125m-zero3.yaml", "mnist1d-mlp.yaml", "tiny-gpt-text.yaml"]
    for p in shipped:
        config.load(p)
    # the embedded default is what configs/mnist1d-mlp.yaml spells out
    assert config.load(root / "mnist1d-mlp.yaml") == config.load(None)


def test_mi_on_nonfinite_validated_and_not_in_checkpoint_hash():
    cfg = config.load(None, [])
    assert cfg.mi.on_nonfinite == "error"
    skip = config.load(None, ["mi.on_nonfinite=skip"])
    assert skip.mi.on_nonfinite == "skip" and skip.training_hash() == cfg.training_hash()
    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["mi.on_nonfinite=ignore"])
    assert str(e.value) == "mi.on_nonfinite: invalid value 'ignore': expected one of 'error', 'skip'"


# -- which settings a resume may change (README "Runs, checkpoints, resume") -------------


def _fields(cfg) -> list[str]:
    import dataclasses
    return [f"{sec.name}.{f.name}" for sec in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, sec.name))]


BASE = config.load(None, [])
# the checkpoint's identity: model, data, MI term (but its logging) and the optimizer
IDENTITY = [k for k in _fields(BASE) if k.split(".")[0] in ("model", "data", "mi")
            and k not in ("mi.log_every", "mi.on_nonfinite", "data.prepared_dir", "data.num_proc")]
IDENTITY += ["train.lr", "train.weight_decay", "train.grad_accum", "train.precision", "deepspeed.zero_stage",
             "run.seed"]
# what README says may change on resume
RESUMABLE = [k for k in _fields(BASE) if k.split(".")[0] in ("tracking", "cluster", "fault")]
RESUMABLE += ["train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_last",
              "train.eval_batches", "mi.log_every", "data.prepared_dir", "data.num_proc"]
# neither: not part of the checkpoint's identity, yet `resume --set` refuses them
NEITHER = ["run.name", "run.group", "run.output_dir", "mi.on_nonfinite", "train.warmup_steps",
           "train.min_lr_ratio", "train.grad_clip", "train.activation_checkpointing", "deepspeed.offload_optimizer",
           "deepspeed.offload_params", "deepspeed.nvme_path", "deepspeed.bucket_elements", "deepspeed.extra"]


def _changed(cfg, key: str):
    """A copy of cfg with `key` set to another value of its type (not validated)."""
    import copy
    cfg = copy.deepcopy(cfg)
    sec, name = key.split(".")
    v = getattr(getattr(cfg, sec), name)
    other = (not v if isinstance(v, bool) else v + 1 if isinstance(v, (int, float)) else v + "-x"
             if isinstance(v, str) else [*v, "x"] if isinstance(v, list) else {**v, "x": 1}
             if isinstance(v, dict) else 1)
    setattr(getattr(cfg, sec), name, other)
    return cfg


def test_every_setting_is_classified_for_resume():
    assert sorted(IDENTITY + RESUMABLE + NEITHER) == sorted(_fields(BASE))
    assert set(BASE.training_keys()) == set(IDENTITY)


@pytest.mark.parametrize("key", IDENTITY)
def test_resume_refuses_a_change_of(key):
    from mi_scale.launcher import check_resume_overrides
    from mi_scale.train.checkpoint import CheckpointError, check_compatible

    meta = {"training_keys": BASE.training_keys(), "world_size": 1}
    with pytest.raises(CheckpointError) as e:
        check_compatible(meta, 1, Path("ckpt"), _changed(BASE, key).training_keys())
    assert str(e.value) == (f"checkpoint ckpt was written by a different configuration (differs in: {key}); "
                            "resume with the run's own config.yaml, or start a new run with another run.name")
    with pytest.raises(ConfigError) as e:
        check_resume_overrides([f"{key}=1"])
    assert str(e.value).startswith(f"--set {key}: cannot change on resume")


@pytest.mark.parametrize("key", RESUMABLE)
def test_resume_accepts_a_change_of(key):
    from mi_scale.launcher import check_resume_overrides
    from mi_scale.train.checkpoint import check_compatible

    changed = _changed(BASE, key)
    assert changed.to_dict() != BASE.to_dict()
    assert changed.training_hash() == BASE.training_hash()
    check_compatible({"training_keys": BASE.training_keys(), "world_size": 1}, 1, Path("ckpt"),
                     changed.training_keys())
    check_resume_overrides([f"{key}=1"])
