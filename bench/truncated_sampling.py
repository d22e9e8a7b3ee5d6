"""Why `rlcli ppo` refuses top-k / top-p: what each way of taking log-probs under truncated sampling does.

    python bench/truncated_sampling.py                  # configs/tiny/ppo.yaml, top_k=10, 40 steps
    python bench/truncated_sampling.py --top-k 5 --steps 60

Trains the tiny PPO recipe with responses sampled by top-k but the loss, entropy and KL taken from the full
distribution (what rlcli did before, and what most PPO code does), and records per step:

- ``kl``: the logged mean KL; it should never be negative for tokens sampled from the policy;
- ``mass_outside_top_k``: the probability the (full) policy puts on tokens its own top-k cut never lets it sample;
  the loss is blind to the cut, so nothing stops this from growing;
- ``outside_ref_top_k``: the fraction of sampled tokens that are *not* in the reference model's own top-k set. Had
  the loss replayed the cut on both models instead, each of those tokens would get log pi_ref = -inf, a KL of +inf.

Prints a table and writes bench/results/truncated_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/tiny/ppo.yaml")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results", help="where truncated_sampling.json goes (default bench/results)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (a smaller batch, ...)")
    args = parser.parse_args()
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.data.prompts import load_prompt_rows
    from rlcli.models.loading import load_tokenizer
    from rlcli.rl import SamplingRules
    from rlcli.ppo.build import build_learner, rollout_setup
    from rlcli.ppo.preflight import policy_task
    from rlcli.ppo.rollout import collect_episodes

    recipe = load_recipe(PPORecipe, args.recipe, [f"ppo.steps={args.steps}", f"seed={args.seed}",  # the cut: below
                                                  *args.overrides])
    accelerator = Accelerator(cpu=True)
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.model, padding_side="left")
    rows, column = load_prompt_rows(recipe.data)
    p = recipe.ppo
    policy, ref, reward, learner = build_learner(recipe, accelerator, tokenizer, policy_task(recipe),
                                                 optimizer_steps=p.steps * p.epochs * (p.batch_size // p.mini_batch_size))
    cut = SamplingRules(temperature=recipe.generation.temperature, top_k=args.top_k)
    learner.rules = SamplingRules(temperature=recipe.generation.temperature)  # the loss ignores the cut
    setup = rollout_setup(recipe, accelerator, tokenizer, rows, column, accelerator.unwrap_model(learner.model),
                          reward, cut)  # the sampler applies it
    records = []
    print(f"{args.recipe}: top_k={args.top_k} sampling, full-distribution loss; {args.steps} steps")
    print(f"{'step':>4} {'reward':>7} {'kl':>8} {'mass_outside_top_k':>19} {'outside_ref_top_k':>18}")
    for step in range(1, args.steps + 1):
        ep = collect_episodes(setup, step)
        r = ep.rollout
        mask = r.model_mask.bool()
        with torch.no_grad():
            logits, _ = policy(r.query_ids, r.query_mask, r.response_ids, r.response_mask, with_values=False)
            ref_logits, _ = ref(r.query_ids, r.query_mask, r.response_ids, r.response_mask, with_values=False)
        outside = float(cut.forbidden_mass(logits)[mask].mean())
        not_in_ref = float((cut.logprobs(ref_logits, r.response_ids) == float("-inf"))[mask].float().mean())
        stats = learner.step(r, ep.scores)
        records.append({"step": step, "reward": stats["reward_mean"], "kl": stats["kl"],
                        "mass_outside_top_k": outside, "outside_ref_top_k": not_in_ref})
        print(f"{step:>4} {stats['reward_mean']:>7.2f} {stats['kl']:>8.2f} {outside:>19.3f} {not_in_ref:>18.3f}",
              flush=True)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "truncated_sampling.json").write_text(json.dumps({"recipe": args.recipe, "top_k": args.top_k,
                                                             "records": records}, indent=1))


if __name__ == "__main__":
    main()
