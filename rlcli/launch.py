"""Which ``accelerate launch`` setups each command supports, checked before any weights load.

``accelerate launch`` tells the processes it starts how to distribute through environment variables;
:func:`detect_launch` reads them back and :func:`check_launch` returns one clear problem for each combination of
command and setup that rlcli does not support, with what to use instead. The trainers call it from their
``preflight``, so ``--dry-run`` reports it too. ``sft``, ``rm`` and ``ppo`` run single-process, DDP, FSDP2 and
DeepSpeed ZeRO-1/2/3; ``env-rollout`` one process only; FSDP1, Megatron-LM, tensor / context / sequence parallelism,
fp8 and a launcher's own mixed precision are refused. The matrix: docs/distributed.md, "Launch presets", and
docs/internals.md, "rlcli/launch.py".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from rlcli.commands import COMMANDS
from rlcli.config.errors import Problem

RESUME_HINT = "the newest checkpoint (if any) can be continued with --resume"  # after Ctrl-C or a SIGTERM

DDP_PRESET = "configs/accelerate/multi_gpu.yaml"
FSDP_PRESET = "configs/accelerate/fsdp.yaml"
ZERO3_PRESET = "configs/accelerate/deepspeed_zero3.yaml"
SINGLE_PRESET = "configs/accelerate/single_gpu.yaml"
MULTI_NODE_PRESET = "configs/accelerate/multi_node.yaml"


def is_main_process() -> bool:
    """This process is the run's main one (rank 0, or the only one), as the launcher's environment says: what
    decides who prints and who writes before the parallel engine exists."""
    return os.environ.get("RANK", "0") == "0"


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


@dataclass(frozen=True)
class LaunchSetup:
    """How this process was launched, as far as the environment tells."""

    kind: str  # "single" | "ddp" | "deepspeed" | "fsdp" | "megatron" | "parallelism"
    processes: int = 1
    zero_stage: int | None = None  # DeepSpeed
    deepspeed_config_file: str | None = None
    fsdp_version: str | None = None
    fsdp_sharding: str | None = None
    mixed_precision: str | None = None  # what the launcher asked for (ACCELERATE_MIXED_PRECISION)
    config_file: str | None = None  # the accelerate config file given to `accelerate launch`, when it can be found

    def describe(self) -> str:
        if self.kind == "deepspeed":
            stage = f"ZeRO-{self.zero_stage}" if self.zero_stage is not None else "ZeRO (stage unknown)"
            name = f"DeepSpeed {stage}"
        elif self.kind == "fsdp":
            name = f"FSDP{self.fsdp_version or ''}"
            if self.fsdp_sharding:
                name += f" ({self.fsdp_sharding})"
        elif self.kind == "megatron":
            name = "Megatron-LM"
        elif self.kind == "parallelism":
            name = "Accelerate parallelism_config (tensor/context/sequence parallelism)"
        elif self.kind == "ddp":
            name = f"DDP with {self.processes} processes"
        else:
            name = "a single process"
        if self.config_file:
            name += f" (accelerate config {self.config_file})"
        return name


def detect_launch(environ: Mapping[str, str] | None = None, config_file: str | None = None) -> LaunchSetup:
    """Read the launch setup from the environment ``accelerate launch`` / torchrun give each process."""
    env = os.environ if environ is None else environ
    if config_file is None and environ is None:
        config_file = _launcher_config_file()
    processes = _int(env.get("WORLD_SIZE"), 1)
    mp = (env.get("ACCELERATE_MIXED_PRECISION") or "").strip().lower() or None
    common: dict[str, Any] = {"processes": processes, "mixed_precision": mp, "config_file": config_file}
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        stage = _int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), None)
        if stage is None and ds_file:
            stage = _zero_stage_from_file(ds_file)
        return LaunchSetup("deepspeed", zero_stage=stage, deepspeed_config_file=ds_file, **common)
    if _true(env.get("ACCELERATE_USE_FSDP")):
        return LaunchSetup("fsdp", fsdp_version=env.get("FSDP_VERSION") or "1",
                           fsdp_sharding=env.get("FSDP_SHARDING_STRATEGY") or None, **common)
    if _true(env.get("ACCELERATE_USE_MEGATRON_LM")):
        return LaunchSetup("megatron", **common)
    if _true(env.get("ACCELERATE_USE_PARALLELISM_CONFIG")):
        return LaunchSetup("parallelism", **common)
    return LaunchSetup("ddp" if processes > 1 else "single", **common)


def check_launch(command: str, recipe: Any = None, environ: Mapping[str, str] | None = None,
                 processes: int | None = None) -> list[Problem]:
    """Problems with running ``rlcli COMMAND`` under the current launch setup (empty list: supported).

    Call it from a trainer's preflight, before any weights load; each message names the command, the setup
    (and the accelerate config file when it can be found) and what to use instead. ``processes``: the run's
    process count when the environment does not tell it yet (``launch_processes``).
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    setup = detect_launch(environ)
    if processes is not None and processes != setup.processes:
        setup = dataclasses.replace(setup, processes=processes,
                                    kind="ddp" if setup.kind in ("single", "ddp") and processes > 1 else setup.kind)
    where = setup.describe()
    problems: list[Problem] = []

    if command == "env-rollout":
        if setup.processes > 1:
            problems.append(
                Problem("launch", f"`rlcli env-rollout` under {where} is not supported: it runs in one process and "
                                  f"does not split episodes across processes, so each of the {setup.processes} "
                                  "processes would run every episode and write the same files. Run it without a "
                                  "launcher (`rlcli env-rollout CONFIG`) or with `accelerate launch --config_file "
                                  f"{SINGLE_PRESET} -m rlcli env-rollout CONFIG`.")
            )
        return problems

    instead = (f"Use DDP instead: `accelerate launch --config_file {DDP_PRESET} -m rlcli {command} CONFIG` "
               f"(several machines: {MULTI_NODE_PRESET} or slurm/multi_node.sbatch)")
    memory = ("; if the model does not fit in one GPU per process, train a LoRA adapter (`lora:` section"
              + (", which also avoids a second copy of the weights for the reference model" if command == "ppo" else "")
              + "), with train.mixed_precision=bf16 and model.gradient_checkpointing=true")
    if setup.kind == "fsdp" and str(setup.fsdp_version or "1") != "2":
        problems.append(Problem("launch", f"`rlcli {command}` under {where} is not supported: rlcli shards with FSDP2 "
                                          "only (torch's fully_shard); set `fsdp_version: 2` in the accelerate config "
                                          f"(as {FSDP_PRESET} does), or use DeepSpeed ZeRO ({ZERO3_PRESET}). "
                                          f"{instead}."))
    elif setup.kind == "deepspeed" and setup.zero_stage not in (None, 0, 1, 2, 3):
        problems.append(Problem("launch", f"`rlcli {command}` under {where}: unknown ZeRO stage {setup.zero_stage}; "
                                          "use 1, 2 or 3"))
    elif setup.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(Problem("launch", f"`rlcli {command}` under {where} needs DeepSpeed, which is not installed: "
                        "`pip install \"rlcli[deepspeed]\"` (on a machine without CUDA: `DS_BUILD_OPS=0 pip install "
                        "--no-build-isolation deepspeed`). Or use FSDP2, which needs nothing more: "
                        f"`accelerate launch --config_file {FSDP_PRESET} ...`"))
    elif setup.kind in ("megatron", "parallelism"):
        problems.append(Problem("launch", f"`rlcli {command}` under {where} is not supported: rlcli's trainers are "
                                          "data-parallel only (every process holds the whole model). "
                                          f"{instead}{memory}."))

    if problems:  # refused already: a precision remark on top would only distract
        return problems
    wanted = _recipe_precision(recipe)
    launched = setup.mixed_precision
    if launched == "fp8":
        problems.append(Problem("launch", f"`rlcli {command}`: the launcher asks for fp8 mixed precision, which rlcli "
                                          "does not support; launch with `--mixed_precision no` (or `mixed_precision: "
                                          "'no'` in the accelerate config) and set train.mixed_precision=bf16 in the "
                                          "recipe"))
    elif launched not in (None, "no") and wanted is not None and launched != wanted:
        problems.append(Problem("launch", f"`rlcli {command}`: the launcher asks for mixed_precision={launched} but "
                                          f"the recipe has train.mixed_precision={wanted}; rlcli takes precision from "
                                          f"the recipe, so say it there: add `train.mixed_precision={launched}` to the "
                                          "command, or launch with `--mixed_precision no` (or `mixed_precision: 'no'` "
                                          "in the accelerate config)"))
    return problems


