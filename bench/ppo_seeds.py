"""Learning curves of the shipped PPO recipes over several seeds: does every seed succeed, and how long does it take?

    python bench/ppo_seeds.py tiny --seeds 0 1 2 3 4          # configs/tiny/ppo.yaml, 60 steps each
    python bench/ppo_seeds.py calculator --seeds 0 1 2 3 4    # SFT once, then the PPO stage per seed, evaluated
    python bench/ppo_seeds.py tiny --seeds 0 1 --set generation.min_new_tokens=32
    python bench/ppo_seeds.py chain --seeds 0 1 2 3 4     # the offline RLHF twin: SFT and RM once, PPO per seed
    python bench/ppo_seeds.py detox --seeds 0 1 2 3 4     # the offline detox twin: classifier and SFT once

Success (docs/ppo-details.md, "learning is part of correctness"), judged on the final model of every seed:
  tiny:        mean reward of the last 5 steps >= 12 (of 16)
  calculator:  the final policy >= 90% exact match on the 200 held-out problems (sampled at T=0.7, as in training),
               no step after step 10 with training reward < 0.5, KL to the reference < 5 at every step, and (with a
               critic) explained variance > 0 over every 5 consecutive steps from step 10 on (pooled: each step
               weighted by its return variance; pooled_explained_variance says why)
  chain:       the final policy's answers helpful >= 90% (256 questions at T=1, recipes/chain.py evaluate)
  detox:       the final policy's continuations toxic <= 5% (256 prompts at T=1, recipes/detox.py evaluate)
and for all: no step with mean KL below -0.1 (kl_negative_steps == 0). The critic's explained variance is reported
for every task with a critic.

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


EV_WINDOW = 5  # steps pooled by the explained-variance check (the same span as the run's own warning)


def pooled_explained_variance(rows: list[dict]) -> float:
    """1 - Σ SS(returns - values) / Σ SS(returns) over ``rows``' model tokens, each step's squares taken around its
    own means (so a critic is not credited for following the reward's rise from step to step). It is the per-step
    explained variance of metrics.jsonl weighted by each step's return variance: a step where nearly every episode
    scored alike, whose few failures decide the per-step value by chance, weighs as little as its variance."""
    err = ret = 0.0
    for r in rows:
        tokens = r["model_tokens"] * r["episodes"]
        err += tokens * (r["value_error"] ** 2 - (r["return_mean"] - r["value_mean"]) ** 2)
        ret += tokens * r["return_std"] ** 2
    return 1.0 - err / ret if ret > 0 else float("nan")


def critic_stats(m: list[dict], start: int = 10) -> dict:
    """The critic's explained variance: per step (as logged), its mean, the lowest from ``start`` on, and the pooled
    value over every window of EV_WINDOW consecutive steps from ``start`` on."""
    ev = [r["explained_variance"] for r in m if "explained_variance" in r]
    late = [r["explained_variance"] for r in m if r["step"] >= start and "explained_variance" in r]
    with_critic = [r for r in m if "value_error" in r and r["step"] >= start]
    windows = [pooled_explained_variance(with_critic[i : i + EV_WINDOW])
               for i in range(max(len(with_critic) - EV_WINDOW + 1, 0))]
    return {"explained_variance": [r.get("explained_variance") for r in m],
            "ev_mean": statistics.mean(ev) if ev else float("nan"), "min_ev_from_10": min(late, default=float("nan")),
            "pooled_ev_from_10": windows, "min_pooled_ev_from_10": min(windows, default=float("nan"))}


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
    critic = critic_stats(m)
    checks = {"final >= 0.9": summary["reward_mean"] >= 0.9,
              "reward >= 0.5 after step 10": min(r["reward_mean"] for r in late) >= 0.5 if late else False,
              "KL < 5": max(r["kl"] for r in m) < 5, "KL >= -0.1": min(r["kl"] for r in m) >= -0.1}
    if critic["pooled_ev_from_10"]:
        checks[f"explained variance > 0 over every {EV_WINDOW} steps from step 10"] = all(
            x > 0 for x in critic["pooled_ev_from_10"])
    return {"seed": seed, "seconds": seconds, "rewards": [r["reward_mean"] for r in m],
            "step_seconds": [r["time_step"] for r in m], "kl": [r["kl"] for r in m], **critic,
            "held_out": {r["step"]: r["eval/reward_mean"] for r in rows_of(run) if "eval/reward_mean" in r},
            "final_reward": summary["reward_mean"], "tool_use_rate": summary["tool_use_rate"],
            "min_reward_after_10": min((r["reward_mean"] for r in late), default=float("nan")),
            "max_kl": max(r["kl"] for r in m),
            "min_kl": min(r["kl"] for r in m), "kl_negative_steps": m[-1].get("kl_negative_steps", 0.0),
            "checks": checks, "success": all(checks.values())}


def recipe_eval(script: str, run: Path, *extra: str) -> dict:
    """``python recipes/SCRIPT evaluate RUN ...``: the JSON line it prints (the twins' own before / after figures)."""
    done = subprocess.run([sys.executable, f"recipes/{script}", "evaluate", str(run), *extra], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): recipes/{script} evaluate {run}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def twin(seed: int, out: Path, extra: list[str], task: str) -> dict:
    """The offline RLHF twins (configs/tiny/chain, configs/tiny/detox): their first stages once, PPO per seed, the
    final policy scored by the twin's own evaluation."""
    if task == "chain":
        sft, rm = out / "chain-sft", out / "chain-rm"
        if not (rm / "reward_stats.json").exists():
            rlcli("sft", "configs/tiny/chain/sft.yaml", f"output_dir={sft}", "overwrite_output_dir=true",
                  log=out / "chain-sft.log")
            rlcli("rm", "configs/tiny/chain/rm.yaml", f"output_dir={rm}", f"model.name_or_path={sft}",
                  "overwrite_output_dir=true", log=out / "chain-rm.log")
        recipe, stage = "configs/tiny/chain/ppo.yaml", [f"model.name_or_path={sft}", f"reward.adapter={rm}"]
        evaluate, key = (lambda run: recipe_eval("chain.py", run, "--rm", str(rm))), "helpful"
        criterion, passes = "helpful >= 0.9", lambda final: final >= 0.9
    else:
        sft, classifier = out / "detox-sft", out / "detox-classifier"
        if not (sft / "config.json").exists():
            done = subprocess.run([sys.executable, "recipes/detox.py", "classifier", "--out", str(classifier)],
                                  cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"failed: recipes/detox.py classifier:\n{done.stderr[-2000:]}")
            rlcli("sft", "configs/tiny/sft.yaml", "data.path=data/tiny/detox/sft.jsonl", f"output_dir={sft}",
                  "overwrite_output_dir=true", log=out / "detox-sft.log")
        recipe, stage = "configs/tiny/detox.yaml", [f"model.name_or_path={sft}", f"reward.model={classifier}"]
        evaluate, key = (lambda run: recipe_eval("detox.py", run, "--classifier", str(classifier))), "toxic_fraction"
        criterion, passes = "toxic <= 0.05", lambda final: final <= 0.05
    before_file = out / f"{task}-before.json"
    if not before_file.exists():
        before_file.write_text(json.dumps(evaluate(sft)))
    run = out / f"{task}-ppo-seed{seed}"
    seconds = rlcli("ppo", recipe, *stage, f"seed={seed}", f"output_dir={run}", "logging.progress=false",
                    "overwrite_output_dir=true", *extra, log=out / f"{task}-ppo-seed{seed}.log")
    m = metrics(run)
    after = evaluate(run)
    final = after[key]
    checks = {criterion: passes(final), "KL >= -0.1": min(r["kl"] for r in m) >= -0.1}
    return {"seed": seed, "seconds": seconds, "rewards": [r["reward_mean"] for r in m],
            "step_seconds": [r["time_step"] for r in m], "kl": [r["kl"] for r in m], "final_reward": final,
            "before": json.loads(before_file.read_text()), "after": after, "max_kl": max(r["kl"] for r in m),
            "min_kl": min(r["kl"] for r in m), "kl_negative_steps": m[-1].get("kl_negative_steps", 0.0),
            **critic_stats(m), "checks": checks, "success": all(checks.values())}


def plot(results: list[dict], task: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], label=f"seed {r['seed']}", alpha=0.8)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean reward" + {"calculator": " (exact match)", "tiny": " (sevens, of 16)"}.get(task, ""))
    ax.set_title(f"{task}: reward per PPO step, {len(results)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["tiny", "calculator", "chain", "detox"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="run directory (default runs/seeds-TASK)")
    parser.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides for the PPO runs")
    args = parser.parse_args()
    out = Path(args.out or REPO / "runs" / f"seeds-{args.task}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = {"tiny": tiny, "calculator": calculator}.get(args.task, lambda seed, out, extra: twin(seed, out, extra,
                                                                                               args.task))
    results = []
    for seed in args.seeds:
        results.append(run(seed, out, args.set))
        r = results[-1]
        failed = [name for name, ok in r.get("checks", {}).items() if not ok]
        extra = (f", lowest reward after step 10 {r['min_reward_after_10']:.3g}, max KL {r['max_kl']:.3g}, explained "
                 f"variance from step 10: lowest step {r['min_ev_from_10']:.3g}, lowest {EV_WINDOW}-step pool "
                 f"{r['min_pooled_ev_from_10']:.3g}") if "min_reward_after_10" in r else ""
        if "before" in r:
            figures = lambda d: ", ".join(f"{k} {v:.3g}" for k, v in d.items())  # noqa: E731
            extra = (f" (before PPO: {figures(r['before'])}; after: {figures(r['after'])}), max KL {r['max_kl']:.3g}, explained variance: "
                     f"mean {r['ev_mean']:.3g}, lowest {EV_WINDOW}-step pool from step 10 "
                     f"{r['min_pooled_ev_from_10']:.3g}")
        print(f"seed {seed}: final {r['final_reward']:.3g}, min KL {r['min_kl']:.3g}{extra}, {r['seconds']:.0f} s, "
              f"{'ok' if r['success'] else 'FAILED' + (': ' + ', '.join(failed) if failed else '')}", flush=True)
    finals = [r["final_reward"] for r in results]
    times = [r["seconds"] for r in results]
    summary = {"task": args.task, "overrides": args.set, "seeds": args.seeds, "results": results,
               "final_mean": statistics.mean(finals), "final_min": min(finals), "final_max": max(finals),
               "seconds_mean": statistics.mean(times), "all_succeeded": all(r["success"] for r in results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.task, out / "curves.png")
    final = {"tiny": "reward (last 5 steps)", "calculator": "held-out exact match", "chain": "helpful answers",
             "detox": "toxic continuations"}[args.task]
    print(f"{args.task}: final {final} {summary['final_mean']:.3g} (min {summary['final_min']:.3g}, max "
          f"{summary['final_max']:.3g}) over {len(results)} seeds; {summary['seconds_mean']:.0f} s per run; "
          f"all succeeded: {summary['all_succeeded']}; plot {out / 'curves.png'}")


if __name__ == "__main__":
    main()
