"""Helpers shared by the benchmarks in ``bench/``: thread setup, the matmul reference rate, peak memory, forward-call
counters, tables and JSON.

Import this module before torch is imported anywhere (``setup_threads`` sets OMP_NUM_THREADS, which only counts
before the first torch import). Every benchmark defaults to ONE BLAS thread: on small shared VMs two threads make
small matmuls far slower as soon as anything else runs, and the numbers would measure the neighbours.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup_threads(argv: list[str]) -> int:
    """Honour ``--threads N`` (else $OMP_NUM_THREADS, else 1) before torch is imported; returns the count."""
    threads = None
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    if threads is None:
        threads = os.environ.get("OMP_NUM_THREADS", "1")
    threads = str(int(threads))
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    return int(threads)


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": device,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# --- timing ---------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def matmul_rate(n: int, device: str = "cpu", min_seconds: float = 0.3, m: int | None = None, k: int | None = None,
                dtype=None) -> dict:
    """Sustained rate of ``[m, k] @ [k, n]`` (square n×n×n by default) in FLOP/s: 2·m·k·n per product; float32
    unless ``dtype`` (e.g. ``torch.bfloat16``, for runs under bf16 autocast, whose matmuls run in bf16)."""
    import torch

    m = n if m is None else m
    k = n if k is None else k
    dtype = torch.float32 if dtype is None else dtype
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        torch.mm(a, b, out=out)
        reps += 1
        if reps % 4 == 0:
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
    cpu = time.process_time() - c0
    flops = 2.0 * m * k * n * reps
    # flop_per_cpu_s: per second of this process's CPU time; on a shared, oversubscribed CPU it leaves out the time
    # the process waited for a core (meaningful with one thread on CPU only)
    return {"shape": [m, k, n], "dtype": str(dtype).replace("torch.", ""), "flop_per_s": flops / elapsed, "flop_per_cpu_s": flops / cpu if cpu > 0 else float("nan"),
            "seconds_per_mm": elapsed / reps}


# --- memory ---------------------------------------------------------------------------------------------------


def peak_memory(device: str) -> dict:
    """Peak resident set size of this process (Linux reports KiB) and, on CUDA, the allocator's peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"cpu_max_rss_mib": rss_bytes / 2**20}
    if device.startswith("cuda"):
        import torch

        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# --- peak RSS and step times of a training run in a process of its own -----------------------------------------

def reset_peak() -> None:
    """Start the kernel's high-water mark of this process's resident memory (VmHWM) again from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def vm_hwm() -> int:
    """The most resident memory this process held since it started or since ``reset_peak``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


RLCLI_DRIVER = r"""
import json, resource, sys, time
sys.path.insert(0, BENCH_DIR)
from _common import reset_peak, vm_hwm
# as rlcli.cli does: train.host_memory before torch's first CPU allocation (importing the trainers makes one)
from pathlib import Path
from rlcli.commands import COMMANDS
from rlcli.config.loader import load_recipe_and_origin
from rlcli.host import set_host_memory
recipe, _ = load_recipe_and_origin(COMMANDS[sys.argv[2]].schema(), Path(sys.argv[3]), sys.argv[4:], processes=1)
set_host_memory(recipe.train.host_memory)
import rlcli.trainers.run as loop

marks, cpu = [], []
def cpu_now():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
steps = loop.Run.steps
def timed_steps(self):
    reset_peak()
    marks.append(time.perf_counter())
    cpu.append(cpu_now())
    return steps(self)
hwm = [0]
log = loop.Run.log
def timed_log(self, step, metrics, **kw):
    marks.append(time.perf_counter())
    cpu.append(cpu_now())
    hwm[0] = max(hwm[0], vm_hwm())  # the steps' peak: the final save comes after
    return log(self, step, metrics, **kw)
loop.Run.steps, loop.Run.log = timed_steps, timed_log

from rlcli.cli import main
out_json = sys.argv[1]
sys.argv = ["rlcli"] + sys.argv[2:]
try:
    main()
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
json.dump({"step_seconds": [b - a for a, b in zip(marks, marks[1:])],
           "cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])],
           "peak_rss_steps": hwm[0],
           "peak_rss_run": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, open(out_json, "w"))
"""
"""Runs ``rlcli ARGS...`` (``python driver.py RESULT.json ARGS...``) and writes to RESULT.json: ``step_seconds``
(from one ``Run.log`` to the next; the first step counts from the loop's start), ``cpu_seconds`` (the process's
user + system CPU time over the same spans), ``peak_rss_steps`` (``VmHWM``
read at every ``Run.log``, after a reset when the loop starts: the weights are loaded by then, the final save
is not counted) and ``peak_rss_run`` (``ru_maxrss``: the whole process). ``Run`` serves every trainer (sft, rm,
ppo), so this times any of them."""


