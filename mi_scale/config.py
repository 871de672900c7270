"""Typed, validated run configuration.

One `Config` object holds every section. It is built from YAML plus dotted
command-line overrides (`--set mi.weight=0.1`) and validated before any work
starts: unknown keys (with a close-match suggestion), wrong types and
out-of-range values raise `ConfigError` naming the field path, the bad value
and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mi_scale.errors import UserFixableError


class ConfigError(UserFixableError, ValueError):
    """A user-fixable configuration problem; the message names field and fix."""


def _check(cond: bool, path: str, value: Any, hint: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: invalid value {value!r}: {hint}")


@dataclass
class RunConfig:
    name: str = "mnist1d-mlp"
    group: Optional[str] = None  # experiment arm; report and wandb group runs by it
    seed: int = 0
    output_dir: str = "runs"

    def validate(self, p: str) -> None:
        _check(bool(self.name) and "/" not in self.name, f"{p}.name", self.name,
               "use a non-empty name without '/'")
        _check(self.seed >= 0, f"{p}.seed", self.seed, "use a seed >= 0")


@dataclass
class ModelConfig:
    kind: Literal["mlp", "gpt", "hf"] = "mlp"
    # mlp
    depth: int = 8
    width: int = 128
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    residual: bool = False
    norm: Literal["none", "layernorm"] = "none"
    # gpt: a preset name from mi_scale.models.gpt.PRESETS
    preset: str = "gpt-1m"
    # hf: a transformers config name or local path, built with from_config
    hf_name_or_path: Optional[str] = None  # default for kind=hf: init_from
    dropout: float = 0.0
    # start from these weights (optimizer fresh): a mi-scale run dir, a dir
    # written by `mi-scale export`, or a local Hugging Face model dir
    # (GPT-2 format for kind=gpt); train/init_from.py
    init_from: Optional[str] = None

    def validate(self, p: str) -> None:
        _check(self.depth >= 1, f"{p}.depth", self.depth, "use depth >= 1")
        _check(self.width >= 1, f"{p}.width", self.width, "use width >= 1")
        _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", self.dropout, "use 0 <= dropout < 1")
        if self.kind == "hf":
            if not self.hf_name_or_path and self.init_from:
                self.hf_name_or_path = self.init_from  # the model dir holds the config too
            _check(bool(self.hf_name_or_path), f"{p}.hf_name_or_path", self.hf_name_or_path,
                   "model.kind=hf needs a transformers config name or local path (or model.init_from)")


@dataclass
class DataConfig:
    # mnist1d | digits | text (bundled corpus) | files (local) | hub (HF hub name)
    name: Literal["mnist1d", "digits", "text", "files", "hub"] = "mnist1d"
    path: Optional[str] = None  # local file(s) for `files`, dataset id for `hub`
    format: Optional[Literal["json", "jsonl", "csv", "parquet", "text"]] = None
    text_field: str = "text"
    label_field: str = "label"
    seq_len: int = 64
    tokenizer: str = "byte"  # "byte" or a local Hugging Face tokenizer path
    test_fraction: float = 0.1  # held-out split when the source has none
    # LM text: whole documents are held out, drawn with split_seed (not run.seed, so
    # runs of every seed share one prepared corpus and one validation set)
    split_seed: int = 0
    # LM text is tokenized once into a token file under prepared_dir (default: the
    # user's cache); put it on storage every node sees. Neither blocks a resume.
    prepared_dir: Optional[str] = None
    num_proc: Optional[int] = None  # tokenizing processes (default: 1 for small text, else cores)
    batch_size: int = 64  # per-rank micro-batch
    shuffle: bool = True

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "use batch_size >= 1")
        _check(self.seq_len >= 2, f"{p}.seq_len", self.seq_len, "use seq_len >= 2")
        _check(0.0 < self.test_fraction < 1.0, f"{p}.test_fraction", self.test_fraction,
               "use 0 < test_fraction < 1")
        _check(self.split_seed >= 0, f"{p}.split_seed", self.split_seed, "use split_seed >= 0")
        _check(self.num_proc is None or self.num_proc >= 1, f"{p}.num_proc", self.num_proc,
               "use num_proc >= 1, or leave it unset")
        if self.name in ("files", "hub"):
            _check(bool(self.path), f"{p}.path", self.path,
                   f"data.name={self.name} needs data.path (a local file or a hub dataset id)")


@dataclass
class MIConfig:
    weight: float = 0.001  # > 0 raises inter-layer MI, < 0 lowers it, 0 = monitor only
    estimator: Literal["gaussian", "renyi2", "infonce", "hsic", "ksg"] = "gaussian"
    estimator_kwargs: dict = field(default_factory=dict)
    sketch: Literal["random", "learned"] = "random"
    sketch_dim: int = 16
    tokens_per_sample: int = 8
    layers: list = field(default_factory=lambda: ["blocks.*"])
    every: int = 1  # compute (and apply) the term every N steps
    log_every: int = 1  # steps at which MI is measured without gradient for logging
    warmup_steps: int = 0  # linear ramp of the weight from 0
    pair_weights: Optional[list] = None  # per-pair multipliers, len = number of pairs
    # NaN/Inf in a hooked layer's sketches: error = stop naming the layer pair
    # and step; skip = drop the MI term for that step (counted in metrics.jsonl
    # as mi_skipped_nonfinite). Not part of the checkpoint compatibility keys.
    on_nonfinite: Literal["error", "skip"] = "error"
    # deep_supervision: replace the MI term by per-layer label probes whose
    # gradient norm at the hooked layers matches the term's (train/control.py)
    control: Literal["none", "deep_supervision"] = "none"

    def validate(self, p: str) -> None:
        _check(self.sketch_dim >= 1, f"{p}.sketch_dim", self.sketch_dim, "use sketch_dim >= 1")
        _check(self.tokens_per_sample >= 1, f"{p}.tokens_per_sample", self.tokens_per_sample,
               "use tokens_per_sample >= 1")
        _check(self.every >= 1, f"{p}.every", self.every, "use every >= 1")
        _check(self.log_every >= 1, f"{p}.log_every", self.log_every, "use log_every >= 1")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "use warmup_steps >= 0")
        _check(len(self.layers) >= 2 or any("*" in s or "?" in s for s in self.layers),
               f"{p}.layers", self.layers, "name at least two layers (or a glob like 'blocks.*')")
        _check(all(isinstance(s, str) for s in self.layers), f"{p}.layers", self.layers,
               "use a list of module names or glob patterns (strings)")
        _check(self.weight == 0 or self.estimator != "ksg", f"{p}.estimator", self.estimator,
               "ksg is not differentiable: use it with mi.weight=0 (monitoring) or pick gaussian")
        if self.pair_weights is not None:
            _check(all(isinstance(w, (int, float)) for w in self.pair_weights),
                   f"{p}.pair_weights", self.pair_weights, "use a list of numbers")


@dataclass
class TrainConfig:
    steps: int = 600
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    # auto: bf16 on a GPU that supports it, fp32 on CPU (where bf16 matmuls
    # were measured 100x slower than fp32; `mi-scale bench peak` shows yours)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_batches: int = 0  # 0 = whole held-out split
    log_every: int = 50
    checkpoint_every: int = 200
    keep_last: int = 2

    def validate(self, p: str) -> None:
        _check(self.steps >= 1, f"{p}.steps", self.steps, "use steps >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "use a learning rate > 0, e.g. 1e-3")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "use weight_decay >= 0")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "use warmup_steps >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", self.min_lr_ratio, "use 0 <= min_lr_ratio <= 1")
        _check(self.grad_clip >= 0, f"{p}.grad_clip", self.grad_clip, "use grad_clip >= 0 (0 disables)")
        _check(self.grad_accum >= 1, f"{p}.grad_accum", self.grad_accum, "use grad_accum >= 1")
        for name in ("eval_every", "log_every", "checkpoint_every", "keep_last"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, f"use {name} >= 1")


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    # where ZeRO keeps optimizer state (+ fp32 master weights) and, at stage 3,
    # parameters: none (the device), cpu (host RAM), nvme (files under
    # nvme_path, ZeRO-Infinity; needs libaio). true/false mean cpu/none.
    offload_optimizer: Literal["none", "cpu", "nvme"] | bool = "none"
    offload_params: Literal["none", "cpu", "nvme"] | bool = "none"
    nvme_path: Optional[str] = None  # default: <run dir>/offload (use a local SSD)
    # elements per communication bucket; None sizes them from the model and
    # the memory (mi_scale/train/memory.py) instead of DeepSpeed's GPU defaults
    bucket_elements: Optional[int] = None
    extra: dict = field(default_factory=dict)  # merged last into the DeepSpeed JSON

    def __post_init__(self):
        for name in ("offload_optimizer", "offload_params"):
            v = getattr(self, name)
            if isinstance(v, bool):
                setattr(self, name, "cpu" if v else "none")

    def validate(self, p: str) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", self.zero_stage, "use 0, 1, 2 or 3")
        _check(self.offload_params == "none" or self.zero_stage == 3, f"{p}.offload_params",
               self.offload_params, "parameter offload needs deepspeed.zero_stage=3")
        _check(self.offload_optimizer == "none" or self.zero_stage >= 1, f"{p}.offload_optimizer",
               self.offload_optimizer, "optimizer offload needs deepspeed.zero_stage >= 1")
        _check(self.offload_optimizer != "nvme" or self.zero_stage == 3, f"{p}.offload_optimizer",
               self.offload_optimizer, "NVMe offload (ZeRO-Infinity) needs deepspeed.zero_stage=3")
        _check(self.bucket_elements is None or self.bucket_elements >= 1, f"{p}.bucket_elements",
               self.bucket_elements, "use a positive element count, or null to size from the model")


@dataclass
class TrackingConfig:
    wandb: Literal["online", "offline", "disabled"] = "offline"
    project: str = "mi-scale"
    heatmap_every: int = 100
    progress: bool = True
    # at the end of training, export the final checkpoint to RUN_DIR/export/
    # and log it as a wandb model artifact (a reference in offline mode)
    log_model: bool = False

    def validate(self, p: str) -> None:
        _check(self.heatmap_every >= 1, f"{p}.heatmap_every", self.heatmap_every, "use heatmap_every >= 1")


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None = embedded local Ray; "auto" or "ray://host:port"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0
    storage_path: Optional[str] = None  # default: <output_dir>; may be s3:// or gs://
    ray_temp_dir: Optional[str] = None  # default: a short dir under /tmp (AF_UNIX path limit)
    # bind gloo/NCCL to the interface of each node's Ray IP unless *_SOCKET_IFNAME is set (network.py)
    bind_interface: bool = True
    # seconds the driver gives the workers, after Ctrl-C or SIGTERM, to reach a step
    # boundary and write a checkpoint before it stops at once (SLURM and Kubernetes allow 30)
    stop_grace_s: float = 25.0
    # a lost node: carry on with the workers the nodes left can hold (node_loss.py), at least min_workers
    elastic: bool = False
    min_workers: int = 1

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", self.num_workers, "use num_workers >= 1")
        _check(self.cpus_per_worker >= 1, f"{p}.cpus_per_worker", self.cpus_per_worker,
               "use cpus_per_worker >= 1")
        _check(self.max_failures >= -1, f"{p}.max_failures", self.max_failures,
               "use max_failures >= 0 (or -1 for unlimited)")
        _check(1 <= self.min_workers <= self.num_workers, f"{p}.min_workers", self.min_workers,
               "use 1 <= min_workers <= num_workers")
        _check(self.stop_grace_s > 0, f"{p}.stop_grace_s", self.stop_grace_s, "use stop_grace_s > 0 (seconds)")


@dataclass
class FaultConfig:
    """Test-only fault injection: one worker raises, or is killed, once at a chosen step."""
    fail_at_step: Optional[int] = None
    fail_rank: int = 0
    # kill the process (no cleanup) while writing the checkpoint of this step
    kill_during_checkpoint: Optional[int] = None
    # rank fail_rank kills its own process with SIGKILL once, at the start of this step
    kill_at_step: Optional[int] = None
    # rank fail_rank stops making progress once, at the start of this step, until
    # the process is killed (a test's fixed point at which to kill the driver)
    stall_at_step: Optional[int] = None
    # rank fail_rank waits at the start of this step until it is told to stop
    # (a signal, or the driver's stop request): a test's fixed point for a stop signal
    wait_for_stop_at_step: Optional[int] = None
    # the rank on the node with this IP is fail_rank (a test's way to fault the rank on a given host)
    fail_node: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mi: MIConfig = field(default_factory=MIConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        # the control's autograd.grad inside forward (train/control.py) cannot run under ZeRO-3's hooks
        _check(self.mi.control == "none" or self.deepspeed.zero_stage != 3, "mi.control", self.mi.control,
               "the matched-gradient control cannot run at deepspeed.zero_stage=3: use stage 0, 1 or 2")
        _check(self.mi.control == "none" or self.mi.weight != 0, "mi.weight", self.mi.weight,
               "mi.control=deep_supervision matches the MI term's gradient at mi.weight: set a nonzero weight")
        _check(not self.tracking.log_model or self.model.kind in ("gpt", "hf"), "tracking.log_model",
               self.tracking.log_model, "exported models are language models: use it with model.kind gpt or hf")
        _check(not self.tracking.log_model or self.tracking.wandb != "disabled", "tracking.log_model",
               self.tracking.log_model, "the artifact goes to wandb: set tracking.wandb=offline or online")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def training_keys(self) -> dict:
        """What must match for a checkpoint to resume, as flat dotted keys:
        model, data, MI term and optimizer shape. Steps, logging, tracking and
        cluster settings may change."""
        d = self.to_dict()
        keys = {f"{sec}.{k}": v for sec in ("model", "data", "mi") for k, v in d[sec].items()
                if (sec, k) not in {("mi", "log_every"), ("mi", "on_nonfinite"), ("data", "prepared_dir"),
                                    ("data", "num_proc")}}
        keys.update({f"train.{k}": d["train"][k] for k in ("lr", "weight_decay", "grad_accum", "precision")})
        keys.update({"deepspeed.zero_stage": d["deepspeed"]["zero_stage"], "run.seed": d["run"]["seed"]})
        return keys

    def training_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.training_keys(), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Building a Config from plain data, with typed checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{path}: invalid value {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: invalid value {value!r}: expected one of "
                          f"{', '.join(repr(a) for a in args)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{path}: invalid value {value!r} ({type(value).__name__}): "
                      f"expected {_type_name(tp)}")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown field ({hint})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, where)
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 0.1 -> float, true -> bool, [a,b] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set mi.weight=0.1")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return data


def from_dict(data: dict | None) -> Config:
    return _build(Config, data or {}, "").validate()


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the embedded default when path is None) plus overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found: pass an existing YAML path "
                              f"(examples live in configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    return from_dict(apply_overrides(data, overrides or []))


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
