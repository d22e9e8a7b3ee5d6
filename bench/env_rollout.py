"""Benchmark ``TextEnvironment.run``: episodes/s and generated tokens/s of tool-calling rollouts (tag protocol, the
built-in calculator as ``Calculator``), with the cost of padding for finished rows.

    python bench/env_rollout.py                                 # 128 episodes in batches of 32
    python bench/env_rollout.py --model runs/calculator/sft --episodes 256 --batch 64 --json out.json

The model: ``--model DIR`` if given, else the first of runs/calculator-sft, runs/calculator/sft (where
``python recipes/calculator.py demo`` puts its SFT model) that holds a saved model, else a GPT-2 built from scratch (n_layer 4, n_embd 128, n_head 4, byte tokenizer) through
``rlcli.models.loading``. A random model almost never writes a tool call, so with it the figures measure the
sampler and the environment's bookkeeping, not tool calls; the tool-call cost is measured separately
(``ToolRunner.run_many`` of one batch of calculator calls, forked and inline).

Prompts are arithmetic questions ``Q: 347*29=?\\n``. Measured:

- env: episodes/s, generated (model) tokens/s, turns and tool calls per episode, finish reasons, time in tools,
  ``EnvStats.pad_fraction`` and the sampler's position counters summed over every turn;
- the same episodes again with the sampler's ``drop_finished=False`` (finished rows stay in the batch, fed pad):
  ``TextEnvironment`` does not expose the switch, so the benchmark wraps the ``sample`` function the environment
  calls. Rows draw from their own random streams, so both runs should produce the same episodes; the fraction of
  identical episodes is reported;
- the sampler alone on the first turn's prompts: ``sample(..., drop_finished=True)`` vs ``False``;
- KV-cache reuse across turns, in the same process: ``--kv-turns`` (3) turn episodes in which every turn is answered
  by the calculator (a protocol that reads each turn, cut at ``--kv-new-tokens``, as a call), run with
  ``kv_reuse=True`` (each row keeps its cache; a turn feeds only the new tokens) and ``False`` (every turn prefills
  the whole episode), alternating, best of 2 each; ``--chat-prompts`` renders each question with the model's chat
  template and the calculator's schema in a system message (a real chat model's prompt length). ``--kv-only`` runs
  just this part.

    python bench/env_rollout.py --kv-only --model ~/.cache/rlcli/gguf/SmolLM2-135M-Instruct.Q4_1-* --chat-prompts

One BLAS thread unless ``--threads N`` or OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import setup_threads

THREADS = setup_threads(sys.argv)

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import torch
from _common import REPO, environment, peak_memory, print_table, write_json

TRAINED_CANDIDATES = ("runs/calculator-sft", "runs/calculator/sft")
SCRATCH_CONFIG = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a saved causal LM directory (default: see above)")
    parser.add_argument("--scratch", action="store_true", help="use the from-scratch random model even if a trained one exists")
    parser.add_argument("--episodes", type=int, default=128, help="measured episodes (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="episodes per TextEnvironment.run call (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up batches (default 1)")
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40, help="per turn (default 40, as configs/calculator.yaml)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--isolation", default="fork", choices=["fork", "inline"], help="how tools run (default fork)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch / BLAS threads (default: $OMP_NUM_THREADS or 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile one extra batch and print the N functions with the most own time")
    parser.add_argument("--kv-turns", type=int, default=3, help="turns per episode of the KV-reuse comparison (3)")
    parser.add_argument("--kv-new-tokens", type=int, default=16, help="tokens per turn there (16)")
    parser.add_argument("--kv-episodes", type=int, default=32, help="episodes there (32)")
    parser.add_argument("--chat-prompts", action="store_true",
                        help="KV comparison: questions rendered by the model's chat template with the tool's schema")
    parser.add_argument("--kv-only", action="store_true", help="run only the KV-reuse comparison")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.batch < 1:
        parser.error("--episodes and --batch must be >= 1")
    return args


def load(args):
    from rlcli.config.common import ModelConfig
    from rlcli.models.loading import load_model, load_tokenizer

    path = args.model
    if path is None and not args.scratch:
        path = next((c for c in TRAINED_CANDIDATES if (REPO / c / "config.json").exists()), None)
    if path is not None:
        if not (Path(path) / "config.json").exists() and not (REPO / path / "config.json").exists():
            raise SystemExit(f"--model {path}: no config.json there")
        path = str(Path(path) if (Path(path) / "config.json").exists() else REPO / path)
        cfg = ModelConfig(name_or_path=path)
        source = path
    else:
        cfg = ModelConfig(architecture="gpt2", tokenizer="byte", config=dict(SCRATCH_CONFIG))
        source = "gpt2 from scratch " + ", ".join(f"{k}={v}" for k, v in SCRATCH_CONFIG.items())
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_model(cfg, "causal", tokenizer).eval()
    return model, tokenizer, source


def prompts_for(n: int, seed: int) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    prompts, rows = [], []
    for _ in range(n):
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        prompts.append(f"Q: {a}*{b}=?\n")
        rows.append({"answer": str(a * b)})
    return prompts, rows


class SamplerProbe:
    """Replaces the ``sample`` the environment module calls: records each call's ``SampleOutput`` counters and time,
    and can force ``drop_finished``."""

    def __init__(self, env_module):
        self.module = env_module
        self.original = env_module.sample
        self.drop_finished = True
        self.counters = Counter()
        env_module.sample = self

    def __call__(self, *args, **kwargs):
        kwargs["drop_finished"] = self.drop_finished
        t0 = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.counters["seconds"] += time.perf_counter() - t0
        self.counters["calls"] += 1
        for key in ("generated_positions", "computed_positions", "padded_positions", "prefill_positions",
                    "prefill_pad_positions"):
            self.counters[key] += getattr(out, key)
        return out


class StopStringProbe:
    """Times ``rlcli.models.generation._hits_stop_string`` (one tokenizer.decode per live row per decode step)."""

    def __init__(self, gen_module):
        self.module, self.original = gen_module, gen_module._hits_stop_string
        self.calls, self.seconds = 0, 0.0
        gen_module._hits_stop_string = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_env(env, prompts, rows, batch, seed, probe, stop_probe, warmup):
    """Warm-up batches, then every prompt in batches; returns (histories, figures)."""
    for w in range(warmup):
        env.run(prompts[:batch], rows[:batch], generator=torch.Generator().manual_seed(10_000 + seed + w))
    probe.counters.clear()
    stop_probe.calls, stop_probe.seconds = 0, 0.0
    histories, stats = [], []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(prompts), batch)):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        histories += env.run(prompts[start:start + batch], rows[start:start + batch], generator=g)
        stats.append(env.last_stats)
    seconds = time.perf_counter() - t0
    n = len(histories)
    gen_tokens = sum(s.generated_tokens for s in stats)
    c = probe.counters
    computed = c["prefill_positions"] + c["computed_positions"]
    padding = c["prefill_pad_positions"] + c["padded_positions"]
    figures = {
        "episodes": n, "seconds": seconds, "episodes_per_s": n / seconds, "generated_tokens": gen_tokens,
        "generated_tokens_per_s": gen_tokens / seconds, "tool_tokens": sum(s.tool_tokens for s in stats),
        "turns_per_episode": sum(h.num_turns for h in histories) / n,
        "tool_calls_per_episode": sum(len(h.tool_calls) for h in histories) / n,
        "tool_seconds": sum(s.tool_seconds for s in stats),
        "sampler_seconds": c["seconds"], "sampler_calls": c["calls"],
        "stop_string_checks": stop_probe.calls, "stop_string_seconds": stop_probe.seconds,
        "finish_reasons": dict(Counter(h.finish_reason for h in histories)),
        "tool_outcomes": dict(Counter(tc.status for h in histories for tc in h.tool_calls)),
        # EnvStats.pad_fraction per run call, weighted by that call's computed positions is what the counters give:
        "env_pad_fraction_mean_of_runs": sum(s.pad_fraction for s in stats) / len(stats),
        "pad_fraction_all": padding / computed if computed else 0.0,
        "decode_pad_fraction": c["padded_positions"] / c["computed_positions"] if c["computed_positions"] else 0.0,
        "prefill_pad_fraction": c["prefill_pad_positions"] / c["prefill_positions"] if c["prefill_positions"] else 0.0,
        **{k: c[k] for k in ("generated_positions", "computed_positions", "padded_positions", "prefill_positions",
                             "prefill_pad_positions")},
    }
    return histories, figures


def sampler_compare(model, tokenizer, prompts, batch, args, stop_strings, repeats=3):
    """The sampler alone on the first turn's prompts: drop_finished True vs False, best of ``repeats``."""
    from rlcli.models.generation import sample
    from rlcli.padding import left_pad
    from rlcli.rl.sampling import SamplingRules

    out = {}
    for drop in (True, False):
        best, counters = float("inf"), Counter()
        for r in range(repeats):
            counters = Counter()
            t0 = time.perf_counter()
            for i, start in enumerate(range(0, len(prompts), batch)):
                ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start:start + batch]]
                q, m = left_pad(ids, tokenizer.pad_token_id)
                s = sample(model, q, m, args.max_new_tokens, rules=SamplingRules(temperature=args.temperature),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           stop_strings=stop_strings, tokenizer=tokenizer,
                           generator=torch.Generator().manual_seed(args.seed * 1000 + i), drop_finished=drop)
                for key in ("generated_positions", "computed_positions", "padded_positions"):
                    counters[key] += getattr(s, key)
                counters["rows_ended_early"] += sum(1 for n in s.num_generated if n < args.max_new_tokens)
            best = min(best, time.perf_counter() - t0)
        out["drop" if drop else "keep"] = {
            "seconds": best, "generated_tokens_per_s": counters["generated_positions"] / best, **counters,
            "decode_pad_fraction": counters["padded_positions"] / counters["computed_positions"]
            if counters["computed_positions"] else 0.0,
        }
    out["speedup_drop_vs_keep"] = out["keep"]["seconds"] / out["drop"]["seconds"]
    return out


