"""The process's use of the host: CPU threads and how freed memory goes back to the OS (set once per run by
``trainers.loop.Run``; a module of its own, light to import, so a test can exercise it in a fresh process)."""

from __future__ import annotations

import ctypes
import os

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


def lean_host_memory() -> bool:
    """Make glibc's malloc serve blocks of ``LEAN_MMAP_THRESHOLD`` bytes or more with mmap of their own, returned to
    the OS on free (``train.host_memory: lean``); True when it is in force.

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