def _recipe_precision(recipe: Any) -> str | None:
    train = getattr(recipe, "train", None)
    value = getattr(train, "mixed_precision", None)
    return None if value is None else str(value).lower()


def _int(value: str | None, default):
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def _zero_stage_from_file(path: str) -> int | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    stage = (data.get("zero_optimization") or {}).get("stage") if isinstance(data, dict) else None
    return _int(stage, None)


def _launcher_config_file(max_depth: int = 4) -> str | None:
    """The ``--config_file`` given to the ``accelerate launch`` that started this process (Linux, best effort).

    The worker's parent is the launcher itself (it runs torchrun in-process) or torchrun's agent, so a few
    ancestors are enough.
    """
    return _launcher_option(("--config_file", "--config-file"), max_depth)


def _launcher_option(names: tuple[str, ...], max_depth: int = 4) -> str | None:
    """The value of the first of ``names`` on the command line of the nearest ancestor process that has one."""
    pid = os.getpid()
    for _ in range(max_depth):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid (after the parenthesised name)
            if pid <= 1:
                return None
            args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except (OSError, ValueError, IndexError):
            return None
        for i, arg in enumerate(args):
            if arg in names and i + 1 < len(args):
                return args[i + 1]
            for name in names:
                if arg.startswith(name + "="):
                    return arg[len(name) + 1:]
    return None


_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK",
                     "MV2_COMM_WORLD_SIZE")


