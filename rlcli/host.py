"""The process's use of the host: CPU threads and how freed memory goes back to the OS (set once per run by
``trainers.run.Run``; a module of its own, light to import, so a test can exercise it in a fresh process)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch


def cpu_threads(processes: int) -> int:
    """Set and return torch's intra-op thread count for this process: ``OMP_NUM_THREADS`` when the user set it, else
    the CPU cores this process may run on shared by the processes of this machine (``LOCAL_WORLD_SIZE``; torch's
    own default gives every process all cores, which oversubscribes a CPU run of several processes)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes) or 1)
    threads = max(1, cores // max(local, 1))
    torch.set_num_threads(threads)
    return threads


LEAN_MMAP_THRESHOLD = 1 << 20  # bench/README.md: 64 KiB and 1 MiB keep the same peak, 4 MiB keeps 12 % more
THP_MIN_BYTES = 2 << 20  # torch advises CPU tensors of this size or more onto huge pages (c10/core/alignment.h)


def set_host_memory(mode: str) -> None:
    """Apply ``train.host_memory`` to this process; as early as the recipe is known (``rlcli.cli``), since torch
    reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU allocation. Idempotent; a setting the user made in the
    environment wins.

    - ``balanced``: torch's own switch ``THP_MEM_ALLOC_ENABLE`` (c10/core/alloc_cpu.cpp): CPU tensors of 2 MiB or
      more are page-aligned and advised onto transparent huge pages (``madvise(MADV_HUGEPAGE)``). Measured on
      SmolLM2 LoRA SFT, the peak resident memory falls by ~45 % for ~7 % more CPU time (bench/README.md).
    - ``lean``: that, and ``lean_mmap()``.
    - ``fast``: glibc's and torch's defaults."""
    if mode in ("balanced", "lean"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if mode == "lean":
        lean_mmap()


def host_memory_in_force(mode: str) -> str | None:
    """What the run header says of ``mode``, from what is in force (None for glibc's and torch's defaults):
    huge pages are checked on fresh tensors' alignment (torch page-aligns the ones it advises and 64-byte-aligns
    the rest; it may have read its switch before rlcli set it, e.g. in a program that imports rlcli's trainers)."""
    set_host_memory(mode)
    probes = [torch.empty(THP_MIN_BYTES, dtype=torch.uint8) for _ in range(3)]
    huge = all(t.data_ptr() % 4096 == 0 for t in probes) and kernel_huge_pages()
    lean = mode == "lean" and lean_mmap()
    if lean:
        return "lean host memory" + (" on huge pages" if huge else "")
    return "host memory on huge pages" if huge else None


def kernel_huge_pages() -> bool:
    """Whether the kernel grants transparent huge pages to a range advised onto them (not ``never``)."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def lean_mmap() -> bool:
    """Make glibc's malloc serve blocks of ``LEAN_MMAP_THRESHOLD`` bytes or more with mmap of their own, returned to
    the OS on free (part of ``train.host_memory: lean``); True when it is in force.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), after which a
    step's activations come from its heap, which fragments and keeps ~40 % more than the step holds at its peak.
    Setting the threshold once turns that adaptation off. No torch or Python setting reaches this allocator, and
    jemalloc / tcmalloc would need LD_PRELOAD before the process starts, hence mallopt through ctypes here. A user's
    ``MALLOC_MMAP_THRESHOLD_`` wins (glibc has already applied it)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_mmap_threshold = -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, LEAN_MMAP_THRESHOLD))
