"""The tiny PPO step of ``rlcli ppo`` against TRL 0.11's classic ``PPOTrainer`` on the same work: a GPT-2
of 4 layers × 256 width built from scratch, 64 episodes × 32 new tokens per step, minibatches of 32, 4 PPO epochs,
float32 on CPU. Each side runs in a process of its own, alternately; step time, peak resident memory and the reward
per step, then (``--profile``) rlcli's own step profile (``bench/ppo_step.py``) on the same setting.

    python bench/trl011_ppo.py --steps 2 --rounds 1 --no-profile           # a quick check that both sides run
    python bench/trl011_ppo.py --steps 5 --rounds 3 --json trl011.json     # the figures in bench/README.md
    python bench/trl011_ppo.py --setup-only                                # only build the TRL 0.11 virtualenv

The TRL side runs in a virtualenv of its own (``--trl-venv``, default ``~/.cache/rlcli/bench-venv-trl-0.11``), built
on first use: ``torch==2.13.0`` first (pinned, so that pip never brings another build of it; from wherever pip is
configured to look, as ``scripts/setup.sh``: set ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`` where
PyPI would bring its CUDA build), then ``trl==0.11.4``
with the transformers / accelerate / datasets / tokenizers / huggingface_hub / tyro / rich versions below
(``TRL_STACK``: transformers 4.46, the last minor TRL 0.11 was released against; ``rich`` is imported by TRL 0.11
without being among its requirements).

The work, taken from rlcli's recipe (default ``configs/tiny/ppo.yaml``, ``--width`` sets ``model.config.n_embd``,
further ``KEY=VALUE`` overrides apply to both sides):

- **model**: rlcli builds the recipe's model from scratch (seed = the recipe's) with its byte-level tokenizer,
  dropouts at 0, and saves it once; both sides load that directory, so they start from the same weights. TRL 0.11's
  transformers 4.46 cannot read the saved ``tokenizer_config.json`` (transformers 5's ``TokenizersBackend``), so
  the TRL side wraps the same ``tokenizer.json`` in a ``PreTrainedTokenizerFast`` with the same special tokens.
  The value head is zero-initialised on both sides (rlcli's ``ppo.value_head_init_std: 0``).
- **prompts**: each step's 64 prompts in rlcli's order (``rlcli.seeds.index_stream``), encoded by rlcli's
  ``encode_prompt``; TRL gets the token ids.
- **reward**: the recipe's ``reward.function`` (``recipes/sevens.py:score``) on the decoded responses.
- **PPO**: ``PPOConfig`` from the recipe: batch, minibatch (TRL's ``mini_batch_size`` is the forward micro-batch,
  ``gradient_accumulation_steps`` = minibatch / micro-batch), epochs, learning rate, γ, λ, clip ranges, vf_coef,
  ``max_grad_norm``, reward whitening; a fixed KL controller with the recipe's β and ``kl_penalty="kl"`` (k1);
  AdamW with the recipe's betas / eps / weight decay handed to TRL (its default would be Adam).
- **sampling**: temperature, ``top_k=0``, ``top_p=1``, the recipe's ``max_new_tokens``, stop at EOS; TRL generates
  the whole batch in one ``generate`` call (``batch_size=64``; its default is 4).

What cannot be made the same is printed (``DIFFERENCES``). Each run: ``rlcli ppo RECIPE output_dir=<tmp> ...``
under ``_common.RLCLI_DRIVER``, ``bench/_trl011_driver.py`` in the TRL venv. **step time** is the median of the
steps after the first (over all rounds), **peak RSS of the steps** the kernel's high-water mark after a reset when
training starts, **peak RSS of the run** ``ru_maxrss`` of the whole process. **step CPU time** is the median of
the same steps' user + system CPU time of the process: on a shared machine it leaves out the time spent waiting
for a core, which wall-clock step times of a few seconds do not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_driver, run_rlcli, setup_threads

THREADS = setup_threads(sys.argv)

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import tempfile

TRL_VERSION = "0.11.4"
TORCH_VERSION = "2.13.0"
# what installs and imports cleanly with torch 2.13 and TRL 0.11.4
TRL_STACK = {"transformers": "4.46.3", "tokenizers": "0.20.3", "accelerate": "1.16.0", "datasets": "5.0.1",
             "huggingface_hub": "0.36.2", "tyro": "1.0.17", "rich": "15.0.0"}
DEFAULT_VENV = Path.home() / ".cache" / "rlcli" / f"bench-venv-trl-{TRL_VERSION.rsplit('.', 1)[0]}"
RECIPE = "configs/tiny/ppo.yaml"
DRIVER = Path(__file__).resolve().parent / "_trl011_driver.py"
# logging every step as TRL's step() computes its statistics every step; no sample tables, no checkpoint mid-run
COMMON = ["logging.progress=false", "logging.log_every=1", "overwrite_output_dir=true", "train.save_every=100000",
          "train.sample_every=100000"]

DIFFERENCES = [
    ("sampling: rlcli's own KV-cache sampler (rlcli.models.generation) vs transformers 4.46's generate; the same "
     "distribution (temperature, no top-k / top-p) but other random draws, so the episodes, their lengths and the "
     "rewards differ from step 1 on"),
    ("rollout forward: rlcli takes log-probs and values from one policy pass and keeps only the response's logits "
     "(logits_to_keep); TRL 0.11's batched_forward_pass computes the logits of every position (prompt included) "
     "and, in the training passes, their entropy over the whole sequence for its statistics"),
    ("padding: rlcli left-pads the prompts and right-pads the responses (one layout for rollout and training); "
     "TRL 0.11 left-pads only while sampling, then concatenates query + response per episode, right-pads the rows "
     "(the tokenizer's side) and masks each row's response positions by its own start / end indices"),
    ("sampling log-probs: rlcli checks its sampler's log-probs against the rollout forward's (sampler_logprob_diff) "
     "and takes every log-prob under the sampling rules; TRL 0.11 recomputes log-probs from raw logits / temperature "
     "(the same at temperature 1, no top-k / top-p)"),
    ("safety checks: TRL's ratio_threshold (zero the loss of a minibatch whose mean ratio exceeds it) is set to "
     "1e9 (rlcli has none; it skips only non-finite losses and gradients); TRL's early_stopping off, rlcli's "
     "target_approx_kl unset"),
    ("statistics: each side computes and logs its own per-step statistics (TRL: record_step_stats, "
     "stats_to_np; rlcli: its metrics line); neither writes sample tables or checkpoints during the steps"),
    ("libraries: rlcli runs on its own environment's transformers (5.x), TRL 0.11 on transformers 4.46 (the newest "
     "it supports); the same torch 2.13.0+cpu, and both GPT-2s run SDPA attention and the exact GELU"),
    ("value head: both zero-initialised Linear(width, 1) on the last hidden state; TRL's ValueHead runs an identity "
     "dropout (summary_dropout_prob 0)"),
]


# --- the TRL 0.11 virtualenv ----------------------------------------------------------------------------------


def install_commands(python: str) -> list[list[str]]:
    """pip commands that build the TRL venv: torch alone and pinned first, then TRL with its stack pinned (torch
    too: a dependency that asks for another torch makes pip fail instead of replacing it)."""
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    return [pip + [f"torch=={TORCH_VERSION}"],
            pip + [f"trl=={TRL_VERSION}", f"torch=={TORCH_VERSION}"] + [f"{n}=={v}" for n, v in TRL_STACK.items()]]


def wanted_versions() -> dict[str, str]:
    return {"trl": TRL_VERSION, "torch": TORCH_VERSION, **TRL_STACK}


def mismatched(have: dict[str, str], want: dict[str, str]) -> dict[str, str | None]:
    """The packages whose installed version (local tag such as ``+cpu`` ignored) is not the wanted one."""
    return {n: have.get(n) for n, v in want.items() if (have.get(n) or "").split("+")[0] != v}


def venv_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; names = " + json.dumps(list(wanted_versions())) + "\n"
            "out = {}\nfor n in names:\n    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def trl_venv(path: Path) -> str:
    """The TRL 0.11 venv's python, built or brought to the pinned versions first."""
    local_torch = importlib.metadata.version("torch").split("+")[0]
    if local_torch != TORCH_VERSION:
        print(f"note: rlcli's environment has torch {local_torch}, the TRL venv gets {TORCH_VERSION}")
    python = str(path / "bin" / "python")
    if not Path(python).exists():
        print(f"creating {path}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    want = wanted_versions()
    if mismatched(venv_versions(python), want):
        for cmd in install_commands(python):
            print("$ " + " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)
    have = venv_versions(python)
    wrong = mismatched(have, want)
    if wrong:
        raise SystemExit(f"{path}: still not the pinned versions after pip install: {wrong} (want {want})")
    print(f"TRL venv {path}: " + ", ".join(f"{n} {have[n]}" for n in want), flush=True)
    return python


# --- what each side is asked to do ----------------------------------------------------------------------------


def refusals(recipe) -> list[str]:
    """What this comparison cannot hand TRL 0.11's PPOTrainer as rlcli would run it (empty: go)."""
    p, kl, gen, o = recipe.ppo, recipe.kl, recipe.generation, recipe.optim
    micro = p.micro_batch_size or p.mini_batch_size
    checks = [
        (p.advantage == "gae" and p.group_size == 1, "ppo.advantage gae with group_size 1 (TRL 0.11: GAE only)"),
        ((kl.mode or "reward") == "reward" and (kl.estimator or "k1") in ("k1", "abs", "mse", "full"),
         "the KL in the reward with k1 / abs / mse / full (TRL's kl_penalty kl / abs / mse / full)"),
        (not kl.adaptive, "a fixed KL coefficient (the comparison runs TRL's FixedKLController)"),
        ((p.loss_aggregation or "token_mean") == "token_mean", "loss_aggregation token_mean (TRL's masked mean)"),
        (p.advantage_scaling == "batch", "advantage_scaling batch: whitened advantages (TRL 0.11 always whitens them)"),
        (p.clip_range_high is None and p.dual_clip is None and p.entropy_coef == 0 and p.target_approx_kl is None,
         "no clip_range_high, dual_clip, entropy_coef or target_approx_kl (TRL 0.11 has none of them)"),
        (p.score_norm == "none" and recipe.reward.weight == 1.0, "score_norm none, reward.weight 1"),
        (p.mini_batch_size % micro == 0 and p.batch_size % p.mini_batch_size == 0,
         "batch a multiple of the minibatch, the minibatch of the micro-batch"),
        (o.lr_scheduler == "constant" and o.warmup_steps == 0, "a constant learning rate (TRL: no scheduler)"),
        (not gen.stop_strings and gen.min_new_tokens == 0 and gen.engine == "local",
         "plain sampling: no stop strings, no min_new_tokens, local"),
        (not recipe.critic.separate, "critic.separate false (TRL 0.11's value head shares the policy's trunk)"),
        (recipe.lora is None and recipe.env is None and recipe.ref_model is None,
         "no LoRA, no text environment, no separate ref_model"),
        (recipe.model.dtype == "float32" and recipe.train.mixed_precision == "no", "float32, no mixed precision"),
        (recipe.data.prompt_length is None, "data.prompt_length unset (prefix sampling draws random lengths)"),
    ]
    return [why for ok, why in checks if not ok]


def ppo_config(recipe, steps: int) -> dict:
    """TRL 0.11 ``PPOConfig`` fields for the recipe."""
    p, kl, o = recipe.ppo, recipe.kl, recipe.optim
    micro = p.micro_batch_size or p.mini_batch_size
    return {"exp_name": "rlcli-bench", "seed": recipe.seed, "steps": steps, "learning_rate": o.learning_rate,
            "adap_kl_ctrl": False, "init_kl_coef": kl.coef,
            "kl_penalty": {"k1": "kl", "abs": "abs", "mse": "mse", "full": "full"}[kl.estimator or "k1"],
            "gamma": p.gamma, "lam": p.lam, "cliprange": p.clip_range, "cliprange_value": p.clip_range_value,
            "vf_coef": p.vf_coef, "batch_size": p.batch_size, "mini_batch_size": micro,
            "gradient_accumulation_steps": p.mini_batch_size // micro, "ppo_epochs": p.epochs,
            "max_grad_norm": o.max_grad_norm, "whiten_rewards": p.whiten_rewards, "score_clip": p.score_clip,
            "ratio_threshold": 1e9, "early_stopping": False, "remove_unused_columns": False}


def generation_kwargs(recipe, tokenizer) -> dict:
    gen = recipe.generation
    kw = {"min_length": -1, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": gen.temperature,
          "max_new_tokens": gen.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if gen.stop_at_eos:
        kw["eos_token_id"] = tokenizer.eos_token_id
    return kw


def step_prompt_ids(recipe, tokenizer, rows: list[dict], column: str, steps: int) -> list[list[list[int]]]:
    """Each step's prompts as rlcli's ``collect_episodes`` takes and encodes them (one process, group size 1)."""
    from rlcli.data.prompts import encode_prompt
    from rlcli.seeds import index_stream

    b = recipe.ppo.batch_size
    return [[encode_prompt(rows[i][column], tokenizer, chat_template=recipe.data.chat_template,
                           max_length=recipe.data.max_prompt_length, length=None)
             for i in index_stream(len(rows), recipe.seed, (s - 1) * b, b)] for s in range(1, steps + 1)]


def plan(recipe_path: str, overrides: list[str], steps: int, work: Path) -> dict:
    """Build and save the shared model, and say what each side runs."""
    import torch

    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.models.loading import load_model, load_tokenizer
    from rlcli.models.value_head import disable_dropout
    from rlcli.ppo.evaluation import held_out_prompts

    recipe = load_recipe(PPORecipe, REPO / recipe_path, [f"ppo.steps={steps}", *overrides])
    problems = refusals(recipe)
    if problems:
        raise SystemExit(f"{recipe_path}: the comparison needs " + "; ".join(problems))
    if recipe.model.architecture is None:
        raise SystemExit(f"{recipe_path}: the comparison builds the model from scratch (model.architecture)")
    tokenizer = load_tokenizer(recipe.model)
    torch.manual_seed(recipe.seed)
    lm = load_model(recipe.model, "causal", tokenizer)
    disable_dropout(lm)  # the config's dropouts at 0 too, so TRL's copy runs without them
    model_dir = work / "model"
    lm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(t.numel() for t in lm.parameters())
    rows, held, column, _ = held_out_prompts(recipe)
    if held:
        raise SystemExit(f"{recipe_path}: no held-out prompts, please (TRL would get other rows)")
    reward_file, _, reward_fn = (recipe.reward.function or "").partition(":")
    if not reward_file.endswith(".py") or not reward_fn:
        raise SystemExit(f"{recipe_path}: reward.function must be FILE.py:NAME (TRL loads the file on its own)")
    o = recipe.optim
    spec = {"seed": recipe.seed, "model": str(model_dir),
            "tokens": {"pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
                       "bos_token": tokenizer.bos_token, "unk_token": tokenizer.unk_token},
            "prompt_ids": step_prompt_ids(recipe, tokenizer, rows, column, steps),
            "reward_file": reward_file, "reward_function": reward_fn,
            "optim": {"lr": o.learning_rate, "betas": list(o.adam_betas), "eps": o.adam_eps,
                      "weight_decay": o.weight_decay},
            "ppo_config": ppo_config(recipe, steps), "generation": generation_kwargs(recipe, tokenizer)}
    rlcli_args = ["ppo", recipe_path, f"ppo.steps={steps}", *overrides, f"model.name_or_path={model_dir}",
                  "model.architecture=null", "model.tokenizer=null"]
    cfg = lm.config
    shape = (f"{cfg.model_type} {cfg.n_layer} layers × {cfg.n_embd} width, vocab {cfg.vocab_size}, "
             f"{n_params / 1e6:.2f} M parameters; {recipe.ppo.batch_size} episodes × "
             f"{recipe.generation.max_new_tokens} new tokens, minibatch {recipe.ppo.mini_batch_size}, "
             f"{recipe.ppo.epochs} epochs, lr {o.learning_rate}, KL β {recipe.kl.coef}")
    return {"spec": spec, "rlcli_args": rlcli_args, "shape": shape}


# --- running --------------------------------------------------------------------------------------------------


def run_trl(python: str, spec: dict, work: Path, tag: str) -> dict:
    return run_driver(python, DRIVER, spec, work, tag, THREADS, {"PYTHONWARNINGS": "ignore"})


def per_step(data: dict, key: str) -> list[float]:
    """One figure per step (``reward_mean``, ``response_length``, ``kl``, ...) from rlcli's metrics lines or the
    TRL driver's."""
    return [m[key] for m in data["metrics"] if "reward_mean" in m]


def rewards(data: dict) -> list[float]:
    return per_step(data, "reward_mean")


def summary(runs: list[dict]) -> dict:
    """Median step time after each run's first step, the largest peaks, the median process time."""
    def later(key: str) -> list[float]:
        return [s for d in runs for s in d[key][1:]] or [s for d in runs for s in d[key]]

    return {"step_seconds": statistics.median(later("step_seconds")),
            "step_cpu_seconds": statistics.median(later("cpu_seconds")), "peak_rss_steps": max(d["peak_rss_steps"] for d in runs),
            "peak_rss_run": max(d["peak_rss_run"] for d in runs),
            "process_seconds": statistics.median(d["seconds"] for d in runs)}


def phase_means(side: str, runs: list[dict]) -> dict[str, float]:
    """Mean seconds per phase over the steps after the first: what each side's own timers say."""
    keys = {"rlcli": {"generate": "time_generate", "score": "time_score", "rollout forward": "time_forward",
                      "optimise": "time_optimize"},
            "trl": {"generate": "time_generate", "score": "time_score",
                    "rollout forward": "time/ppo/forward_pass", "optimise": "time/ppo/optimize_step",
                    "rewards + advantages": "time/ppo/compute_advantages", "statistics": "time/ppo/calc_stats"}}[side]
    rows = [m for d in runs for m in [m for m in d["metrics"] if "reward_mean" in m][1:]]
    return {name: statistics.mean(m[k] for m in rows) for name, k in keys.items() if rows and all(k in m for m in rows)}


def profile_rlcli(recipe_path: str, overrides: list[str], top: int) -> dict:
    """``bench/ppo_step.py`` on the same setting (1 warm-up, 3 measured steps, one profiled): its JSON."""
    with tempfile.TemporaryDirectory(prefix="rlcli-ppo-step-") as tmp:
        out = Path(tmp) / "ppo_step.json"
        cmd = [sys.executable, str(REPO / "bench" / "ppo_step.py"), recipe_path, *overrides, "--warmup", "1",
               "--steps", "3", "--profile", str(top), "--threads", str(THREADS), "--json", str(out)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        print(res.stdout[-6000:], flush=True)
        if res.returncode != 0:
            print(f"ppo_step.py exited {res.returncode}:\n{res.stderr[-3000:]}", flush=True)
        return json.loads(out.read_text()) if out.exists() else {}


def profile_lines(prof: dict) -> list[str]:
    """Where rlcli's step time goes, from ``ppo_step.py``'s JSON: each phase's mean seconds and share of the step."""
    m = prof.get("summary_mean_seconds")
    if not m:
        return []
    step = m["seconds"]

    def part(name: str, key: str) -> str:
        return f"{name} {m[key]:.2f} s ({100 * m[key] / step:.0f} %)"

    lines = [f"step {step:.2f} s: " + "; ".join([
        part("generation", "generate"), part("scoring", "score"), part("rollout forward", "rollout"),
        part("optimisation", "optimise"), part("other", "other")])]
    if "opt_forward" in m:
        rest = m["optimise"] - m["opt_forward"] - m["opt_backward"] - m["opt_adamw_step"] - m["opt_clip_grad"]
        lines.append(f"optimisation: forward {m['opt_forward']:.2f} s, backward {m['opt_backward']:.2f} s, AdamW "
                     f"{m['opt_adamw_step']:.3f} s, clip {m['opt_clip_grad']:.3f} s, rest {rest:.3f} s")
    if "rollout_policy_forward" in m:
        lines.append(f"rollout forward: policy {m['rollout_policy_forward']:.2f} s, reference "
                     f"{m['rollout_ref_forward']:.2f} s")
    pr = prof.get("optimise_flop_rate", {}).get("profile")
    if pr:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(pr["top_ops_self_seconds"].items())[:5])
        lines.append(f"profiled optimisation: {100 * pr['matmul_time_share']:.0f} % of op self time in mm/addmm; "
                     f"costliest ops (s): {top}")
    lines.append(f"peak RSS {prof['memory']['cpu_max_rss_mib']:.0f} MiB, {m['tokens_per_s']:.0f} generated tokens/s")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, for both sides")
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--width", type=int, default=256, help="model.config.n_embd (default 256)")
    p.add_argument("--steps", type=int, default=5, help="PPO steps per run (default 5; the first is not counted)")
    p.add_argument("--rounds", type=int, default=1, help="rlcli, TRL, rlcli, TRL, ... (default 1)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads of each run (default 1)")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--profile", type=int, default=12, metavar="N",
                   help="then run bench/ppo_step.py --profile N on the same setting (default 12; 0: not)")
    p.add_argument("--no-profile", dest="profile", action="store_const", const=0)
    p.add_argument("--setup-only", action="store_true", help="build / check the TRL venv and stop")
    p.add_argument("--json")
    a = p.parse_args()
    python = trl_venv(a.trl_venv)
    if a.setup_only:
        return
    # TRL 0.11's value head sits on the policy's trunk: the same work means rlcli's shared head too
    overrides = ["critic.separate=false", f"model.config.n_embd={a.width}", *a.overrides]
    report: dict = {"threads": THREADS, "steps": a.steps, "rounds": a.rounds, "trl": TRL_VERSION,
                    "trl_stack": TRL_STACK, "overrides": overrides, "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="rlcli-trl011-") as tmp:
        work = Path(tmp)
        pl = plan(a.recipe, overrides, a.steps, work)
        print(f"\n== {pl['shape']}; {a.steps} steps × {a.rounds} round(s), {THREADS} thread(s), "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        runs: dict[str, list[dict]] = {"rlcli": [], "trl": []}
        for r in range(a.rounds):
            for side in ("rlcli", "trl"):
                tag = f"{side}{r}"
                if side == "rlcli":
                    args = pl["rlcli_args"][:2] + [f"output_dir={work / ('out-' + tag)}"] + pl["rlcli_args"][2:] \
                        + COMMON
                    data = run_rlcli(REPO, args, work, tag, THREADS)
                else:
                    data = run_trl(python, pl["spec"], work, tag)
                runs[side].append(data)
                print(f"round {r + 1} {side:5s}: step times {', '.join(f'{s:.2f}' for s in data['step_seconds'])} s "
                      f"(CPU {', '.join(f'{s:.2f}' for s in data['cpu_seconds'])} s); "
                      f"peak RSS steps {data['peak_rss_steps'] / 2**20:.0f} MiB, run "
                      f"{data['peak_rss_run'] / 2**20:.0f} MiB; reward "
                      f"{', '.join(f'{v:.3f}' for v in rewards(data))}; response tokens "
                      f"{', '.join(f'{v:.1f}' for v in per_step(data, 'response_length'))}; approx KL "
                      f"{', '.join(f'{v:.3f}' for v in per_step(data, 'approx_kl'))}", flush=True)
        for line in DIFFERENCES:
            print("  differs: " + line)
        both = {side: summary(rs) for side, rs in runs.items()}
        phases = {side: phase_means(side, rs) for side, rs in runs.items()}
        print(f"\n{'':24s}{'rlcli':>10s}{'TRL 0.11':>10s}{'rlcli/TRL':>12s}")
        for key, unit, scale in (("step_seconds", "s", 1), ("step_cpu_seconds", "s", 1), ("peak_rss_steps", "MiB", 2**20),
                                 ("peak_rss_run", "MiB", 2**20), ("process_seconds", "s", 1)):
            x, y = both["rlcli"][key] / scale, both["trl"][key] / scale
            print(f"{key + ' (' + unit + ')':24s}{x:10.2f}{y:10.2f}{x / y:12.2f}")
        print("phases, mean s per step after the first (each side's own timers):")
        for name in dict.fromkeys([*phases["rlcli"], *phases["trl"]]):
            x, y = phases["rlcli"].get(name), phases["trl"].get(name)
            print(f"  {name:22s}" + "".join(f"{v:10.2f}" if v is not None else f"{'-':>10s}" for v in (x, y)))
        report.update({"shape": pl["shape"], "summary": both, "phases": phases,
                       "ratios": {k: both["rlcli"][k] / both["trl"][k] for k in both["rlcli"]},
                       "differences": DIFFERENCES, "ppo_config": pl["spec"]["ppo_config"],
                       "generation": pl["spec"]["generation"], "rlcli_args": pl["rlcli_args"] + COMMON,
                       "per_step": {side: [{k: per_step(d, k) for k in ("reward_mean", "response_length", "kl",
                                                                         "approx_kl", "policy_clipfrac")}
                                           for d in rs] for side, rs in runs.items()},
                       "runs": {side: [{k: v for k, v in d.items() if k != "metrics"} for d in rs]
                                for side, rs in runs.items()},
                       "loadavg_end": os.getloadavg()})
    if a.profile:
        prof = profile_rlcli(a.recipe, overrides, a.profile)
        report["ppo_step"] = prof
        print("rlcli's step (bench/ppo_step.py, mean of 3 steps after 1 warm-up):")
        for line in profile_lines(prof):
            print("  " + line)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
