"""Launch presets (configs/accelerate/) and the preset × command matrix checked before weights load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlcli import launch
from rlcli.launch import check_launch, detect_launch
from tests.helpers import REPO, TINY_GPT2, accelerate_launch, plain, run_cli, write_yaml

PRESETS = REPO / "configs" / "accelerate"

# every variable the tests touch, cleared first so the outer environment (e.g. a launched test run) cannot leak in
LAUNCH_VARS = ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
               "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY",
               "ACCELERATE_USE_MEGATRON_LM", "ACCELERATE_USE_PARALLELISM_CONFIG", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture
def env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "_launcher_config_file", lambda: None)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
        return monkeypatch

    return set_env


def recipe(mp: str = "no"):
    return SimpleNamespace(train=SimpleNamespace(mixed_precision=mp))


# --- the preset files ------------------------------------------------------------------------------------------------


def test_presets_exist_and_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "single_gpu.yaml": DistributedType.NO,
        "multi_gpu.yaml": DistributedType.MULTI_GPU,
        "cpu_ddp.yaml": DistributedType.MULTI_GPU,  # MULTI_GPU + use_cpu: several gloo processes without MPI
        "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
        "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
        "fsdp.yaml": DistributedType.FSDP,
        "multi_node.yaml": DistributedType.MULTI_GPU,
        # CPU twins: 2 processes over gloo (use_cpu false: accelerate would start one plain process)
        "cpu_fsdp2.yaml": DistributedType.FSDP,
        "cpu_deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
        "cpu_deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    }
    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(expected)
    for name, dtype in expected.items():
        cfg = load_config_from_file(str(PRESETS / name))  # raises on unknown keys
        assert cfg.distributed_type == dtype, name
        assert cfg.num_processes >= 1, name
    assert load_config_from_file(str(PRESETS / "cpu_ddp.yaml")).use_cpu
    assert load_config_from_file(str(PRESETS / "cpu_ddp.yaml")).num_processes == 2
    assert load_config_from_file(str(PRESETS / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    assert load_config_from_file(str(PRESETS / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3
    node = load_config_from_file(str(PRESETS / "multi_node.yaml"))
    assert node.num_machines == 2 and node.main_process_ip and node.main_process_port


# --- the matrix ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sft", "rm", "ppo"])
def test_single_process_and_ddp_are_supported(env, command):
    assert check_launch(command, recipe()) == []
    env(WORLD_SIZE=8, ACCELERATE_MIXED_PRECISION="no")
    assert check_launch(command, recipe()) == []
    assert detect_launch().kind == "ddp"


@pytest.mark.parametrize("command", ["sft", "rm", "ppo"])
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_is_supported(env, monkeypatch, command, stage):
    # DeepSpeed is an optional extra that CI's first step does not install: the check reads whether it is installed
    # (its own test below), so pretend it is
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("deepspeed", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "deepspeed" else real(name, *a))
    env(WORLD_SIZE=8, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=stage,
        ACCELERATE_MIXED_PRECISION="bf16")
    assert check_launch(command, recipe("bf16")) == []
    assert detect_launch().zero_stage == stage


def test_deepspeed_not_installed_is_said(env, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    env(WORLD_SIZE=2, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=2)
    (msg,) = [p.message for p in check_launch("sft", recipe())]
    assert "needs DeepSpeed, which is not installed" in msg and "rlcli[deepspeed]" in msg and "fsdp.yaml" in msg


def test_zero_stage_read_from_a_deepspeed_json_config(env, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    env(WORLD_SIZE=2, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=ds)
    setup = detect_launch()
    assert setup.zero_stage == 3 and setup.deepspeed_config_file == str(ds)
    assert setup.describe() == "DeepSpeed ZeRO-3"


@pytest.mark.parametrize("command", ["sft", "rm", "ppo"])
def test_fsdp2_is_supported_and_fsdp1_refused(env, command):
    env(WORLD_SIZE=4, ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    assert check_launch(command, recipe()) == []
    env(FSDP_VERSION="1")
    (msg,) = [p.message for p in check_launch(command, recipe())]
    assert f"`rlcli {command}` under FSDP1" in msg and "fsdp_version: 2" in msg


@pytest.mark.parametrize("var", ["ACCELERATE_USE_MEGATRON_LM", "ACCELERATE_USE_PARALLELISM_CONFIG"])
def test_model_parallel_setups_are_refused(env, var):
    env(WORLD_SIZE=4, **{var: "true"})
    (msg,) = [p.message for p in check_launch("sft", recipe())]
    assert "data-parallel only" in msg and "configs/accelerate/multi_gpu.yaml" in msg


def test_preset_file_is_named_when_found(env, monkeypatch):
    monkeypatch.setattr(launch, "_launcher_config_file", lambda: "configs/accelerate/fsdp.yaml")
    env(WORLD_SIZE=8, ACCELERATE_USE_FSDP="true", FSDP_VERSION="1")
    (msg,) = [p.message for p in check_launch("ppo", recipe())]
    assert "FSDP1 (accelerate config configs/accelerate/fsdp.yaml)" in msg


def test_env_rollout_runs_in_one_process_only(env):
    assert check_launch("env-rollout", SimpleNamespace()) == []
    env(WORLD_SIZE=2)
    assert [p.key for p in check_launch("env-rollout", SimpleNamespace())] == ["launch"]
    (msg,) = [p.message for p in check_launch("env-rollout", SimpleNamespace())]
    assert "`rlcli env-rollout`" in msg and "one process" in msg and "configs/accelerate/single_gpu.yaml" in msg


def test_launcher_precision_must_match_the_recipe(env):
    env(WORLD_SIZE=2, ACCELERATE_MIXED_PRECISION="bf16")
    (msg,) = [p.message for p in check_launch("sft", recipe("no"))]
    assert "mixed_precision=bf16" in msg and "train.mixed_precision=bf16" in msg and "--mixed_precision no" in msg
    assert check_launch("sft", recipe("bf16")) == []
    env(ACCELERATE_MIXED_PRECISION="fp8")
    (msg,) = [p.message for p in check_launch("rm", recipe("no"))]
    assert "fp8" in msg


def test_unknown_command_is_a_programming_error(env):
    with pytest.raises(ValueError):
        check_launch("dpo", recipe())


def test_explicit_environ_is_used(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # ignored: an explicit mapping wins
    assert check_launch("sft", recipe(), environ={"WORLD_SIZE": "2"}) == []


def test_launcher_config_file_found_in_parent_cmdline(tmp_path):
    """The real /proc walk: a child started with --config_file X finds X (Linux only)."""
    import subprocess
    import sys

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'from rlcli.launch import _launcher_config_file as f; print(f())'])")
    out = subprocess.run([sys.executable, "-c", code, "--config_file", "configs/accelerate/fsdp.yaml"],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert out.stdout.strip() == "configs/accelerate/fsdp.yaml", out.stderr


# --- end to end: the CLI refuses before loading weights --------------------------------------------------------------


def test_cli_dry_run_refuses_fsdp1(tmp_path):
    rec = write_yaml(tmp_path / "sft.yaml", {
        "output_dir": str(tmp_path / "out"), "model": TINY_GPT2,
        "data": {"path": str(REPO / "data/tiny/sft.jsonl"), "format": "prompt_completion", "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 2},
    })
    res = run_cli("sft", str(rec), "--dry-run", env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
                                                     "WORLD_SIZE": "1"})
    assert res.returncode != 0
    text = plain(res.stderr + res.stdout)
    assert "FSDP1" in text and "fsdp_version: 2" in text
    assert not (tmp_path / "out").exists()


def test_cpu_launch_of_several_processes_is_detected(monkeypatch, tmp_path):
    """`accelerate launch --cpu --num_processes N` leaves ACCELERATE_USE_CPU and MASTER_ADDR in the lone process it
    starts; rlcli reads N from the launcher's command line (or its --config_file) and starts N processes itself."""
    import rlcli.launch as launch

    flags = {}
    monkeypatch.setattr(launch, "_launcher_option", lambda names, max_depth=4: next(
        (flags[n] for n in names if n in flags), None))
    cpu = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    flags["--num_processes"] = "3"
    assert launch.requested_cpu_processes(cpu) == 3
    assert launch.requested_cpu_processes({**cpu, "RANK": "0", "WORLD_SIZE": "3"}) is None  # already a worker
    assert launch.requested_cpu_processes({"ACCELERATE_USE_CPU": "True"}) is None  # one process was asked for
    assert launch.requested_cpu_processes({**cpu, "ACCELERATE_USE_CPU": "False"}) is None
    flags["--num_machines"] = "2"
    assert launch.requested_cpu_processes(cpu) is None  # several CPU machines: Accelerate's MPI path
    flags.clear()
    config = tmp_path / "cpu.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\nuse_cpu: true\n")
    flags["--config_file"] = str(config)
    assert launch.requested_cpu_processes(cpu) == 4