def requested_cpu_processes(environ: Mapping[str, str] | None = None) -> int | None:
    """N when ``accelerate launch --cpu --num_processes N`` (N > 1) started this lone process; else None.

    Accelerate 1.x runs a CPU launch through its "simple" launcher, which starts ONE process unless an MPI
    hostfile is given (``accelerate/utils/launch.py``, ``prepare_simple_launcher_cmd_env``); it still exports
    ``ACCELERATE_USE_CPU`` and, when more than one process was asked for, ``MASTER_ADDR``/``MASTER_PORT``. N comes
    from the launcher's ``--num_processes`` (or its ``--config_file``'s ``num_processes``). One machine only:
    several CPU machines need MPI, which is Accelerate's business.
    """
    env = os.environ if environ is None else environ
    if not _true(env.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in env:
        return None
    if any(name in env for name in _DISTRIBUTED_VARS):
        return None
    if _int(_launcher_option(("--num_machines", "--num-machines")), 1) > 1:
        return None
    n = _int(_launcher_option(("--num_processes", "--num-processes")), None)
    if n is None:
        config_file = _launcher_config_file()
        if config_file:
            from accelerate.commands.config.config_args import load_config_from_file

            try:  # Accelerate's own reader (YAML or JSON, its defaults)
                n = _int(load_config_from_file(config_file).num_processes, None)
            except Exception:  # noqa: BLE001 - an unreadable config: Accelerate itself will have said so
                n = None
    return n if n is not None and n > 1 else None


def launch_processes() -> int:
    """How many processes this run has: the N of ``accelerate launch --cpu --num_processes N`` (which starts one
    process that rlcli turns into N), else the ``WORLD_SIZE`` torchrun / accelerate gave each process. The command
    line reads it once and passes it to recipe validation."""
    return requested_cpu_processes() or detect_launch().processes


def relaunch_cpu_processes(argv: list[str], processes: int) -> NoReturn:
    """Turn ``accelerate launch --cpu --num_processes N -m rlcli ...`` into N gloo processes, as the user asked.

    Runs ``torch.distributed.run --nproc_per_node N --nnodes 1 -m rlcli ARGS`` in this process (the launcher
    Accelerate itself uses for ``--multi_gpu``; on a machine without CUDA rlcli's Accelerator then runs MULTI_CPU
    over gloo) and exits with the workers' status. All processes are on this machine, so torchrun's own
    rendezvous on a free port is used rather than the launcher's (29500 by default, taken as soon as a second run
    starts on the machine). In-process rather than ``exec`` so that a failed run ends with the workers' own error
    (rank 0 prints it) instead of torchrun's traceback and failure report. Call it when
    :func:`requested_cpu_processes` returned N.
    """
    import logging
    import signal
    import sys

    from rich.console import Console
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    console = Console(stderr=True, highlight=False)
    console.print(
        f"[cyan]note:[/] `accelerate launch --cpu` starts one process; rlcli starts the {processes} CPU processes you "
        "asked for itself (torch.distributed.run, gloo backend)")
    # the agent passes these on to the workers (its default list lacks SIGUSR1, SLURM's warning before the time
    # limit: rlcli.signals)
    args = torchrun.get_args_parser().parse_args(["--nproc_per_node", str(processes), "--nnodes", "1",
                                                   "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                                   "-m", "rlcli", *argv])
    # the agent logs each worker it stops, each signal and each failure; rlcli reports those itself, below or in
    # the workers (torch's elastic loggers carry their own levels, so each is quietened)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: nothing in the worker reported it
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
            console.print(f"[bold red]error:[/] process {rank} of {processes} was killed by {name}{hint}; the other "
                          "processes were stopped")
            sys.exit(1)
        sys.exit(code)  # the worker printed its own error (rank 0 the recipe/run errors, any rank a traceback)
    except SignalException as exc:  # Ctrl-C or a SIGTERM to the launcher: torchrun passed it on to the workers
        if exc.sigval != signal.SIGINT:  # on Ctrl-C the main worker has said so itself
            console.print(f"[yellow]stopped[/] by {exc.sigval.name}: {RESUME_HINT}")
        sys.exit(128 + exc.sigval.value)
    sys.exit(0)


def release_distributed() -> None:
    """Destroy the default process group after everything that uses it (the DDP model above all) is freed.

    Why the order matters, with gloo: DDP's C++ ``Reducer`` holds a reference to the process group, and Python
    frees it while holding the GIL. If the Reducer holds the *last* reference, the group's destructor joins
    gloo's worker threads with the GIL held; a worker that is still dropping a finished collective's tensors
    needs the GIL for that, and both wait forever (seen under load: the run printed "done" and never exited).
    Freed through ``destroy_process_group``, the group's last reference belongs to Python's ProcessGroup binding,
    whose destructor releases the GIL first. So the command line calls this after the trainer has returned (or
    failed, with the traceback dropped): it collects any cycle still holding the model, then destroys the group.
    Without a process group it does nothing (and imports nothing).
    """
    import gc
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    gc.collect()
    dist.destroy_process_group()
