"""The one place that owns parallelism: which engine a run uses, and everything that differs between engines.

Engines, chosen by how the run was launched (``rlcli.launch.detect_launch``): ``single`` / ``ddp``, ``fsdp2``
(rlcli shards with ``fully_shard`` itself, so the path runs the same on gloo and NCCL) and ``deepspeed`` (ZeRO 1-3
through Accelerate's plugin). The trainers make the same calls whatever the engine: ``prepare``, ``prepare_frozen``,
``micro_batch``, ``backward``, ``clip_and_step``, ``gathered``, ``full_state_dict``, ``save_shards`` /
``load_shards``. Nothing else in rlcli calls Accelerate's, FSDP's or DeepSpeed's parallelism API. Each engine and
call in detail: docs/internals.md, "rlcli/parallel.py".
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

ENGINES = ("single", "ddp", "fsdp2", "deepspeed")


def as_parallel(obj, max_grad_norm: float | None = None) -> "Parallel":
    """``obj`` itself if it is a ``Parallel``; an Accelerator made elsewhere (the Python API, tests) wrapped as a
    single-process / DDP one."""
    return obj if isinstance(obj, Parallel) else Parallel.around(obj, max_grad_norm)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA; nothing changes on CPU.

    Through the ``allow_tf32`` switches rather than torch's newer per-backend ``fp32_precision`` ones: once the
    new ones are set, reading the old ones raises ("mix of legacy and new APIs"), and libraries (Accelerate
    among them) still use the old ones. Both read back consistently this way.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def engine_of(setup) -> str:
    """The engine a ``rlcli.launch.LaunchSetup`` asks for."""
    if setup.kind == "deepspeed":
        return "deepspeed"
    if setup.kind == "fsdp":
        return "fsdp2"
    return "ddp" if setup.processes > 1 else "single"


class Parallel:
    """An Accelerator plus the engine-specific parts; one per run.

    Args:
        recipe: the run's recipe (output_dir, logging, seed).
        mixed_precision: ``no`` | ``bf16`` | ``fp16``.
        batch_size: rows per optimizer step over all processes (a minibatch in PPO).
        micro_batch_size: rows per micro-batch (DeepSpeed's ``train_micro_batch_size_per_gpu``); micro-batches per
            optimizer step on one process = batch_size / (micro_batch_size × processes).
        max_grad_norm: gradient clipping (None: off).
        tf32: TF32 matmuls on CUDA.
    """

    def __init__(self, recipe, *, mixed_precision: str, batch_size: int, micro_batch_size: int,
                 max_grad_norm: float | None, tf32: bool = True):
        from rlcli.launch import detect_launch
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            from rlcli.config.errors import UserError

            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or 'no' on CPU")
        set_tf32(tf32)
        self.engine = engine_of(detect_launch())
        self.mixed_precision = mixed_precision
        self.max_grad_norm = max_grad_norm
        cuda = torch.cuda.is_available()
        log_with = list(recipe.logging.report_to) or None
        kwargs: dict[str, Any] = dict(mixed_precision=mixed_precision, log_with=log_with,
                                      project_dir=recipe.output_dir)
        # RLCLI_DIST_TIMEOUT_S: how long a collective may wait before the run fails (the tests set it short, so
        # that a hang fails in seconds); default: torch's (10-30 minutes)
        timeout = os.environ.get("RLCLI_DIST_TIMEOUT_S")
        group = {"timeout": datetime.timedelta(seconds=float(timeout))} if timeout else {}
        if self.engine == "deepspeed":
            from accelerate import DeepSpeedPlugin

            # not cpu=True: Accelerate then drops DeepSpeed; on a machine without CUDA, gloo carries the collectives
            if not cuda:
                group["backend"] = "gloo"
            if group:
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin()  # the launcher's settings, from the environment
            self.accelerator = Accelerator(**kwargs)
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            # rlcli marks the accumulation boundary itself; these keep DeepSpeed's own checks and logs consistent
            config["gradient_accumulation_steps"] = batch_size // (micro_batch_size * self.accelerator.num_processes)
            config["train_micro_batch_size_per_gpu"] = micro_batch_size
            config["gradient_clipping"] = max_grad_norm or 0.0
            if self.zero_stage == 3:
                config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        else:
            # Accelerate's own FSDP plugin is left out (see the module docstring): rlcli shards with fully_shard
            if group:
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
            with _without_env("ACCELERATE_USE_FSDP"):
                # Without CUDA, cpu=True: a multi-process launch is then MULTI_CPU over gloo instead of N copies
                self.accelerator = Accelerator(cpu=not cuda, **kwargs)
        # each process derives its own seed (seed + process index; ppo-details item 16); initial weights still
        # agree: DDP broadcasts rank 0's parameters, FSDP2 and ZeRO shard rank 0's (see prepare)
        set_seed(recipe.seed, device_specific=True)
        self._skeletons: dict[int, torch.nn.Module] = {}  # prepared sharded model -> its structure, weights on meta

    @classmethod
    def around(cls, accelerator: Accelerator, max_grad_norm: float | None = None) -> "Parallel":
        """A single-process or DDP ``Parallel`` around an Accelerator made elsewhere (the Python API, tests)."""
        par = cls.__new__(cls)
        par.engine = "ddp" if accelerator.num_processes > 1 else "single"
        par.mixed_precision = accelerator.mixed_precision
        par.max_grad_norm = max_grad_norm
        par.accelerator = accelerator
        par._skeletons = {}
        return par

    # --- facts ------------------------------------------------------------------------------------------------

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def sharded(self) -> bool:
        """True when no process holds the whole trained model (FSDP2, ZeRO-3)."""
        return self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage == 3)

    @property
    def zero_stage(self) -> int | None:
        if self.engine != "deepspeed":
            return None
        return int(self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
                   .get("stage", 0))

    def describe(self) -> str:
        if self.engine == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}, {self.num_processes} processes"
        if self.engine == "fsdp2":
            return f"FSDP2, {self.num_processes} processes"
        return f"DDP, {self.num_processes} processes" if self.engine == "ddp" else "1 process"

    # --- models -----------------------------------------------------------------------------------------------

    def building(self, *, from_scratch: bool):
        """Context for building or loading a model. Under ZeRO-3, transformers partitions a model as it is built
        (``deepspeed.zero.Init``): right for pretrained weights, read from the same files on every process. A model
        built from scratch would get each process's own random values in its shards instead of rank 0's, so it is
        built whole and partitioned from rank 0's weights in ``prepare``."""
        if self.engine == "deepspeed" and self.zero_stage == 3 and from_scratch:
            return self._without_zero3_init()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _without_zero3_init(self):
        # transformers partitions a model at construction whenever a ZeRO-3 config is registered (Accelerate's
        # DeepSpeed plugin always registers it; its zero3_init_context_manager only toggles its own flag)
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def prepare(self, model: torch.nn.Module, make_optimizer: Callable) -> tuple[torch.nn.Module, Any, Any]:
        """The trained model wrapped / sharded for this engine, with its optimizer and schedule.

        ``make_optimizer(named_parameters) -> (optimizer, scheduler)`` is called on the (name, parameter) pairs the
        engine trains (FSDP2's sharded ones; names as the unwrapped model's).
        """
        skeleton = _meta_copy(model) if self.sharded else None
        if self.engine == "deepspeed":
            # ZeRO-3 partitions whatever each process holds: give every process rank 0's weights first (a model
            # built from scratch was initialised from each process's own seed); DDP and ZeRO-1/2 broadcast anyway
            _broadcast_from_rank0(model)
        if self.engine == "fsdp2":
            model = self._fully_shard(model.to(self.device), trainable=True)
            optimizer, scheduler = make_optimizer(model.named_parameters())
        else:
            optimizer, scheduler = make_optimizer(model.named_parameters())
            model, optimizer = self.accelerator.prepare(model, optimizer)
        if skeleton is not None:
            self._skeletons[id(model)] = skeleton
        return model, optimizer, scheduler

    def materialise(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The trained model as an ordinary module holding all its weights, for saving with ``save_pretrained``:
        the model itself when no process shards it; else (every process must call it) the full weights gathered
        into a copy of its structure on the main process, None on the others."""
        if not self.sharded:
            return self.unwrap(model)
        state = self.full_state_dict(model)
        if not self.is_main_process:
            return None
        plain = self._skeletons[id(model)]
        plain.load_state_dict(state, strict=False, assign=True)
        for module in plain.modules():  # tied input / output embeddings point at one tensor again
            if hasattr(module, "tie_weights") and module is not plain:
                module.tie_weights()
        if hasattr(plain, "tie_weights"):
            plain.tie_weights()
        return plain

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that is only run forward (reference, reward model): eval mode, no gradients, on the device;
        sharded like the trained model under FSDP2 and ZeRO-3 (its forwards are then collective: every process
        must call it the same number of times)."""
        model.eval().requires_grad_(False)
        if self.num_processes > 1:
            # rank 0's weights everywhere: a copy of a from-scratch policy was made from each process's own init
            _broadcast_from_rank0(model)
        if self.engine == "fsdp2":
            return self._fully_shard(model.to(self.device), trainable=False)
        if self.engine == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            # as TRL does for its reference model: an inference-only ZeRO-3 engine (no optimizer)
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                      "bf16": {"enabled": self.mixed_precision == "bf16"},
                      "fp16": {"enabled": self.mixed_precision == "fp16"}}
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return engine
        return model.to(self.device)

    def _fully_shard(self, model: torch.nn.Module, *, trainable: bool) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.num_processes,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        if dtype:
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        if trainable:
            # every process shards the weights of rank 0 (built from the same seed or loaded from the same files,
            # but a from-scratch model on another rank had its own random init); frozen models got them already
            _broadcast_from_rank0(model)
        for block in _transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module itself, without a DDP / DeepSpeed wrapper (FSDP2 modules are their own)."""
        if self.engine == "fsdp2":
            return model
        inner = getattr(model, "module", None)
        if self.engine == "deepspeed" and inner is not None:
            return inner
        return self.accelerator.unwrap_model(model)

    # --- one optimizer step -----------------------------------------------------------------------------------

    def micro_batch(self, model: torch.nn.Module, last: bool):
        """Context for one micro-batch's forward and backward: gradients are synchronised across processes only
        when ``last`` (the optimizer step's last micro-batch)."""
        if self.engine == "deepspeed":
            model.set_gradient_accumulation_boundary(last)
            return contextlib.nullcontext()
        if self.engine == "fsdp2":
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """``loss`` is already this process's share of the global batch's loss, × processes (every engine
        averages gradients over processes)."""
        if self.engine == "deepspeed":
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_and_step(self, model: torch.nn.Module, optimizer, scheduler, *, skip_nonfinite: bool = False
                      ) -> float | None:
        """Clip (``max_grad_norm``), step, advance the schedule, zero the gradients; returns the gradient norm
        before clipping (None without clipping, unless ``skip_nonfinite`` needed it).

        ``skip_nonfinite``: when the gradient norm is not finite, drop the gradients instead of stepping (neither the
        optimizer nor the schedule moves) and return that norm; the caller counts the skip. Every process sees the
        same norm (gradients are synchronised), so all of them skip together. DeepSpeed checks overflow itself."""
        norm = None
        if self.engine == "deepspeed":
            model.step()  # clips, steps its optimizer, zeroes gradients
            if self.max_grad_norm is not None:
                value = model.get_global_grad_norm()
                norm = None if value is None else float(value)
        else:
            # fp16's loss scaler (Accelerate's: it scaled the loss in ``backward``); FSDP2's optimizer is not wrapped
            # by Accelerate, so its gradients are unscaled and its steps taken through the scaler here
            scaler = getattr(self.accelerator, "scaler", None)
            raw_scaler = scaler if self.engine == "fsdp2" else None
            if raw_scaler is not None:
                raw_scaler.unscale_(optimizer)
            if self.max_grad_norm is not None or skip_nonfinite:
                limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")  # inf: measure only
                if self.engine == "fsdp2":
                    total = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
                    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
                else:
                    norm = float(self.accelerator.clip_grad_norm_(model.parameters(), limit))
            skip = skip_nonfinite and norm is not None and not math.isfinite(norm)
            # a skipped step still goes through the loss scaler: it has unscaled these gradients and seen the inf, so
            # its step skips the update and its update() lowers the scale and resets it for the next unscale (without
            # it the next step raises "unscale_() has already been called")
            if not skip or scaler is not None:
                if raw_scaler is not None:
                    raw_scaler.step(optimizer)
                    raw_scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if skip:
                return norm
        scheduler.step()
        return norm

    def drop_gradients(self, model: torch.nn.Module, optimizer) -> None:
        """Forget this step's gradients without stepping (a non-finite loss)."""
        if self.engine == "deepspeed":
            model.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    # --- whole weights --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered(self, *models: torch.nn.Module) -> Iterator[None]:
        """Full weights on every process for the duration: forward calls inside need no collective (FSDP2:
        unsharded and kept so; ZeRO-3: gathered). Costs one full copy of the weights per process meanwhile."""
        if self.engine == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            # the sampler calls a submodule (the LM inside the value-head wrapper): FSDP2 would then take that
            # submodule's first block for a root of its own and fail at the next real root forward; so the roots
            # settle who is root first (what their own first forward does)
            for model in models:
                if isinstance(model, FSDPModule):
                    model._get_fsdp_state()._lazy_init()
            units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
            for unit in units:
                unit.unshard()
                unit.set_reshard_after_forward(False)
            try:
                yield
            finally:
                for unit in units:
                    unit.reshard()
                    unit.set_reshard_after_forward(True)
        elif self.engine == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            params = [p for model in models for p in model.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU (every process must call it; only the main process's copy is
        complete under sharding)."""
        if self.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.engine == "deepspeed":
            state = self.accelerator.get_state_dict(model)  # ZeRO-3: gathered on the main process only
            return {k: v.detach().cpu() for k, v in (state or {}).items()}
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def save_shards(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        """This process's share of the optimizer state (sharded engines), written into a checkpoint directory
        being assembled; every process calls it."""
        if self.engine == "deepspeed":
            model.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)
        elif self.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
            torch.save(state, directory / f"optimizer-shard-{self.process_index}.pt")

    def load_shards(self, directory: Path, model: torch.nn.Module, optimizer) -> None:
        if self.engine == "deepspeed":
            model.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)
        elif self.engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            state = torch.load(directory / f"optimizer-shard-{self.process_index}.pt", weights_only=False)
            set_optimizer_state_dict(model, optimizer, state)

    @property
    def optimizer_in_shards(self) -> bool:
        """True when the optimizer state is saved by ``save_shards`` (else by the main process, whole)."""
        return self.engine in ("fsdp2", "deepspeed")

    # --- collectives and the rest ------------------------------------------------------------------------------

    def my_batches(self, items: list, batch_size: int) -> Iterator[tuple[list, bool]]:
        """This process's share of ``items`` (every ``num_processes``-th) in batches, with the same number of batches
        on every process (a sharded model's forwards are collective): ``(batch, real)``; a process whose share ran
        out gets a stand-in batch (``real`` False) whose results it must not count."""
        mine = items[self.process_index :: self.num_processes]
        per_process = -(-len(items) // self.num_processes)
        for i in range(-(-per_process // batch_size)):
            chunk = mine[i * batch_size : (i + 1) * batch_size]
            yield (chunk, True) if chunk else (items[:1], False)

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor)

    def autocast(self):
        return self.accelerator.autocast()


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s structure with its parameters on the meta device (no memory): what the gathered
    full weights are loaded into for the final save. Buffers are copied (small)."""
    import copy

    # a parameter partitioned by ZeRO-3 holds an empty tensor; its real shape is ds_shape
    memo = {id(p): torch.nn.Parameter(torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=p.dtype,
                                                  device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes a transformers model names in
    ``_no_split_modules`` (GPT2Block, LlamaDecoderLayer, T5Block, ...), found anywhere inside (peft wrappers, a
    value-head wrapper)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _broadcast_from_rank0(model: torch.nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in model.state_dict(keep_vars=True).values():
                dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def _without_env(name: str):
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value
