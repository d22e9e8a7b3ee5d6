"""Benchmark one PPO step of ``rlcli ppo``: time per phase, tokens/s, peak memory, the optimisation phase's FLOP
rate against a matmul measured in the same process, and forward-pass counts per phase.

    python bench/ppo_step.py                                   # the shipped tiny recipe, 2 warm-up + 5 measured steps
    python bench/ppo_step.py configs/tiny/ppo.yaml model.config.n_embd=512 --steps 3 --json out.json
    python bench/ppo_step.py --device cuda                     # when a GPU is there

The policy, reference, reward, optimiser and ``PPOLearner`` are built exactly as ``rlcli.trainers.ppo.train``
builds them (the same ``rlcli.ppo.build.build_learner``), and each step runs
the trainer's steps 4-7: prompts, ``generate``, decode + reward, ``learner.step``. Nothing is written to the
recipe's output_dir.

Phases (seconds, mean over the measured steps):
  generate   sampling the responses (KV-cache sampler)
  score      decoding responses + the reward function
  rollout    ``PPOLearner.rollout_forward``: policy (log-probs + values) and reference passes without autograd
  optimise   ``PPOLearner._optimise``: epochs × minibatches × micro-batches of forward + backward + AdamW
  other      the rest of ``learner.step`` (score normalisation, rewards, GAE, whitening, statistics)

FLOP rate of the optimisation phase, three ways (all divided by the phase's wall time):
  6N      6 × trainable parameters × positions (2 forward + 4 backward per parameter and position; counts the
          embedding tables as if they were matmuls, ignores attention), over all positions pushed through the model
          and, separately, over real (non-pad) tokens only
  exact   per position 2 × (matrices in the blocks) + 4·T·width·layers (attention over the full T×T, which the masked
          SDPA computes) + 2·hidden·vocab per kept logit, times (2 + share of those matrices that train): 3 when
          everything trains
and as a share of a ``torch.mm`` measured in the same process (float32, or bf16 / fp16 under that mixed
precision): a square of side ≈ (M·d·4d)^(1/3) (M = rows × positions of a micro-batch: the size of the model's MLP
matmul), measured before and after every measured step, and squares of 1024 and 2048 at the end. ``--profile N`` adds the share of time spent inside mm/addmm.

The forward methods of the policy's LM and of the reference LM are wrapped with counters; the run fails (exit 2)
when the reference ran with autograd on, or when the counts differ from the expected ones:
rollout = ceil(B/micro) policy passes (none when one optimizer step per batch lets the training forward give
pi_old: ``PPOLearner.reuses_training_pass``) + ceil(B/micro) reference passes, all without grad;
optimise = epochs × B/micro policy passes with grad.

One BLAS thread unless ``--threads N`` or OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import setup_threads

THREADS = setup_threads(sys.argv)

import argparse
import math
import time

import torch
from _common import (
    REPO,
    ForwardCounter,
    environment,
    human,
    matmul_rate,
    mean,
    peak_memory,
    phase,
    print_table,
    sync,
    write_json,
)

DEFAULT_RECIPE = "configs/tiny/ppo.yaml"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                        help=f"recipe path (default {DEFAULT_RECIPE}) and overrides, as for `rlcli ppo`")
    parser.add_argument("--steps", type=int, default=5, help="measured PPO steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up PPO steps, not measured (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch / BLAS threads (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the optimisation phase of one extra, unmeasured step; print the N costliest ops")
    parser.add_argument("--matmul-seconds", type=float, default=0.3, help="time spent per reference matmul size")
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, default=None,
                        help="time each forward, backward, AdamW step and clip inside the phases (default: on CPU "
                             "only; on a GPU each of those timers synchronises, hiding the CPU/GPU overlap)")
    args = parser.parse_args(argv)
    recipe_path, overrides = DEFAULT_RECIPE, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif recipe_path is DEFAULT_RECIPE and not overrides:
            recipe_path = item
        else:
            parser.error(f"unexpected argument {item!r}: give the recipe first, then KEY=VALUE overrides")
    args.recipe, args.overrides = recipe_path, overrides
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.split is None:
        args.split = args.device == "cpu"
    return args


# --- FLOP counting ----------------------------------------------------------------------------------------------


def model_shape(lm) -> dict:
    """Numbers for the FLOP counts, read from the module tree (works for any decoder-only transformers model)."""
    from rlcli.models.value_head import hidden_size

    cfg = lm.config
    embeddings = {id(m.weight) for m in lm.modules() if isinstance(m, torch.nn.Embedding)}
    out_emb = lm.get_output_embeddings()
    head_ids = {id(out_emb.weight)} if out_emb is not None else set()
    # matrices inside the blocks: every >=2-D parameter that is no embedding and no LM head (GPT-2's Conv1D included)
    matrices = [p for p in lm.parameters() if p.dim() >= 2 and id(p) not in embeddings | head_ids]
    block_matrix = sum(p.numel() for p in matrices)
    # backward = activation gradients (≈ 1 forward) + weight gradients of the trainable matrices only
    backward_factor = 1 + sum(p.numel() for p in matrices if p.requires_grad) / max(block_matrix, 1)
    layers = next((getattr(cfg, k) for k in ("n_layer", "num_hidden_layers", "num_layers") if hasattr(cfg, k)), None)
    heads = next((getattr(cfg, k) for k in ("n_head", "num_attention_heads", "num_heads") if hasattr(cfg, k)), None)
    d = hidden_size(cfg)
    head_dim = getattr(cfg, "head_dim", None) or (d // heads if heads else d)
    return {"hidden": d, "layers": layers, "heads": heads, "attn_width": (heads or 1) * head_dim,
            "vocab": int(out_emb.weight.shape[0]) if out_emb is not None else cfg.vocab_size,
            "block_matrix_params": block_matrix, "backward_factor": backward_factor, "ffn": getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or 4 * d}


def forward_flops(shapes: list[dict], ms: dict) -> dict:
    """Forward FLOPs of a list of recorded calls (causal LM), counting every position pushed through the model.

    per position: 2 × (block matrix parameters)           (QKV, out-proj, MLP)
                + 4 × T × attn_width × layers            (QKᵀ and AV over the full T×T: the masked SDPA computes it all)
    per kept logit position: 2 × hidden × vocab          (LM head; logits_to_keep = R+1 in ValueHeadModel)
    """
    linear, attention = 0.0, 0.0
    for rec in shapes:
        b, t = rec["shape"]
        keep = rec["keep"] if isinstance(rec.get("keep"), int) and rec["keep"] > 0 else t
        keep = min(keep, t)
        linear += b * t * 2 * ms["block_matrix_params"] + b * keep * 2 * ms["hidden"] * ms["vocab"]
        attention += b * t * 4 * t * ms["attn_width"] * (ms["layers"] or 0)
    return {"flops": linear + attention, "linear_flops": linear, "positions": sum(r["shape"][0] * r["shape"][1] for r in shapes),
            "real_tokens": sum(r["real"] for r in shapes)}


# --- the benchmark ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.exists(args.recipe):
        args.recipe = os.path.relpath(os.path.abspath(args.recipe), REPO)
    os.chdir(REPO)  # recipes name data/ and recipes/ relative to the repo root
    torch.set_num_threads(THREADS)

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.data.prompts import load_prompt_rows
    from rlcli.models.loading import load_tokenizer
    from rlcli.parallel import set_tf32
    from rlcli.ppo.build import build_learner, rollout_setup
    from rlcli.ppo.preflight import policy_task, preflight
    from rlcli.ppo.rollout import collect_episodes

    recipe = load_recipe(PPORecipe, args.recipe, args.overrides)
    notes = preflight(recipe)
    device = args.device
    set_tf32(recipe.train.tf32)  # as rlcli.parallel.Parallel does for `rlcli ppo`
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=recipe.train.mixed_precision)
    # the dtype the training matmuls run in: bf16 / fp16 under autocast, else float32 (TF32 on CUDA when allowed)
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision, torch.float32)
    set_seed(recipe.seed, device_specific=True)
    if accelerator.num_processes != 1:
        raise SystemExit("run the benchmark as one process")

    # --- build exactly as the trainer does (train(), step 2 and 3) ---
    task = policy_task(recipe)
    tokenizer = load_tokenizer(recipe.model, padding_side="left")
    rows, column = load_prompt_rows(recipe.data)
    p = recipe.ppo
    total_steps = args.warmup + args.steps + (1 if args.profile else 0)  # the profiled step is not measured
    policy, ref, reward, learner = build_learner(recipe, accelerator, tokenizer, task,
                                                 optimizer_steps=total_steps * p.epochs * (p.batch_size // p.mini_batch_size))
    model, optimizer = learner.model, learner.optimizer

    pol_counter = ForwardCounter("policy", device, timed=args.split)
    ref_counter = ForwardCounter("reference", device, timed=args.split)
    pol_counter.attach(policy.pretrained)
    if ref is not None:
        ref_counter.attach(ref.pretrained)
    unwrapped = accelerator.unwrap_model(model)
    counters = [pol_counter, ref_counter]

    # --- phase timers around the learner's two big parts and the optimiser internals ---
    timers: dict[str, float] = {}

    def timed(name, fn, phase_name=None):
        def wrapper(*a, **kw):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if phase_name is None:
                out = fn(*a, **kw)
            else:
                with phase(counters, phase_name):
                    out = fn(*a, **kw)
            sync(device)
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0
            timers[name + "_cpu"] = timers.get(name + "_cpu", 0.0) + time.process_time() - c0
            return out
        return wrapper

    learner.rollout_forward = timed("rollout", learner.rollout_forward, "rollout")
    learner._optimise = timed("optimise", learner._optimise, "optimise")
    if args.split:
        accelerator.backward = timed("opt_backward", accelerator.backward)
        optimizer.step = timed("opt_adamw_step", optimizer.step)
        accelerator.clip_grad_norm_ = timed("opt_clip_grad", accelerator.clip_grad_norm_)

    trainable = sum(q.numel() for q in policy.parameters() if q.requires_grad)
    total_params = sum(q.numel() for q in policy.parameters())
    ref_grad_params = sum(q.numel() for q in ref.parameters() if q.requires_grad) if ref is not None else 0
    ms = model_shape(policy.pretrained) if task == "causal" else None

    local_batch = p.batch_size  # one process: its share of the batch is all of it
    setup = rollout_setup(recipe, accelerator, tokenizer, rows, column, unwrapped, reward, learner.rules)
    per_step = []
    print(f"rlcli ppo benchmark: {args.recipe} {' '.join(args.overrides)}; {task} policy, {trainable:,} trainable "
          f"parameters; {args.warmup} warm-up + {args.steps} measured steps; device {device}, "
          f"{torch.get_num_threads()} thread(s)")
    for note in notes:
        print("  " + note)

    ref_size = None
    prof_out: dict = {}
    for step in range(1, total_steps + 1):
        if step == args.warmup + 1 and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = matmul_rate(ref_size[0], device, 0.15, dtype=mm_dtype) if ref_size and args.warmup < step <= args.warmup + args.steps else None
        for c in counters:
            c.reset()
        timers.clear()
        sync(device)
        t0 = time.perf_counter()
        # trainer steps 4-6: the trainer's own function (prompts, rollout, scores)
        with phase(counters, "generate"):
            ep = collect_episodes(setup, step)
        sync(device)
        rollout, scores = ep.rollout, ep.scores
        t_gen, t_score = ep.seconds_generate, ep.seconds_score
        # step 7: PPO
        t2 = time.perf_counter()
        if args.profile and step == total_steps:
            learner._optimise = profiled(learner._optimise, args.profile, prof_out)
        stats = learner.step(rollout, scores)
        sync(device)
        t_learn = time.perf_counter() - t2
        seconds = time.perf_counter() - t0

        gen_tokens = int(rollout.response_mask.sum())
        rec = {
            "step": step, "measured": args.warmup < step <= args.warmup + args.steps, "seconds": seconds, "generate": t_gen, "score": t_score,
            "rollout": timers.get("rollout", 0.0), "optimise": timers.get("optimise", 0.0),
            "optimise_cpu": timers.get("optimise_cpu", 0.0),
            "other": t_learn - timers.get("rollout", 0.0) - timers.get("optimise", 0.0),
            "opt_backward": timers.get("opt_backward", 0.0), "opt_adamw_step": timers.get("opt_adamw_step", 0.0),
            "opt_clip_grad": timers.get("opt_clip_grad", 0.0),
            "opt_forward": pol_counter.seconds.get("optimise", 0.0),
            "rollout_policy_forward": pol_counter.seconds.get("rollout", 0.0),
            "rollout_ref_forward": ref_counter.seconds.get("rollout", 0.0) if ref is not None else None,
            "generated_tokens": gen_tokens, "tokens_per_s": gen_tokens / seconds,
            "batch": rollout.batch_size, "query_width": int(rollout.query_ids.shape[1]), "response_width": int(rollout.response_ids.shape[1]),
            "ppo_epochs_done": stats["ppo_epochs"], "skipped_minibatches": stats["skipped_minibatches"],
            "reward_mean": stats["reward_mean"], "kl": stats["kl"],
            "calls": {c.name: {f"{ph}/{'grad' if gr else 'no_grad'}": n for (ph, gr), n in sorted(c.calls.items())}
                      for c in counters},
        }
        for c in counters:
            c.finish_shapes()
        if ms is not None:
            opt = forward_flops(pol_counter.shapes.get("optimise", []), ms)
            rf = forward_flops(pol_counter.shapes.get("rollout", []) + ref_counter.shapes.get("rollout", []), ms)
            rec["opt_positions"], rec["opt_real_tokens"] = opt["positions"], opt["real_tokens"]
            # forward + backward (≈ 2× forward when every matrix trains; ≈ 1× + the adapters' share with LoRA)
            mult = 1 + ms["backward_factor"]
            rec["opt_flops_exact"] = mult * opt["flops"]
            rec["opt_flops_linear"] = mult * opt["linear_flops"]  # the part done by mm / addmm (not SDPA)
            rec["opt_flops_6n_positions"] = 6 * trainable * opt["positions"]
            rec["opt_flops_6n_real"] = 6 * trainable * opt["real_tokens"]
            rec["rollout_flops_exact"] = rf["flops"]
            shapes = pol_counter.shapes.get("optimise", [])
            rec["opt_micro_shapes"] = sorted({tuple(s["shape"]) for s in shapes})
        else:  # seq2seq: encoder + decoder positions, 6N only
            shapes = pol_counter.shapes.get("optimise", [])
            positions = sum(s["shape"][0] * s["shape"][1] + (s["decoder_shape"][0] * s["decoder_shape"][1] if "decoder_shape" in s else 0) for s in shapes)
            rec["opt_positions"] = positions
            rec["opt_flops_6n_positions"] = 6 * trainable * positions
        if ref_size is None:  # the reference matmul size, from the first step's micro-batch shapes
            ref_size = reference_size(pol_counter.shapes.get("optimise", []), ms)
        if rec["measured"]:
            # the matmul rate right before and after this step: the machine may be shared, compare like with like
            after = matmul_rate(ref_size[0], device, 0.15, dtype=mm_dtype)
            pair = [after] + ([before] if before else [])
            rec["matmul_ref_flop_per_s"] = mean(x["flop_per_s"] for x in pair)
            rec["matmul_ref_flop_per_cpu_s"] = mean(x["flop_per_cpu_s"] for x in pair)
        rec["check"] = check_counts(rec, pol_counter, ref_counter, p, local_batch, ref is not None, stats,
                                    learner.reuses_training_pass(local_batch))
        per_step.append(rec)
        tag = "measured" if rec["measured"] else ("warm-up" if step <= args.warmup else "profiled, not measured")
        print(f"  step {step} ({tag}): {seconds:.3f}s  generate {t_gen:.3f}  score {t_score:.3f}  rollout "
              f"{rec['rollout']:.3f}  optimise {rec['optimise']:.3f}  other {rec['other']:.3f}  "
              f"[{gen_tokens} tokens, reward {stats['reward_mean']:.3f}]")

    if prof_out:
        print(prof_out["table"])
    memory = peak_memory(device)
    measured = [r for r in per_step if r["measured"]]

    # --- reference matmul rates, measured now (same process, same threads) ---
    geo, m_rows, d, ffn = ref_size
    mm = {
        f"square_{geo}": matmul_rate(geo, device, args.matmul_seconds, dtype=mm_dtype),
        f"square_{d}": matmul_rate(d, device, args.matmul_seconds, dtype=mm_dtype),
        "square_1024": matmul_rate(1024, device, args.matmul_seconds, dtype=mm_dtype),
        "square_2048": matmul_rate(2048, device, args.matmul_seconds, dtype=mm_dtype),
        f"mlp_up_{m_rows}x{d}x{ffn}": matmul_rate(ffn, device, args.matmul_seconds, m=m_rows, k=d, dtype=mm_dtype),
    }
    ref_key = f"square_{geo}"

    def m_(key):
        return mean(r[key] for r in measured if r.get(key) is not None)

    summary = {key: m_(key) for key in ("seconds", "generate", "score", "rollout", "optimise", "optimise_cpu", "other", "opt_forward",
                                        "opt_backward", "opt_adamw_step", "opt_clip_grad", "rollout_policy_forward",
                                        "generated_tokens", "tokens_per_s")}
    if ref is not None:
        summary["rollout_ref_forward"] = m_("rollout_ref_forward")
    mfu = {}
    if "opt_flops_6n_positions" in measured[0]:
        for key in ("opt_flops_exact", "opt_flops_6n_positions", "opt_flops_6n_real"):
            if key in measured[0]:
                rate = m_(key) / summary["optimise"]
                mfu[key] = {"flops_per_step": m_(key), "flop_per_s": rate,
                            **{f"ratio_vs_{k}": rate / v["flop_per_s"] for k, v in mm.items()},
                            # per step: that step's rate / the reference matmul measured right after it
                            "ratio_vs_reference_per_step_mean": mean(r[key] / r["optimise"] / r["matmul_ref_flop_per_s"]
                                                                     for r in measured)}
                if device == "cpu":  # the same ratio in CPU time (leaves out waiting for a core on a shared machine)
                    mfu[key]["ratio_cpu_time_per_step_mean"] = mean(
                        r[key] / r["optimise_cpu"] / r["matmul_ref_flop_per_cpu_s"] for r in measured)
        if "opt_flops_exact" in measured[0] and args.split:
            fb = summary["opt_forward"] + summary["opt_backward"]
            # the model's own forward + backward, without the trainer's losses, AdamW, clipping and slicing: the
            # ceiling the optimisation phase could reach with a zero-cost loop around the model
            mfu["opt_flops_exact_fwd_bwd_only"] = {
                "flop_per_s": m_("opt_flops_exact") / fb,
                f"ratio_vs_{ref_key}": m_("opt_flops_exact") / fb / mm[ref_key]["flop_per_s"],
                "ratio_vs_reference_per_step_mean": mean(
                    r["opt_flops_exact"] / (r["opt_forward"] + r["opt_backward"]) / r["matmul_ref_flop_per_s"]
                    for r in measured),
                "optimise_over_fwd_bwd": summary["optimise"] / fb}
        if "opt_flops_exact" in measured[0]:
            rr = m_("rollout_flops_exact") / summary["rollout"]
            mfu["rollout_flops_exact"] = {"flops_per_step": m_("rollout_flops_exact"), "flop_per_s": rr,
                                          f"ratio_vs_{ref_key}": rr / mm[ref_key]["flop_per_s"]}
    if prof_out:
        prof_step = per_step[-1]
        share = prof_out["matmul_us"] / prof_out["total_us"]
        prof = {"matmul_time_share": share, "matmul_seconds": prof_out["matmul_us"] / 1e6,
                "profiled_seconds": prof_out["total_us"] / 1e6, "top_ops_self_seconds": dict(sorted(
                    ((k, v / 1e6) for k, v in prof_out["self_us"].items()), key=lambda kv: -kv[1])[:args.profile])}
        if "opt_flops_linear" in prof_step:
            prof["in_model_matmul_flop_per_s"] = prof_step["opt_flops_linear"] / prof["matmul_seconds"]
            prof[f"in_model_matmul_ratio_vs_{ref_key}"] = prof["in_model_matmul_flop_per_s"] / mm[ref_key]["flop_per_s"]
        mfu["profile"] = prof
    failures = sorted({f for r in per_step for f in r["check"]["failures"]})

    result = {
        "recipe": args.recipe, "overrides": args.overrides, "env": environment(device), "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup, "measured_steps": args.steps, "split": args.split,
        "model": {"trainable_params": trainable, "total_params": total_params, "ref_params_requiring_grad": ref_grad_params,
                  **(ms or {})},
        "ppo": {"batch_size": p.batch_size, "mini_batch_size": p.mini_batch_size, "micro_batch_size": p.micro_batch_size,
                "epochs": p.epochs, "max_new_tokens": recipe.generation.max_new_tokens},
        "summary_mean_seconds": summary, "memory": memory, "matmul_reference": mm, "reference_key": ref_key,
        "optimise_flop_rate": mfu, "forward_calls_expected": measured[-1]["check"]["expected"],
        "forward_calls_last_step": measured[-1]["calls"], "forward_check_failures": failures, "steps": per_step,
    }
    report(result, ms)
    write_json(args.json, result)
    if failures:
        from rich.console import Console

        Console().print("[bold red]FAILED forward-pass check:[/] " + "; ".join(failures))
        return 2
    return 0


def profiled(fn, top: int, out: dict):
    """``fn`` run once under torch.profiler; the op table (self CPU time) lands in ``out["table"]``."""
    from torch.profiler import ProfilerActivity, profile

    def wrapper(*a, **kw):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            result = fn(*a, **kw)
        averages = prof.key_averages()
        key = "self_cpu_time_total"
        if torch.cuda.is_available() and averages:
            key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
        out["table"] = averages.table(sort_by=key, row_limit=top)
        total = sum(getattr(e, key) for e in averages)
        out["self_us"] = {e.key: getattr(e, key) for e in averages}
        out["matmul_us"] = sum(getattr(e, key) for e in averages if e.key in MATMUL_OPS)
        out["total_us"] = total
        return result
    return wrapper


def reference_size(shapes, ms) -> tuple[int, int, int, int]:
    """(n, M, d, ffn): the square size n ≈ (M·d·ffn)^(1/3) of the MLP up-projection of a training micro-batch
    (M = rows × positions), rounded to a multiple of 32."""
    d = ms["hidden"] if ms else 512
    ffn = ms["ffn"] if ms else 4 * d
    m_rows = int(mean(s["shape"][0] * s["shape"][1] for s in shapes)) if shapes else 1024
    geo = max(32, round((m_rows * d * ffn) ** (1 / 3) / 32) * 32)
    return geo, m_rows, d, ffn


def check_counts(rec, pol, ref, p, batch, has_ref, stats, reuse: bool) -> dict:
    """Compare this step's forward calls with the expected counts (no wasted pass); returns them and any failures.
    ``reuse``: the learner takes pi_old from the training forward (one optimizer step per batch), so the rollout
    phase runs the reference alone."""
    micro = p.micro_batch_size
    n_rollout = math.ceil(batch / micro)
    n_policy = 0 if reuse else n_rollout
    local_mini = p.mini_batch_size
    n_micro = max(1, local_mini // micro)
    epochs_done = int(stats["ppo_epochs"])
    n_opt = epochs_done * math.ceil(batch / local_mini) * n_micro
    failures = []
    expected = {"rollout/policy/no_grad": n_policy, "rollout/reference/no_grad": n_rollout,
                "optimise/policy/grad": n_opt, "optimise/policy/no_grad": 0, "rollout/*/grad": 0, "generate/*/grad": 0}
    # LoRA: the reference is the policy's LM with the adapter disabled, so its passes count as the policy's
    lora_ref = 0 if has_ref else n_rollout
    got = {
        "rollout/policy/no_grad": pol.count("rollout", False) - lora_ref,
        "rollout/reference/no_grad": ref.count("rollout", False) if has_ref else lora_ref,
        "optimise/policy/grad": pol.count("optimise", True),
        "optimise/policy/no_grad": pol.count("optimise", False),
        "rollout/*/grad": pol.count("rollout", True) + ref.count("rollout", True),
        "generate/*/grad": pol.count("generate", True) + ref.count("generate", True),
    }
    if ref.count("other") + pol.count("other"):
        failures.append(f"{ref.count('other') + pol.count('other')} forward call(s) outside the known phases")
    ref_grad = sum(n for (ph, g), n in ref.calls.items() if g)
    if ref_grad:
        failures.append(f"the reference ran {ref_grad} forward pass(es) WITH autograd enabled")
    if has_ref and sum(n for (ph, g), n in ref.calls.items() if ph != "rollout"):
        failures.append("the reference ran outside the rollout phase")
    for key, want in expected.items():
        if got[key] != want:
            failures.append(f"{key}: {got[key]} calls, expected {want}")
    return {"expected": expected, "got": got, "failures": failures}


def report(r: dict, ms) -> None:
    s, m, mem, mm = r["summary_mean_seconds"], r["model"], r["memory"], r["matmul_reference"]
    step = s["seconds"]

    def share(x):
        return f"{100 * x / step:.1f}% of step"

    rows = [
        ("recipe", f"{r['recipe']} {' '.join(r['overrides'])}".strip(), ""),
        ("threads / device", f"{r['threads']} / {r['env']['device']}", f"OMP_NUM_THREADS={r['env']['OMP_NUM_THREADS']}"),
        ("trainable parameters", f"{m['trainable_params']:,}", f"policy + value head; reference params with grad: {m['ref_params_requiring_grad']}"),
        ("PPO shape", (f"B={r['ppo']['batch_size']} mini={r['ppo']['mini_batch_size']} "
                       f"micro={r['ppo']['micro_batch_size']} epochs={r['ppo']['epochs']}"),
         f"max_new_tokens={r['ppo']['max_new_tokens']}"),
        None,
        ("step", f"{step:.3f} s", f"mean of {r['measured_steps']} (after {r['warmup_steps']} warm-up)"),
        ("  generation", f"{s['generate']:.3f} s", share(s["generate"])),
        ("  scoring", f"{s['score']:.4f} s", share(s["score"])),
        ("  rollout forward (policy+value, ref)", f"{s['rollout']:.3f} s", share(s["rollout"])
         + (f"; policy {s['rollout_policy_forward']:.3f} s" if r["split"] else "")
         + (f", ref {s['rollout_ref_forward']:.3f} s" if r["split"] and s.get("rollout_ref_forward") is not None else "")),
        ("  optimisation", f"{s['optimise']:.3f} s", share(s["optimise"])),
        *([("    forward / backward", f"{s['opt_forward']:.3f} / {s['opt_backward']:.3f} s", "LM forward (wrapped) / accelerator.backward"),
           ("    AdamW step / grad clip", f"{s['opt_adamw_step']:.4f} / {s['opt_clip_grad']:.4f} s",
            f"rest (losses, slicing, bookkeeping) {s['optimise'] - s['opt_forward'] - s['opt_backward'] - s['opt_adamw_step'] - s['opt_clip_grad']:.3f} s")]
          if r["split"] else [("    (not split)", "", "--no-split: no timers inside the phases")]),
        ("  other (rewards, GAE, whitening, stats)", f"{s['other']:.4f} s", share(s["other"])),
        ("generated tokens / step", f"{s['generated_tokens']:.0f}", ""),
        ("tokens/s", f"{s['tokens_per_s']:.1f}", "generated tokens / step time"),
        ("peak memory", f"{mem['cpu_max_rss_mib']:.0f} MiB RSS" + (f", {mem['cuda_max_allocated_mib']:.0f} MiB CUDA" if "cuda_max_allocated_mib" in mem else ""),
         "ru_maxrss of the whole process" + ("; torch.cuda.max_memory_allocated after warm-up" if "cuda_max_allocated_mib" in mem else "")),
        None,
    ]
    for key, v in mm.items():
        rows.append((f"matmul {v.get('dtype', 'float32')} {key}", human(v["flop_per_s"], "FLOP/s"), f"{v['shape'][0]}×{v['shape'][1]} @ {v['shape'][1]}×{v['shape'][2]}"
                     + ("  ← reference (≈ geometric mean of the MLP matmul of a micro-batch)" if key == r["reference_key"] else "")))
    mfu = r["optimise_flop_rate"]
    refk = r["reference_key"]
    labels = {"opt_flops_exact": "exact (blocks + attention + LM head), fwd+bwd",
              "opt_flops_6n_positions": "6 × trainable params × positions (incl. pad)",
              "opt_flops_6n_real": "6 × trainable params × real tokens"}
    for key, label in labels.items():
        if key in mfu:
            v = mfu[key]
            rows.append((f"optimise FLOP rate: {label}", human(v["flop_per_s"], "FLOP/s"),
                         f"{human(v['flops_per_step'], 'FLOP')}/step; [bold]{100 * v['ratio_vs_reference_per_step_mean']:.1f}%[/] of "
                         f"{refk} (per step)"
                         + (f", {100 * v['ratio_cpu_time_per_step_mean']:.1f}% in CPU time" if "ratio_cpu_time_per_step_mean" in v else "")
                         + f", {100 * v[f'ratio_vs_{refk}']:.1f}% of {refk} (end), "
                         f"{100 * v['ratio_vs_square_1024']:.1f}% of 1024², {100 * v['ratio_vs_square_2048']:.1f}% of 2048²"))
    if "opt_flops_exact_fwd_bwd_only" in mfu:
        v = mfu["opt_flops_exact_fwd_bwd_only"]
        note = (f"{100 * v['ratio_vs_reference_per_step_mean']:.1f}% of {refk} (per step), "
                f"{100 * v[f'ratio_vs_{refk}']:.1f}% (end): the model's own ceiling; the loop around it "
                f"(losses, AdamW, clipping, slicing) adds {100 * (v['optimise_over_fwd_bwd'] - 1):.1f}%")
        rows.append(("  same, forward+backward time only", human(v["flop_per_s"], "FLOP/s"), note))
        v = mfu["rollout_flops_exact"]
        rows.append(("rollout forward FLOP rate (exact, no grad)", human(v["flop_per_s"], "FLOP/s"), f"{100 * v[f'ratio_vs_{refk}']:.1f}% of {refk}"))
    if "profile" in mfu:
        v = mfu["profile"]
        rows.append(("profiled step: time in mm/addmm", f"{100 * v['matmul_time_share']:.1f}%",
                     f"{v['matmul_seconds']:.2f} of {v['profiled_seconds']:.2f} s self time (profiler overhead inflates small ops)"))
        if "in_model_matmul_flop_per_s" in v:
            rows.append(("  rate inside those matmuls", human(v["in_model_matmul_flop_per_s"], "FLOP/s"),
                         f"{100 * v[f'ratio_vs_{refk}']:.1f}% of {refk}" if f"ratio_vs_{refk}" in v else
                         f"{100 * v[f'in_model_matmul_ratio_vs_{refk}']:.1f}% of {refk}"))
    rows.append(None)
    exp = r["forward_calls_expected"]
    got = r["steps"][-1]["check"]["got"]
    for key, want in exp.items():
        ok = got[key] == want
        rows.append((f"forward calls {key}", str(got[key]), f"expected {want} " + ("[green]ok[/]" if ok else "[bold red]MISMATCH[/]")))
    calls = r["forward_calls_last_step"]
    gen_calls = sum(n for k, n in calls["policy"].items() if k.startswith("generate/"))
    rows.append(("forward calls generate/policy/no_grad", str(gen_calls), "sampler: 1 prefill + 1 per decode step"))
    print_table("rlcli PPO step benchmark", rows)


if __name__ == "__main__":
    sys.exit(main())
