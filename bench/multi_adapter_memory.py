"""Memory of multi-adapter RLHF (``reward.adapter``) against a reward model of its own (``reward.model``).

    python bench/multi_adapter_memory.py                      # GPT-2-small's blocks (86 M), CPU, ~1.5 min
    python bench/multi_adapter_memory.py --size qwen2-0.5b    # Qwen2-0.5B's blocks (358 M), several minutes on CPU
    python bench/multi_adapter_memory.py --device cuda --json out.json

A base of the chosen shape is built from scratch (random weights; the byte-level tokenizer, so the embedding
tables are 260 rows instead of the real vocabulary's, and the parameter counts above are the blocks') and saved, with a LoRA
reward model on it saved as ``rlcli rm`` saves one (adapter + score head, reward_stats.json). Then each setup runs in a
process of its own, built by the trainer's own ``build_learner`` and run for one PPO step (prompts, sampling, scoring,
``learner.step``), so that each peak is its own:

  adapter    LoRA policy; reference = the base with every adapter off; reward = ``reward.adapter`` on the same base
  separate   LoRA policy; reference = adapters off; reward = ``reward.model``: the reward model merged into a copy of
             its base (what rlcli did before reward.adapter)
  full       full fine-tuning: the policy, a frozen copy as reference, and the separate reward model (for scale)

Per setup: the bytes of all distinct parameter storages held by the policy, the reference and the reward model(s)
(shared tensors counted once), the process's peak resident memory (``ru_maxrss``) and its growth over the
process's size before any model was built, and on CUDA ``torch.cuda.max_memory_allocated``. The ratios
adapter / separate are the figures of bench/README.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import setup_threads

THREADS = setup_threads(sys.argv)

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

SIZES = {
    "tiny": ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}),
    "gpt2-small": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}),
    "qwen2-0.5b": ("qwen2", {"num_hidden_layers": 24, "hidden_size": 896, "intermediate_size": 4864,
                             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                             "tie_word_embeddings": True}),
}
MODES = ("adapter", "separate", "full")


def build_models(root: Path, size: str) -> None:
    """A saved base and a LoRA reward model on it (its LoRA B and score head random, so merging changes weights)."""
    import torch

    from rlcli.config.common import LoraConfig, ModelConfig
    from rlcli.models.loading import apply_lora, load_model, load_tokenizer
    from rlcli.rewards.reward_model import save_reward_stats
    from rlcli.models.saving import save_model

    arch, config = SIZES[size]
    tok = load_tokenizer(ModelConfig(architecture=arch))
    torch.manual_seed(0)
    load_model(ModelConfig(architecture=arch, config=config), "causal", tok).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rm = apply_lora(load_model(ModelConfig(name_or_path=str(root / "base")), "classifier", tok), LoraConfig(r=16),
                    "classifier")
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    (root / "rm").mkdir()
    save_model(rm, tok, root / "rm", run_dir=root / "rm", built_from_scratch=False, merge=False)
    save_reward_stats(root / "rm", mean=0.0, std=1.0, count=1, max_length=64)


def recipe_file(root: Path, mode: str) -> Path:
    import yaml
    from _common import REPO

    recipe = {
        "output_dir": str(root / f"run-{mode}"),
        "model": {"name_or_path": str(root / "base")},
        "data": {"path": str(REPO / "data" / "tiny" / "prompts.jsonl")},
        "generation": {"max_new_tokens": 16},
        "reward": {"adapter": str(root / "rm")} if mode == "adapter" else {"model": str(root / "rm")},
        "ppo": {"steps": 1, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8, "epochs": 1},
        "logging": {"progress": False},
    }
    if mode != "full":
        recipe["lora"] = {"r": 16}
    path = root / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def child(root: Path, mode: str, device: str) -> dict:
    """One setup, one PPO step, in this process: what it held and its peak memory."""
    from _common import peak_memory
    from accelerate import Accelerator

    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.data.prompts import load_prompt_rows
    from rlcli.models.loading import load_tokenizer
    from rlcli.rewards.adapter import unique_parameter_bytes
    from rlcli.ppo.build import build_learner, rollout_setup
    from rlcli.ppo.preflight import policy_task, preflight
    from rlcli.ppo.rollout import collect_episodes

    before = peak_memory(device)["cpu_max_rss_mib"]
    recipe = load_recipe(PPORecipe, str(recipe_file(root, mode)), [])
    preflight(recipe)
    accelerator = Accelerator(cpu=device == "cpu")
    tokenizer = load_tokenizer(recipe.model, padding_side="left")
    rows, column = load_prompt_rows(recipe.data)
    task = policy_task(recipe)
    policy, ref, reward, learner = build_learner(recipe, accelerator, tokenizer, task, optimizer_steps=1)
    scorer = reward.scorer
    models = [policy, ref, scorer.model, getattr(scorer, "head", None)]
    held = unique_parameter_bytes(*models)
    setup = rollout_setup(recipe, accelerator, tokenizer, rows, column, accelerator.unwrap_model(learner.model),
                          reward, learner.rules)
    ep = collect_episodes(setup, 1)
    stats = learner.step(ep.rollout, ep.scores)
    peak = peak_memory(device)
    out = {"mode": mode, "weights_mib": held / 2**20, "rss_before_mib": before, "peak_rss_mib": peak["cpu_max_rss_mib"],
           "peak_rss_growth_mib": peak["cpu_max_rss_mib"] - before, "reward_mean": stats["reward_mean"],
           "base_params": sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n
                              and "value_head" not in n)}
    if "cuda_max_allocated_mib" in peak:
        out["cuda_max_allocated_mib"] = peak["cuda_max_allocated_mib"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2-small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.root), args.child, args.device)))
        return 0

    results = {}
    with tempfile.TemporaryDirectory(prefix="rlcli-bench-") as tmp:
        root = Path(tmp)
        build_models(root, args.size)
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--device", args.device,
                   "--threads", str(THREADS)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                  check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[mode] = json.loads(lines[-1][len("RESULT "):])

    base = next(iter(results.values()))["base_params"]
    print(f"multi-adapter RLHF memory: base {args.size} ({base / 1e6:.0f} M parameters, float32), {args.device}, "
          f"{THREADS} thread(s); one PPO step of 8 episodes × 16 tokens")
    cols = ["weights_mib", "peak_rss_mib", "peak_rss_growth_mib"] + (
        ["cuda_max_allocated_mib"] if args.device == "cuda" else [])
    print(f"{'setup':<10}" + "".join(f"{c:>24}" for c in cols))
    for mode, r in results.items():
        print(f"{mode:<10}" + "".join(f"{r[c]:>24.0f}" for c in cols))
    if "adapter" in results and "separate" in results:
        a, s = results["adapter"], results["separate"]
        ratios = {f"{c}_ratio": a[c] / s[c] for c in cols}
        print("adapter / separate: " + ", ".join(f"{c} {v:.2f}" for c, v in ratios.items()))
        results["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
