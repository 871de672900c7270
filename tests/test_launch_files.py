"""Checks for the operator-facing files in launch/.

The cloud, Kubernetes and SLURM files cannot run here, so these tests pin what
can be checked offline: each YAML parses and carries the keys its tool needs
(the Ray launcher configs also pass Ray's own cluster-config schema), the
shell scripts pass `bash -n` and shellcheck, and the SLURM and job-submit
scripts build the right command lines when srun / scontrol / ray / mi-scale
are replaced by stubs that record their arguments. Every `--set` key the
files pass to mi-scale must be a real config field.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mi_scale import config as mi_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CLUSTER_YAMLS = {"aws": LAUNCH / "ray-cluster-aws.yaml", "gcp": LAUNCH / "ray-cluster-gcp.yaml"}
RAYJOB = LAUNCH / "kuberay-rayjob.yaml"
SLURM = LAUNCH / "slurm.sbatch"
SUBMIT = LAUNCH / "ray-job-submit.sh"
SCRIPTS = [SLURM, SUBMIT]
ALL_FILES = [*CLUSTER_YAMLS.values(), RAYJOB, *SCRIPTS]
SHELL_FILES = [*SCRIPTS, *sorted((ROOT / "scripts").glob("*.sh"))]  # launch + set-up/test scripts


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} must be one YAML mapping"
    return data


def _set_values(argv: list[str]) -> list[str]:
    """The KEY=VALUE arguments that follow each --set in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def _assert_known_overrides(sets: list[str]) -> None:
    """Every --set key names a real config field (ConfigError otherwise)."""
    assert sets, "expected some --set overrides"
    mi_config.from_dict(mi_config.apply_overrides({}, sets))


# ---------------------------------------------------------------------------
# Ray cluster launcher configs


GPU_TYPE_PREFIX = {"aws": ("g5.", "p4d."), "gcp": ("a2-",)}


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_config_required_keys(cloud):
    cfg = _load(CLUSTER_YAMLS[cloud])
    assert cfg["cluster_name"]
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1
    provider = cfg["provider"]
    assert provider["type"] == cloud
    assert provider["region"]
    if cloud == "gcp":
        assert provider["project_id"]
        assert provider["availability_zone"].startswith(provider["region"])
    assert cfg["auth"]["ssh_user"]

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node_type in types.items():
        assert isinstance(node_type["node_config"], dict) and node_type["node_config"], name
        assert isinstance(node_type["resources"], dict), name
        if name != cfg["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name

    type_key = "InstanceType" if cloud == "aws" else "machineType"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no node type advertises GPUs"
    for name, node_type in gpu_types.items():
        assert node_type["node_config"][type_key].startswith(GPU_TYPE_PREFIX[cloud]), name
    assert any(t["max_workers"] > 0 for t in gpu_types.values()), "every GPU node type is disabled"
    if cloud == "gcp":
        for name, node_type in gpu_types.items():
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name

    setup = " ; ".join(cfg["setup_commands"])
    assert "pip install" in setup and "mi-scale" in setup and "ray[" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_config_passes_ray_schema(cloud):
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _load(CLUSTER_YAMLS[cloud])
    util.validate_config(cfg)
    # What `ray up` does before touching the cloud: merge provider defaults, recheck.
    prepared = util.prepare_config(json.loads(json.dumps(cfg)))
    util.validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # The validator does reject a misspelled top-level key.
    bad = dict(cfg)
    bad["setup_command"] = bad.pop("setup_commands")
    with pytest.raises(Exception, match="setup_command"):
        util.validate_config(bad)


# ---------------------------------------------------------------------------
# KubeRay RayJob


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_manifest():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["mi-scale", "train"]
    assert argv[argv.index("--address") + 1] == "auto"
    sets = dict(s.split("=", 1) for s in _set_values(argv))
    _assert_known_overrides(_set_values(argv))

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    head_containers = _containers(head)
    assert head_containers and head_containers[0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers

    # num_workers matches the GPUs the worker pods ask for.
    total_gpus = 0
    for group in workers:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group["template"]):
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            total_gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
    assert int(sets["cluster.num_workers"]) == total_gpus
    assert sets["cluster.use_gpu"] == "true"
    assert sets["cluster.storage_path"].startswith(("s3://", "gs://"))
    assert sets["tracking.wandb"] == "online"

    # WANDB_API_KEY comes from a Secret in every container of the cluster.
    all_pods = [head] + [g["template"] for g in workers]
    for pod in all_pods:
        for c in _containers(pod):
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], c["name"]

    # The config file the entrypoint names is mounted on the head (from a
    # ConfigMap), and run.output_dir lies on a volume every pod mounts.
    config_path = argv[2]
    output_dir = sets["run.output_dir"]
    for pod in all_pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in _containers(pod) for m in c.get("volumeMounts", [])}
        shared = [p for p in mounts if output_dir.startswith(p.rstrip("/") + "/")]
        assert shared, f"run.output_dir={output_dir} is not on a mounted volume"
        assert "persistentVolumeClaim" in volumes[mounts[shared[0]]]
    head_mounts = {m["mountPath"]: m["name"] for m in head_containers[0]["volumeMounts"]}
    config_dir = str(Path(config_path).parent)
    assert config_dir in head_mounts
    head_volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    assert "configMap" in head_volumes[head_mounts[config_dir]]


