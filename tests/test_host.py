"""``train.host_memory``: ``lean`` has glibc hand freed large blocks back to the OS instead of keeping them in a heap
that fragments; ``balanced`` (the default) puts torch's large CPU tensors on huge pages (bench/README.md, "Where a CPU
step's memory goes"); the run header says what is in force."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, read_metrics, run_cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                                reason="the setting tunes glibc's malloc")

# a step's pattern in miniature: 8 MiB activations with small long-lived tensors allocated between them, all freed
PATTERN = textwrap.dedent("""
    import sys, torch
    from rlcli.host import lean_mmap
    if sys.argv[1] == "lean":
        assert lean_mmap()
    def rss():
        return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    base, keep, peak = rss(), [], 0
    for step in range(3):
        acts = []
        for layer in range(30):
            acts.append(torch.ones(2 << 20))
            keep.append(torch.ones(1 << 10))
        peak = max(peak, rss())
        del acts
    print((peak - base) >> 20, (rss() - base) >> 20)
""")


def held(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], cwd=REPO, capture_output=True, text=True, check=True)
    peak, after = map(int, out.stdout.split())
    return peak, after


def test_lean_returns_freed_activations_to_the_os():
    live = 30 * 8  # MiB held at each step's peak
    lean_peak, lean_after = held("lean")
    fast_peak, fast_after = held("fast")
    assert lean_after <= 16 and lean_peak <= live + 32, (lean_peak, lean_after)
    assert fast_after >= lean_after and fast_peak >= lean_peak, (fast_peak, fast_after, lean_peak, lean_after)


@pytest.mark.slow
def test_a_lean_run_says_so(tmp_path):
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'run'}", "logging.progress=false",
                  "train.max_steps=2", "train.host_memory=lean")
    assert res.returncode == 0, res.stderr
    assert "lean host memory" in res.stdout, res.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-1] == 2


ALIGNMENT = textwrap.dedent("""
    import sys
    from rlcli.host import THP_MIN_BYTES, set_host_memory
    set_host_memory(sys.argv[1])  # before the first tensor (importing peft makes one), as rlcli.cli does
    import peft, torch
    print(sum(torch.empty(THP_MIN_BYTES, dtype=torch.uint8).data_ptr() % 4096 == 0 for _ in range(8)))
""")


@pytest.mark.parametrize("mode", ["fast", "balanced", "lean"])
def test_balanced_and_lean_put_large_tensors_on_huge_pages(mode, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    out = subprocess.run([sys.executable, "-c", ALIGNMENT, mode], cwd=REPO, capture_output=True, text=True,
                         check=True)
    page_aligned = int(out.stdout.split()[-1])  # torch page-aligns what it advises; glibc's blocks are 64-aligned
    assert page_aligned == 8 if mode != "fast" else page_aligned < 8, out.stdout


def test_the_run_header_says_what_is_in_force(tmp_path, monkeypatch):
    from rlcli.host import kernel_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'run'}", "logging.progress=false",
                  "train.max_steps=1")
    assert res.returncode == 0, res.stderr
    assert ("host memory on huge pages" in res.stdout) == kernel_huge_pages(), res.stdout
