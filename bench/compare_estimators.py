"""Advantage estimators side by side on the shipped tasks: reward against PPO step and against wall-clock time.

    python bench/compare_estimators.py tiny --seeds 0 1 2          # configs/tiny/{ppo,grpo}.yaml, 60 steps each
    python bench/compare_estimators.py calculator --seeds 0 1 2    # the calculator PPO stage from one SFT model
    python bench/compare_estimators.py tiny --only grpo rloo        # a subset
    python bench/compare_estimators.py tiny --plot-only             # redraw from OUT/summary.json

Estimators: gae (PPO with a value head), grpo, rloo, reinforce_pp (with groups: "REINFORCE++-baseline"). On tiny,
gae runs configs/tiny/ppo.yaml and the others configs/tiny/grpo.yaml (8 completions per prompt, 2 epochs);
on the calculator every estimator runs configs/calculator.yaml, the critic-free ones with 4 completions per prompt.
Each run is a real `rlcli ppo` process, one at a time (bench/ppo_seeds.py does the running and the success checks).
Wall-clock is the sum of the runs' own per-step times (time_step), so start-up and model building are left out.

Writes OUT/summary.json and OUT/estimators.png (OUT: runs/compare-TASK); prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_seeds import REPO, calculator, tiny  # noqa: E402

RUNS = {
    "tiny": {
        "gae": ("configs/tiny/ppo.yaml", []),
        "grpo": ("configs/tiny/grpo.yaml", []),
        "rloo": ("configs/tiny/grpo.yaml", ["ppo.advantage=rloo"]),
        "reinforce_pp": ("configs/tiny/grpo.yaml", ["ppo.advantage=reinforce_pp"]),
    },
    "calculator": {
        "gae": ("configs/calculator.yaml", []),
        "grpo": ("configs/calculator.yaml", ["ppo.advantage=grpo", "ppo.group_size=4"]),
        "rloo": ("configs/calculator.yaml", ["ppo.advantage=rloo", "ppo.group_size=4"]),
        "reinforce_pp": ("configs/calculator.yaml", ["ppo.advantage=reinforce_pp", "ppo.group_size=4"]),
    },
}


def plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, entry in summary["estimators"].items():
        runs = entry["results"]
        steps = min(len(r["rewards"]) for r in runs)
        per_step = [[r["rewards"][i] for r in runs] for i in range(steps)]
        mean = [statistics.mean(v) for v in per_step]
        low, high = [min(v) for v in per_step], [max(v) for v in per_step]
        x = list(range(1, steps + 1))
        line, = by_step.plot(x, mean, label=f"{name} ({len(runs)} seeds)")
        by_step.fill_between(x, low, high, alpha=0.15, color=line.get_color())
        clock = [statistics.mean(sum(r["step_seconds"][: i + 1]) for r in runs) for i in range(steps)]
        by_time.plot(clock, mean, color=line.get_color())
        by_time.fill_between(clock, low, high, alpha=0.15, color=line.get_color())
    task = summary["task"]
    by_step.set_xlabel("PPO step")
    by_time.set_xlabel("wall-clock seconds (sum of step times, 2-core CPU)")
    by_step.set_ylabel("mean reward" + (" (exact match, training batch)" if task == "calculator" else " (sevens)"))
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(loc="lower right")
    fig.suptitle(f"{task}: advantage estimators, mean and range over seeds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(RUNS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, help="estimators to run (default: all)")
    parser.add_argument("--out", default=None, help="run directory (default runs/compare-TASK)")
    parser.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides for every run")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/summary.json")
    parser.add_argument("--reuse-gae", default=None, metavar="SUMMARY",
                        help="take gae's runs of these seeds from a bench/ppo_seeds.py summary.json (same recipe)")
    args = parser.parse_args()
    out = Path(args.out or REPO / "runs" / f"compare-{args.task}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"task": args.task, "estimators": {}}
    if args.reuse_gae:
        earlier = json.loads(Path(args.reuse_gae).read_text())
        summary["estimators"]["gae"] = {"recipe": RUNS[args.task]["gae"][0], "overrides": earlier["overrides"],
                                        "results": [r for r in earlier["results"] if r["seed"] in args.seeds]}
    if not args.plot_only:
        run = tiny if args.task == "tiny" else calculator
        for name in args.only or [n for n in RUNS[args.task] if not (n == "gae" and args.reuse_gae)]:
            recipe, extra = RUNS[args.task][name]
            results = []
            for seed in args.seeds:
                results.append(run(seed, out, [*extra, *args.set], recipe=recipe, label=name))
                r = results[-1]
                print(f"{name} seed {seed}: final {r['final_reward']:.3g}, {sum(r['step_seconds']):.0f} s of steps",
                      flush=True)
            summary["estimators"][name] = {"recipe": recipe, "overrides": extra, "results": results}
            summary_file.write_text(json.dumps(summary, indent=1))
    plot(summary, out / "estimators.png")
    print(f"\n{'estimator':<14}{'final reward (min-max)':>26}{'s per step':>12}{'all succeeded':>15}")
    for name, entry in summary["estimators"].items():
        finals = [r["final_reward"] for r in entry["results"]]
        per_step = statistics.mean(statistics.mean(r["step_seconds"]) for r in entry["results"])
        ok = all(r["success"] for r in entry["results"])
        print(f"{name:<14}{statistics.mean(finals):>12.3g} ({min(finals):.3g}-{max(finals):.3g}){'':>4}"
              f"{per_step:>10.2f}{str(ok):>15}")
    print(f"plot: {out / 'estimators.png'}")


if __name__ == "__main__":
    main()