def every_turn_calls():
    """A protocol for the KV-reuse comparison: every turn (cut at its token budget) is a Calculator call, so every
    episode runs its full number of turns with forced tool text between them."""
    from rlcli.env.protocols import PlainText
    from rlcli.toolcalls import ToolCall

    class EveryTurnCalls(PlainText):
        stop_strings: tuple[str, ...] = ()

        def parse(self, model_text):
            return [ToolCall("Calculator", "12*7")]

        def format_response(self, output):
            return f"\n[calculator: {output}]\n"

        def system_prompt(self, tools):
            return ""

    return EveryTurnCalls()


def kv_reuse_compare(model, tokenizer, questions: list[str], args) -> dict:
    """Multi-turn episodes with and without KV-cache reuse across turns (same seeds): time, positions computed."""
    from rlcli.env.builtin_tools import calculator
    from rlcli.env.environment import TextEnvironment
    from rlcli.rl.sampling import SamplingRules

    prompts = questions[: args.kv_episodes]
    if args.chat_prompts:
        from rlcli.chat_template import ChatTemplate
        from rlcli.env.protocols import ChatProtocol
        from rlcli.toolcalls import hermes_calls, schemas_for

        chat = ChatProtocol(ChatTemplate(tokenizer), hermes_calls, schemas_for({"calculator": calculator}))
        prompts = [chat.start(q.strip()).text for q in prompts]
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    max_length = longest + args.kv_turns * (args.kv_new_tokens + 16)
    envs = {reuse: TextEnvironment(model, tokenizer, {"Calculator": calculator}, every_turn_calls(),
                                   max_turns=args.kv_turns, max_new_tokens=args.kv_new_tokens, max_length=max_length,
                                   rules=SamplingRules(temperature=args.temperature), tool_isolation="inline",
                                   kv_reuse=reuse)
            for reuse in (True, False)}

    def run(reuse):
        env, histories, stats = envs[reuse], [], []
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, len(prompts), args.batch)):
            histories += env.run(prompts[start:start + args.batch],
                                 generator=torch.Generator().manual_seed(args.seed * 1000 + i))
            stats.append(env.last_stats)
        return time.perf_counter() - t0, histories, stats

    run(True)  # warm-up (allocations, the first touch of mmapped weights)
    best, out = {True: float("inf"), False: float("inf")}, {}
    for _ in range(2):
        for reuse in (True, False):
            seconds, histories, stats = run(reuse)
            if seconds < best[reuse]:
                best[reuse] = seconds
                out[reuse] = (histories, stats)
    figures = {}
    for reuse in (True, False):
        histories, stats = out[reuse]
        figures["reuse" if reuse else "prefill_every_turn"] = {
            "seconds": best[reuse], "episodes": len(histories),
            "turns_per_episode": sum(h.num_turns for h in histories) / len(histories),
            "computed_positions": sum(s.computed_positions for s in stats),
            "reused_positions": sum(s.reused_positions for s in stats),
            "generated_tokens": sum(s.generated_tokens for s in stats),
        }
    a, b = out[True][0], out[False][0]
    figures["identical_episodes_fraction"] = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(a)
    figures["speedup"] = best[False] / best[True]
    figures["positions_ratio"] = (figures["prefill_every_turn"]["computed_positions"]
                                  / figures["reuse"]["computed_positions"])
    figures["prompt_tokens_longest"] = longest
    return figures


