"""Learning curves of the shipped PPO recipes over several seeds: does every seed succeed, and how long does it take?

    python bench/ppo_seeds.py tiny --seeds 0 1 2 3 4          # configs/tiny/ppo.yaml, 60 steps each
    python bench/ppo_seeds.py calculator --seeds 0 1 2 3 4    # SFT once, then the PPO stage per seed, evaluated
    python bench/ppo_seeds.py tiny --seeds 0 1 --set generation.min_new_tokens=32

Success (docs/ppo-details.md, "learning is part of correctness"), judged on the final model of every seed:
  tiny:        mean reward of the last 5 steps >= 12 (of 16)
  calculator:  the final policy >= 90% exact match on the 200 held-out problems (sampled at T=0.7, as in training),
               no step after step 10 with training reward < 0.5, KL to the reference < 5 at every step, and (with a
               critic) explained variance > 0 at every step from step 10 on
and for both: no step with mean KL below -0.1 (kl_negative_steps == 0).

Writes OUT/summary.json and OUT/curves.png (reward per step, every seed); prints a table. Each run is a real
`rlcli` process, one at a time; wall-clock times include process start-up and model building.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rlcli(*args: str, log: Path) -> float:
    """Run one rlcli command (output to ``log``); return its wall-clock seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "rlcli", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): rlcli {' '.join(args)}; see {log}")
    return time.perf_counter() - t0


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def metrics(run: Path) -> list[dict]:
    """The training steps' rows (a held-out evaluation of the initial policy is a row of its own at step 0)."""
    return [r for r in rows_of(run) if "reward_mean" in r]


def tiny(seed: int, out: Path, extra: list[str], recipe: str = "configs/tiny/ppo.yaml", label: str = "tiny") -> dict:
    run = out / f"{label}-seed{seed}"
    seconds = rlcli("ppo", recipe, f"seed={seed}", f"output_dir={run}", "logging.progress=false",
                    "overwrite_output_dir=true", *extra, log=out / f"{label}-seed{seed}.log")
    m = metrics(run)
    final = statistics.mean(r["reward_mean"] for r in m[-5:])
    return {"seed": seed, "seconds": seconds, "rewards": [r["reward_mean"] for r in m],
            "step_seconds": [r["time_step"] for r in m], "kl": [r["kl"] for r in m], "final_reward": final,
            "min_kl": min(r["kl"] for r in m), "kl_negative_steps": m[-1].get("kl_negative_steps", 0.0),
            "success": final >= 12 and min(r["kl"] for r in m) >= -0.1}


def calculator(seed: int, out: Path, extra: list[str], recipe: str = "configs/calculator.yaml",
               label: str = "calc-ppo") -> dict:
    sft = out / "calc-sft"
    if not (sft / "config.json").exists():
        rlcli("sft", "configs/calculator_sft.yaml", f"output_dir={sft}", "overwrite_output_dir=true",
              log=out / "calc-sft.log")
        rlcli("env-rollout", "configs/calculator_eval.yaml", f"model.name_or_path={sft}",
              f"output_dir={out / 'calc-eval-sft'}", "show=0", log=out / "calc-eval-sft.log")
    run = out / f"{label}-seed{seed}"
    seconds = rlcli("ppo", recipe, f"model.name_or_path={sft}", f"seed={seed}", f"output_dir={run}",
                    "logging.progress=false", "overwrite_output_dir=true", *extra, log=out / f"{label}-seed{seed}.log")
    evaluation = out / f"{label}-eval-seed{seed}"
    rlcli("env-rollout", "configs/calculator_eval.yaml", f"model.name_or_path={run}", f"output_dir={evaluation}",
          "show=0", log=out / f"{label}-eval-seed{seed}.log")
    summary = json.loads((evaluation / "summary.json").read_text())
    m = metrics(run)
    late = [r for r in m if r["step"] > 10]
    ev = [r["explained_variance"] for r in m if r["step"] >= 10 and "explained_variance" in r]
    checks = {"final >= 0.9": summary["reward_mean"] >= 0.9,
              "reward >= 0.5 after step 10": min(r["reward_mean"] for r in late) >= 0.5 if late else False,
              "KL < 5": max(r["kl"] for r in m) < 5, "KL >= -0.1": min(r["kl"] for r in m) >= -0.1,
              "explained variance > 0 from step 10": all(x > 0 for x in ev)}
    return {"seed": seed, "seconds": seconds, "rewards": [r["reward_mean"] for r in m],
            "step_seconds": [r["time_step"] for r in m], "kl": [r["kl"] for r in m],
            "explained_variance": [r.get("explained_variance") for r in m],
            "held_out": {r["step"]: r["eval/reward_mean"] for r in rows_of(run) if "eval/reward_mean" in r},
            "final_reward": summary["reward_mean"], "tool_use_rate": summary["tool_use_rate"],
            "min_reward_after_10": min((r["reward_mean"] for r in late), default=float("nan")),
            "max_kl": max(r["kl"] for r in m), "min_ev_from_10": min(ev, default=float("nan")),
            "min_kl": min(r["kl"] for r in m), "kl_negative_steps": m[-1].get("kl_negative_steps", 0.0),
            "checks": checks, "success": all(checks.values())}


def plot(results: list[dict], task: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], label=f"seed {r['seed']}", alpha=0.8)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean reward" + (" (exact match)" if task == "calculator" else " (sevens, of 16)"))
    ax.set_title(f"{task}: reward per PPO step, {len(results)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["tiny", "calculator"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="run directory (default runs/seeds-TASK)")
    parser.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides for the PPO runs")
    args = parser.parse_args()
    out = Path(args.out or REPO / "runs" / f"seeds-{args.task}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = tiny if args.task == "tiny" else calculator
    results = []
    for seed in args.seeds:
        results.append(run(seed, out, args.set))
        r = results[-1]
        failed = [name for name, ok in r.get("checks", {}).items() if not ok]
        extra = (f", lowest reward after step 10 {r['min_reward_after_10']:.3g}, max KL {r['max_kl']:.3g}, lowest "
                 f"explained variance from step 10 {r['min_ev_from_10']:.3g}") if "checks" in r else ""
        print(f"seed {seed}: final {r['final_reward']:.3g}, min KL {r['min_kl']:.3g}{extra}, {r['seconds']:.0f} s, "
              f"{'ok' if r['success'] else 'FAILED' + (': ' + ', '.join(failed) if failed else '')}", flush=True)
    finals = [r["final_reward"] for r in results]
    times = [r["seconds"] for r in results]
    summary = {"task": args.task, "overrides": args.set, "seeds": args.seeds, "results": results,
               "final_mean": statistics.mean(finals), "final_min": min(finals), "final_max": max(finals),
               "seconds_mean": statistics.mean(times), "all_succeeded": all(r["success"] for r in results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.task, out / "curves.png")
    print(f"{args.task}: final reward {summary['final_mean']:.3g} (min {summary['final_min']:.3g}, max "
          f"{summary['final_max']:.3g}) over {len(results)} seeds; {summary['seconds_mean']:.0f} s per run; "
          f"all succeeded: {summary['all_succeeded']}; plot {out / 'curves.png'}")


if __name__ == "__main__":
    main()
