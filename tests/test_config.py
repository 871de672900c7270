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


COMMANDS = ["train", "resume", "report", "sweep", "bench", "mi-check", "plan", "export"]


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