def tool_cost(batch: int, seed: int) -> dict:
    """``ToolRunner.run_many`` of one batch of calculator calls: forked (the environment's default) vs inline."""
    from rlcli.env.builtin_tools import calculator
    from rlcli.env.tools import ToolRunner
    from rlcli.toolcalls import ToolCall

    rng = random.Random(seed)
    calls = [ToolCall("Calculator", f"{rng.randint(100, 999)}*{rng.randint(10, 99)}") for _ in range(batch)]
    out = {}
    for isolation in ("fork", "inline"):
        runner = ToolRunner({"Calculator": calculator}, isolation=isolation)
        runner.run_many(calls[:2])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            results = runner.run_many(calls)
            best = min(best, time.perf_counter() - t0)
        assert all(r.status.value == "ok" for r in results), [r.output for r in results]
        out[isolation] = {"seconds_per_batch": best, "ms_per_call": 1000 * best / batch}
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(THREADS)
    import rlcli.env.environment as env_module
    import rlcli.models.generation as gen_module
    from rlcli.env.builtin_tools import calculator
    from rlcli.env.environment import TextEnvironment
    from rlcli.env.protocols import TagProtocol
    from rlcli.rl.sampling import SamplingRules

    model, tokenizer, source = load(args)
    protocol = TagProtocol()
    env = TextEnvironment(model, tokenizer, {"Calculator": calculator}, protocol, max_turns=args.max_turns,
                          max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                          rules=SamplingRules(temperature=args.temperature), tool_isolation=args.isolation)
    prompts, rows = prompts_for(args.episodes, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"env rollout benchmark: {source} ({params:,} parameters); {args.episodes} episodes in batches of "
          f"{args.batch}; {torch.get_num_threads()} thread(s)")
    kv = kv_reuse_compare(model, tokenizer, prompts_for(args.kv_episodes, args.seed)[0], args)
    report_kv(kv, args)
    if args.kv_only:
        write_json(args.json, {"model": source, "parameters": params, "env": environment("cpu"),
                               "threads": torch.get_num_threads(), "kv_reuse": kv})
        return 0

    probe = SamplerProbe(env_module)
    stop_probe = StopStringProbe(gen_module)
    try:
        histories, drop = run_env(env, prompts, rows, args.batch, args.seed, probe, stop_probe, args.warmup)
        probe.drop_finished = False
        histories_keep, keep = run_env(env, prompts, rows, args.batch, args.seed, probe, stop_probe, args.warmup)
    finally:
        env_module.sample = probe.original
        gen_module._hits_stop_string = stop_probe.original
    same = sum(a.token_ids == b.token_ids for a, b in zip(histories, histories_keep)) / len(histories)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        env.run(prompts[:args.batch], rows[:args.batch], generator=torch.Generator().manual_seed(args.seed))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    sampler = sampler_compare(model, tokenizer, prompts, args.batch, args, protocol.stop_strings)
    tools = tool_cost(args.batch, args.seed)
    memory = peak_memory("cpu")

    result = {"model": source, "parameters": params, "env": environment("cpu"), "threads": torch.get_num_threads(),
              "settings": {k: getattr(args, k) for k in ("episodes", "batch", "warmup", "max_turns", "max_new_tokens",
                                                          "max_length", "temperature", "isolation", "seed")},
              "env_drop_finished": drop, "env_keep_finished": keep, "identical_episodes_fraction": same,
              "env_speedup_drop_vs_keep": keep["seconds"] / drop["seconds"],
              "env_sampler_speedup_drop_vs_keep": keep["sampler_seconds"] / drop["sampler_seconds"],
              "sampler_first_turn": sampler,
              "tool_cost": tools, "memory": memory, "kv_reuse": kv,
              "examples": [h.text for h in histories[:3]]}
    report(result)
    write_json(args.json, result)
    return 0