def test_cpu_launch_checks_the_recipe_once_for_all_processes(tmp_path):
    """`accelerate launch --cpu --num_processes 2`: the recipe is checked against 2 processes before any worker
    starts; a problem is reported once, with no worker tracebacks, and a dry run prints once."""
    base = ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "rlcli", "ppo", "configs/tiny/ppo.yaml", f"output_dir={tmp_path / 'out'}"]
    res = accelerate_launch(*base, "ppo.micro_batch_size=32", timeout=120)
    err = plain(res.stderr)
    assert res.returncode != 0 and "micro_batch_size × processes = 32 × 2 = 64" in err
    assert err.count("recipe error") == 1 and "ChildFailedError" not in err and "torch.distributed" not in err
    res = accelerate_launch(*base, "--dry-run", timeout=120)  # as shipped: the micro-batch is each process's share
    assert res.returncode == 0, res.stderr[-2000:]
    assert plain(res.stdout).count("dry run OK") == 1
    assert not (tmp_path / "out").exists()


def test_cpu_launch_failure_is_reported_once(tmp_path):
    """A run that fails in its workers (here: a reward function returning too few scores) ends with the main
    process's error and the workers' exit status, not torchrun's failure report or a traceback."""
    bad = tmp_path / "bad.py"
    bad.write_text("def score(responses, **kw):\n    return [1.0]\n")
    res = accelerate_launch("-q", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "-m", "rlcli", "ppo", "configs/tiny/ppo.yaml",
                            f"output_dir={tmp_path / 'out'}", f"reward.function={bad}:score", "model.config.n_layer=1",
                            "model.config.n_embd=32", "model.config.n_head=2", "ppo.micro_batch_size=16",
                            "logging.progress=false", timeout=180)
    err = plain(res.stderr)
    assert res.returncode == 1, res.stderr[-2000:]
    assert err.count("returned 1 scores for 32 samples") == 1, err
    assert "Traceback" not in err and "ChildFailedError" not in err and "exitcode" not in err, err
