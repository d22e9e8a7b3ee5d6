"""The TRL side of ``bench/trl011_ppo.py``: classic PPO with TRL 0.11's ``PPOTrainer`` in the TRL 0.11 virtualenv,
measured as the rlcli side is (``_common.RLCLI_DRIVER``).

    python bench/_trl011_driver.py SPEC.json RESULT.json

SPEC (written by trl011_ppo.py) holds the model directory (the same random-init GPT-2 and byte-level tokenizer the
rlcli side loads), the prompts of every step as token ids (encoded by rlcli's own functions, in rlcli's order), the
``PPOConfig`` fields and the sampling settings. Each step is what rlcli's trainer does in one step:
``ppo_trainer.generate`` (the whole batch in one ``generate`` call), decode, ``recipes/sevens.py:score``,
``ppo_trainer.step``. RESULT gets ``step_seconds`` (from the loop's start to the end of each step), ``cpu_seconds`` (the process's user
+ system CPU time over the same spans),
``peak_rss_steps`` (``VmHWM`` after a reset when the loop starts), ``peak_rss_run`` (``ru_maxrss``), and per step
the mean reward, the mean response length, TRL's KL and its own phase timers (``time/ppo/*``) plus the time spent
generating and scoring.

Runs without rlcli on the path: the standard library, torch, transformers and TRL only (``recipes/sevens.py``
needs nothing else).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import reset_peak, vm_hwm

REPO = HERE.parent


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    t_start = time.perf_counter()

    import torch
    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    model_dir = Path(spec["model"])
    # rlcli's byte tokenizer, saved by transformers 5 (tokenizer_class "TokenizersBackend", which 4.46 does not
    # know): the same tokenizer.json, wrapped as the class rlcli builds it with
    tok = spec["tokens"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **tok)
    # the value head as rlcli's: zero weights and bias (ppo.value_head_init_std 0), no dropout (rlcli disables every
    # dropout; the saved config has them at 0 already)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, v_head_init_strategy="normal", v_head_initializer_range=0.0,
        summary_dropout_prob=0.0)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, v_head_init_strategy="normal", v_head_initializer_range=0.0,
        summary_dropout_prob=0.0)
    o = spec["optim"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o["lr"],
                                  betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
    config = PPOConfig(**spec["ppo_config"])
    trainer = PPOTrainer(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer, optimizer=optimizer)
    sevens = load_file("sevens", REPO / spec["reward_file"])
    score = getattr(sevens, spec["reward_function"])
    gen_kwargs = dict(spec["generation"])

    def cpu_now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    marks: list[float] = []
    cpu: list[float] = []
    hwm = 0
    per_step: list[dict] = []
    reset_peak()
    marks.append(time.perf_counter())
    cpu.append(cpu_now())
    for ids in spec["prompt_ids"]:
        t0 = time.perf_counter()
        queries = [torch.tensor(q, dtype=torch.long) for q in ids]
        responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False, **gen_kwargs)
        t1 = time.perf_counter()
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = [torch.tensor(s, dtype=torch.float32) for s in score(texts)]
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        marks.append(time.perf_counter())
        cpu.append(cpu_now())
        hwm = max(hwm, vm_hwm())
        per_step.append({"reward_mean": float(torch.stack(scores).mean()),
                         "response_length": sum(len(r) for r in responses) / len(responses),
                         "kl": float(stats["objective/kl"]), "approx_kl": float(stats["ppo/policy/approxkl"]),
                         "policy_clipfrac": float(stats["ppo/policy/clipfrac"]), "time_generate": t1 - t0, "time_score": t2 - t1,
                         **{k: float(v) for k, v in stats.items() if k.startswith("time/")}})
    result = {"step_seconds": [b - a for a, b in itertools.pairwise(marks)],
              "cpu_seconds": [b - a for a, b in itertools.pairwise(cpu)], "peak_rss_steps": hwm,
              "peak_rss_run": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "metrics": per_step,
              "seconds_in_process": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads()}
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