# ---------------------------------------------------------------------------
# Shell scripts: syntax and lint


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_script_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


# scripts/setup.sh installs shellcheck where it can (root with apt)
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_script_shellcheck(script):
    r = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", [*CLUSTER_YAMLS.values(), RAYJOB], ids=lambda p: p.name)
def test_every_launch_file_runs_mi_scale_train(path):
    """The command each YAML gives (the cloud files in their usage comment, the
    RayJob as its entrypoint) parses with mi-scale's own CLI as a train on the
    running cluster with real config fields. The scripts' command lines are
    checked as run, against stubs, below."""
    from mi_scale import cli
    if path == RAYJOB:
        commands = [_load(RAYJOB)["spec"]["entrypoint"]]
    else:
        commands = re.findall(r"'(mi-scale train [^']*)'", path.read_text())
    assert len(commands) == 1, commands
    argv = shlex.split(commands[0])
    assert argv[0] == "mi-scale"
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.address, args.launcher) == ("train", "auto", "ray")
    assert args.config.endswith(".yaml")
    cfg = mi_config.load(None, args.overrides)  # real fields, valid values
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == 8


def test_readme_covers_every_launch_file_and_topic():
    text = (LAUNCH / "README.md").read_text()
    for path in LAUNCH.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in text, f"launch/README.md does not mention {path.name}"
    for topic in ("WANDB_API_KEY", "cluster.storage_path", "data.path", "mi-scale resume RUN_DIR --address auto",
                  "s3://", "gs://", "templates", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN"):
        assert topic in text, topic


# ---------------------------------------------------------------------------
# Scripts run against stub cluster tools


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """A bin dir of recording stubs, a log dir, and a clean environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _stub(bin_dir, "scontrol", 'printf "%s\\n" $STUB_NODES')
    _stub(bin_dir, "srun", 'echo "$*" >> "$STUB_LOG/srun"')
    # The SLURM script counts live Ray nodes with a python3 snippet.
    _stub(bin_dir, "python3", 'cat >/dev/null; echo "$STUB_ALIVE"')
    _stub(bin_dir, "mi-scale",
          'printf "%s\\n" "$@" > "$STUB_LOG/mi-scale"; echo "$RAY_ADDRESS" > "$STUB_LOG/ray_address"; '
          'exit "${STUB_RC:-0}"')
    _stub(bin_dir, "ray", 'printf "%s\\n" "$@" > "$STUB_LOG/ray"')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), "LANG": "C"}
    return env, log, bin_dir


def _run_slurm(tmp_path, env, *args, **extra):
    (tmp_path / "my-run.yaml").write_text("run:\n  name: my-run\n")
    env = {**env, "SLURM_JOB_NODELIST": "node[1-3]", "SLURMD_NODENAME": "node1", "SLURM_JOB_ID": "42",
           "SLURM_CPUS_PER_TASK": "8", "RAY_HEAD_IP": "10.0.0.1", "STUB_NODES": "node1 node2 node3",
           "STUB_ALIVE": "3", **extra}
    return subprocess.run(["bash", str(SLURM), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_slurm_starts_ray_trains_and_stops(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_slurm(tmp_path, env, "my-run.yaml", "--set", "mi.weight=0.1", SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stdout + r.stderr

    srun = _lines(log / "srun")
    assert len(srun) == 3, srun
    head, workers, stop = srun
    assert "--nodelist=node1" in head and "ray start --head" in head
    assert "--node-ip-address=10.0.0.1" in head and "--port=6379" in head
    assert "--num-gpus=4" in head and "--num-cpus=8" in head and "--block" in head
    assert "--nodelist=node2,node3" in workers and "--nodes=2" in workers
    assert "ray start --address=10.0.0.1:6379" in workers and "--num-gpus=4" in workers
    assert "--nodes=3" in stop and stop.endswith("ray stop --force")

    argv = _lines(log / "mi-scale")
    assert argv == ["train", "my-run.yaml", "--address", "auto",
                    "--set", "cluster.num_workers=12", "--set", "cluster.use_gpu=true",
                    "--set", "mi.weight=0.1"]
    assert _lines(log / "ray_address") == ["10.0.0.1:6379"]
    _assert_known_overrides(_set_values(argv))


def test_slurm_cpu_only_and_optional_overrides(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_slurm(tmp_path, env, "my-run.yaml", OUTPUT_DIR="/shared/runs",
                   STORAGE_PATH="s3://bucket/mi", WANDB_API_KEY="k-1")
    assert r.returncode == 0, r.stdout + r.stderr
    argv = _lines(log / "mi-scale")
    assert _set_values(argv) == ["cluster.num_workers=3", "cluster.use_gpu=false",
                                 "run.output_dir=/shared/runs", "cluster.storage_path=s3://bucket/mi",
                                 "tracking.wandb=online"]
    assert "--num-gpus=0" in _lines(log / "srun")[0]
    _assert_known_overrides(_set_values(argv))


def test_slurm_resumes_a_run_directory(tmp_path, stubs):
    env, log, _ = stubs
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    r = _run_slurm(tmp_path, env, "runs/my-run", SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _lines(log / "mi-scale") == ["resume", "runs/my-run", "--address", "auto"]


def test_slurm_gives_up_when_nodes_do_not_join_and_still_stops_ray(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_slurm(tmp_path, env, "my-run.yaml", STUB_ALIVE="1", RAY_WAIT_S="0")
    assert r.returncode != 0
    assert "only 1/3 Ray node(s) joined" in r.stderr
    assert not (log / "mi-scale").exists()
    assert _lines(log / "srun")[-1].endswith("ray stop --force")


def test_slurm_propagates_training_failure_and_stops_ray(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_slurm(tmp_path, env, "my-run.yaml", STUB_RC="3")
    assert r.returncode == 3
    assert _lines(log / "srun")[-1].endswith("ray stop --force")


def test_slurm_passes_its_warning_signal_to_mi_scale(tmp_path, stubs):
    env, log, bin_dir = stubs
    assert "#SBATCH --signal=B:TERM@120" in SLURM.read_text().splitlines()
    _stub(bin_dir, "mi-scale", 'trap \'echo TERM > "$STUB_LOG/term"; exit 143\' TERM; touch "$STUB_LOG/started"; '
                               'while true; do sleep 0.1; done')
    (tmp_path / "my-run.yaml").write_text("run:\n  name: my-run\n")
    env = {**env, "SLURM_JOB_NODELIST": "node1", "SLURMD_NODENAME": "node1", "SLURM_CPUS_PER_TASK": "8",
           "RAY_HEAD_IP": "10.0.0.1", "STUB_NODES": "node1", "STUB_ALIVE": "1"}
    proc = subprocess.Popen(["bash", str(SLURM), "my-run.yaml"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not (log / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends to the batch shell (B:)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, out + err
    assert _lines(log / "term") == ["TERM"]
    assert "[slurm] SIGTERM: asking mi-scale to stop at the next step with a checkpoint" in out.splitlines()
    assert _lines(log / "srun")[-1].endswith("ray stop --force")


def test_slurm_rejects_missing_config_before_starting_ray(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_slurm(tmp_path, env, "nope.yaml")
    assert r.returncode == 2 and "nope.yaml" in r.stderr
    assert not (log / "srun").exists()


def _run_submit(tmp_path, env, *args, **extra):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "my-run.yaml").write_text("run:\n  name: my-run\n")
    bin_dir = Path(env["PATH"].split(":")[0])
    (bin_dir / "python3").unlink()  # the submit script needs a real python3
    env = dict(env, PATH=f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", **extra)
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)


def test_job_submit_command_line(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_submit(tmp_path, env, "configs/my-run.yaml", "--set", "mi.weight=0.1",
                    RAY_HEAD="10.1.2.3", NUM_WORKERS="8", USE_GPU="true",
                    STORAGE_PATH="gs://bucket/mi", WANDB_API_KEY="k-123", SUBMISSION_ID="run-1")
    assert r.returncode == 0, r.stdout + r.stderr
    argv = _lines(log / "ray")
    sep = argv.index("--")
    opts, entry = argv[:sep], argv[sep + 1:]
    assert opts[:2] == ["job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://10.1.2.3:8265"
    assert opts[opts.index("--submission-id") + 1] == "run-1"
    runtime_env = json.loads(opts[opts.index("--runtime-env-json") + 1])
    assert runtime_env == {"working_dir": str((tmp_path / "configs").resolve()),
                           "env_vars": {"WANDB_API_KEY": "k-123"}}
    assert entry == ["mi-scale", "train", "my-run.yaml", "--address", "auto",
                     "--set", "cluster.num_workers=8", "--set", "cluster.use_gpu=true",
                     "--set", "cluster.storage_path=gs://bucket/mi", "--set", "tracking.wandb=online",
                     "--set", "mi.weight=0.1"]
    _assert_known_overrides(_set_values(entry))


def test_job_submit_without_key_or_overrides(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_submit(tmp_path, env, "configs/my-run.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    argv = _lines(log / "ray")
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert json.loads(argv[argv.index("--runtime-env-json") + 1]) == {
        "working_dir": str((tmp_path / "configs").resolve())}
    assert argv[argv.index("--") + 1:] == ["mi-scale", "train", "my-run.yaml", "--address", "auto"]


def test_job_submit_rejects_missing_config(tmp_path, stubs):
    env, log, _ = stubs
    r = _run_submit(tmp_path, env, "configs/missing.yaml")
    assert r.returncode == 2 and "missing.yaml" in r.stderr
    assert not (log / "ray").exists()


# ---------------------------------------------------------------------------
# Token authentication in every recipe, and a real cluster from the SLURM script


@pytest.mark.parametrize("cloud", sorted(CLUSTER_YAMLS))
def test_cluster_configs_share_the_token_and_set_token_mode(cloud):
    cfg = _load(CLUSTER_YAMLS[cloud])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])  # drivers on the nodes


def test_rayjob_gives_every_pod_the_token_and_token_mode():
    job = _load(RAYJOB)
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in _containers(pod):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth", "key": "token"}


def test_slurm_shares_one_token_with_every_step(tmp_path, stubs):
    env, log, bin_dir = stubs
    _stub(bin_dir, "srun", 'echo "$*" >> "$STUB_LOG/srun"; echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN" >> "$STUB_LOG/auth"')
    _stub(bin_dir, "mi-scale", 'echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN" >> "$STUB_LOG/auth"')
    r = _run_slurm(tmp_path, env, "my-run.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    auth = _lines(log / "auth")
    assert len(auth) == 4  # head, workers, the driver, ray stop
    assert len(set(auth)) == 1
    mode, token = auth[0].split()
    assert mode == "token" and re.fullmatch(r"[0-9a-f]{64}", token), token
    r = _run_slurm(tmp_path, env, "my-run.yaml", RAY_AUTH_TOKEN="given-token")
    assert _lines(log / "auth")[-1] == "token given-token"


SRUN_LOCAL = r'''
# srun on one machine: drop srun's options, run the command here.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
if [[ $1 == ray && $2 == stop ]]; then
    # `ray stop` stops every Ray on the machine (other users' too): stop only
    # the nodes started here; `ray start --block` shuts its node down on SIGTERM.
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done < "$STUB_PIDS"
    exit 0
fi
if [[ $1 == ray && $2 == start ]]; then
    echo $$ >> "$STUB_PIDS"
fi
exec "$@"
'''


@pytest.mark.slow
def test_two_node_cluster_formed_by_the_slurm_script(tmp_path):
    """A head and a second node on this machine, started by the SLURM script's
    own `ray start` commands (srun runs them here), with token authentication;
    then the main job trains on that cluster through `--address auto`."""
    import signal
    import socket
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "%s\\n" node1 node2')
    _stub(bin_dir, "srun", SRUN_LOCAL)
    pids = tmp_path / "ray-start-pids"
    pids.touch()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    venv_bin = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RANK", "WORLD_SIZE"))},
           "PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "STUB_PIDS": str(pids),
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURMD_NODENAME": "node1", "SLURM_JOB_ID": "7",
           "SLURM_CPUS_PER_TASK": "1", "RAY_PORT": str(port), "RAY_WAIT_S": "300",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    steps = 20
    try:
        r = subprocess.run(["bash", str(SLURM), str(ROOT / "configs" / "mnist1d-mlp.yaml"),
                            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", f"train.steps={steps}",
                            "--set", "train.log_every=5", "--set", "train.eval_every=10",
                            "--set", "train.checkpoint_every=10"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=850)
    finally:
        for pid in _lines(pids):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 60
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in _lines(pids)):
            time.sleep(0.5)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "[slurm] 2/2 Ray node(s) up" in r.stdout
    ran = _load(tmp_path / "runs" / "mnist1d-mlp" / "config.yaml")
    assert ran["cluster"]["num_workers"] == 2 and ran["cluster"]["address"] == "auto"
    for step in range(5, steps + 1, 5):
        lines = [line for line in out.splitlines() if line.startswith(f"step {step:>6}/{steps} |")]
        assert len(lines) == 1, (step, lines)
    assert "PlacementGroupCleaner" not in out
    assert "InvalidAuthToken" not in out and "Token authentication" not in out