def run_rlcli(source: Path, args: list[str], work: Path, tag: str, threads: int,
              extra_env: dict[str, str] | None = None) -> dict:
    """``rlcli ARGS`` with ``source`` first on ``PYTHONPATH`` (and ``extra_env`` set), in a process of its own under
    ``RLCLI_DRIVER``;
    returns its figures plus ``metrics`` (the lines of ``OUTPUT_DIR/metrics.jsonl``; ``args`` must set
    ``output_dir``) and ``seconds`` (the whole process)."""
    result = work / f"{tag}.json"
    driver = work / "rlcli_driver.py"
    driver.write_text(RLCLI_DRIVER.replace("BENCH_DIR", repr(str(Path(__file__).resolve().parent))))
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           **(extra_env or {})}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(driver), str(result), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tag} failed (rlcli {' '.join(args)}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    data = json.loads(result.read_text())
    data["seconds"] = time.perf_counter() - t0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    data["metrics"] = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
                       if line.strip()]
    return data


def run_driver(python: str, driver: Path, spec: dict, work: Path, tag: str, threads: int,
               extra_env: dict[str, str] | None = None) -> dict:
    """``PYTHON DRIVER SPEC.json RESULT.json`` (another tool's side of a comparison, in its own venv: no
    ``PYTHONPATH``, offline, ``threads`` BLAS threads); returns the driver's RESULT.json plus ``seconds``."""
    spec_path, result = work / f"{tag}-spec.json", work / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    res = subprocess.run([python, str(driver), str(spec_path), str(result)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    data = json.loads(result.read_text())
    data["seconds"] = time.perf_counter() - t0
    return data


# --- forward-call counters ------------------------------------------------------------------------------------


class ForwardCounter:
    """Wraps ``module.forward`` (instance attribute, so ``nn.Module.__call__`` goes through it) and records, per
    phase, how many calls ran with and without autograd and the shapes they saw.

    ``functools.wraps`` keeps ``inspect.signature`` of the wrapper equal to the original's, so code that inspects
    ``model.forward`` (the sampler's KV-cache keyword detection) sees the same parameters.
    """

    def __init__(self, name: str, device: str = "cpu", timed: bool = True):
        self.name = name
        self.device = device
        # timed=False: no per-call synchronisation or clock (on a GPU each would stall the CPU until the kernels
        # finish, hiding the CPU/GPU overlap a real run has); ``seconds`` stays empty, ``real`` counts stay
        # tensors until ``finish_shapes``
        self.timed = timed
        self.phase = "other"
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[tuple[str, bool]] = Counter()
        self.shapes: dict[str, list[dict]] = {}
        self.grad_violations: list[str] = []

    def attach(self, module) -> None:
        original = module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            import torch

            grad = torch.is_grad_enabled()
            self.calls[(self.phase, grad)] += 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is not None and hasattr(ids, "shape"):
                real = mask[:, -ids.shape[1]:].sum() if mask is not None else ids.numel()
                rec = {"shape": list(ids.shape), "grad": grad, "real": int(real) if self.timed else real,
                       "keep": kwargs.get("logits_to_keep")}
                dec = kwargs.get("decoder_input_ids")
                if dec is not None:
                    rec["decoder_shape"] = list(dec.shape)
                self.shapes.setdefault(self.phase, []).append(rec)
            if not self.timed:
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.seconds[self.phase] += time.perf_counter() - t0
            return out

        module.forward = forward

    def finish_shapes(self) -> None:
        """Turn the ``real`` token counts recorded as tensors (``timed=False``) into ints: one sync, at the end."""
        for recs in self.shapes.values():
            for rec in recs:
                rec["real"] = int(rec["real"])

    def count(self, phase: str, grad: bool | None = None) -> int:
        return sum(n for (p, g), n in self.calls.items() if p == phase and (grad is None or g == grad))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.shapes.clear()


@contextmanager
def phase(counters, name: str):
    for c in counters:
        c.phase = name
    try:
        yield
    finally:
        for c in counters:
            c.phase = "other"


# --- output ---------------------------------------------------------------------------------------------------


def human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note", style="dim")
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*row)
    Console(width=140).print(table)


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {p}")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