def report_kv(kv: dict, args) -> None:
    r, p = kv["reuse"], kv["prefill_every_turn"]
    print_table("KV-cache reuse across turns", [
        ("episodes", f"{r['episodes']} × {r['turns_per_episode']:.2f} turns",
         f"{args.kv_new_tokens} tokens a turn, forced tool text between turns; longest prompt "
         f"{kv['prompt_tokens_longest']} tokens{' (chat template)' if args.chat_prompts else ''}"),
        ("seconds: reuse / prefill every turn", f"{r['seconds']:.2f} / {p['seconds']:.2f}",
         f"speedup {kv['speedup']:.2f}× (best of 2 each, alternating)"),
        ("positions computed: reuse / prefill", f"{r['computed_positions']} / {p['computed_positions']}",
         f"{kv['positions_ratio']:.2f}× fewer; {r['reused_positions']} context positions taken from kept caches"),
        ("identical episodes", f"{100 * kv['identical_episodes_fraction']:.0f}%",
         "same seeds; a difference is a float tie broken the other way"),
    ])


def report(r):
    d, k, s, t = r["env_drop_finished"], r["env_keep_finished"], r["sampler_first_turn"], r["tool_cost"]
    rows = [
        ("model", r["model"], f"{r['parameters']:,} parameters"),
        ("threads", str(r["threads"]), f"OMP_NUM_THREADS={r['env']['OMP_NUM_THREADS']}"),
        ("episodes / batch", f"{d['episodes']} / {r['settings']['batch']}",
         (f"max_turns={r['settings']['max_turns']} max_new_tokens={r['settings']['max_new_tokens']} "
          f"max_length={r['settings']['max_length']} T={r['settings']['temperature']} tools: {r['settings']['isolation']}")),
        None,
        ("episodes/s", f"{d['episodes_per_s']:.1f}", f"{d['seconds']:.2f} s for {d['episodes']} episodes"),
        ("generated tokens/s", f"{d['generated_tokens_per_s']:.0f}", f"{d['generated_tokens']} model tokens (tool tokens: {d['tool_tokens']})"),
        ("turns / tool calls per episode", f"{d['turns_per_episode']:.2f} / {d['tool_calls_per_episode']:.2f}",
         "outcomes " + (", ".join(f"{a}={b}" for a, b in d["tool_outcomes"].items()) or "none")),
        ("finish reasons", ", ".join(f"{a}={b}" for a, b in d["finish_reasons"].items()), ""),
        ("time in sampler / tools", f"{d['sampler_seconds']:.2f} / {d['tool_seconds']:.3f} s",
         f"{100 * d['sampler_seconds'] / d['seconds']:.0f}% / {100 * d['tool_seconds'] / d['seconds']:.1f}% of the run"),
        ("stop-string checks", f"{d['stop_string_checks']} calls, {d['stop_string_seconds']:.3f} s",
         f"{100 * d['stop_string_seconds'] / max(d['sampler_seconds'], 1e-9):.1f}% of sampler time (a decode per live row per step)"),
        ("positions: prefill (pad) / decode (pad)",
         f"{d['prefill_positions']} ({d['prefill_pad_positions']}) / {d['computed_positions']} ({d['padded_positions']})",
         f"generated {d['generated_positions']}"),
        ("EnvStats.pad_fraction (drop_finished)", f"{d['env_pad_fraction_mean_of_runs']:.3f}",
         f"prefill pad {d['prefill_pad_fraction']:.3f}; decode pad {d['decode_pad_fraction']:.3f} (finished rows)"),
        None,
        ("env, drop_finished=False: episodes/s", f"{k['episodes_per_s']:.1f}", f"{k['generated_tokens_per_s']:.0f} tokens/s"),
        ("  pad_fraction / decode pad fraction", f"{k['env_pad_fraction_mean_of_runs']:.3f} / {k['decode_pad_fraction']:.3f}",
         f"decode positions {k['computed_positions']} ({k['padded_positions']} padding for finished rows)"),
        ("  speedup of drop_finished=True: run / sampler", f"{r['env_speedup_drop_vs_keep']:.2f}× / {r['env_sampler_speedup_drop_vs_keep']:.2f}×",
         f"sampler {d['sampler_seconds']:.2f} vs {k['sampler_seconds']:.2f} s; identical episodes: {100 * r['identical_episodes_fraction']:.0f}%"),
        ("sampler alone, first turn: drop / keep", f"{s['drop']['seconds']:.3f} / {s['keep']['seconds']:.3f} s",
         (f"speedup {s['speedup_drop_vs_keep']:.2f}×; decode pad fraction {s['drop']['decode_pad_fraction']:.3f} / "
          f"{s['keep']['decode_pad_fraction']:.3f}; rows ended early {s['drop']['rows_ended_early']}")),
        None,
        ("tool call cost, fork / inline", f"{t['fork']['ms_per_call']:.2f} / {t['inline']['ms_per_call']:.3f} ms per call",
         f"ToolRunner.run_many of {r['settings']['batch']} calculator calls"),
        ("peak memory", f"{r['memory']['cpu_max_rss_mib']:.0f} MiB RSS", "ru_maxrss"),
    ]
    print_table("rlcli TextEnvironment rollout benchmark", rows)


if __name__ == "__main__":
    sys.exit(main())
