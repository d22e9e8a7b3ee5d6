"""The TRL side of ``bench/trl_compare.py``: one training run with TRL 1.16 in the TRL virtualenv, measured as the
rlcli side is (``_common.RLCLI_DRIVER``).

    python bench/_trl_driver.py SPEC.json RESULT.json

SPEC (written by trl_compare.py) says the task (``sft``, ``grpo`` or ``reasoning``), the model directory, the data
file (rows already in the order rlcli draws them), the chat template, and the trainer's settings. RESULT gets
``step_seconds``, ``peak_rss_steps``, ``peak_rss_run``, ``logs`` (TRL's log line per step) and what the batches held
(``sft``: real tokens, padded positions and target tokens per step and the first examples' token ids; ``grpo`` and
``reasoning``: the first prompt's token ids), so the two sides' work can be compared. ``reasoning`` also saves the
final LoRA adapter in ``OUTPUT_DIR/adapter`` for the held-out evaluation.

Runs without rlcli on the path (only the standard library, torch, transformers, peft, datasets and TRL): the
calculator is rlcli's own ``rlcli/env/builtin_tools.py`` loaded as a plain module (it needs only the standard
library), the reward is ``recipes/smollm2_tools.py:exact_answer``.
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
from _common import reset_peak, vm_hwm  # noqa: E402  (_common needs only the standard library)

REPO = HERE.parent


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    t_start = time.perf_counter()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = Path(spec["chat_template"]).read_text()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    data = load_dataset("json", data_files=spec["data"], split="train")

    marks: list[float] = []
    hwm = [0]
    history: list[dict] = []

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            hwm[0] = max(hwm[0], vm_hwm())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "train_runtime" not in logs:
                history.append({"step": state.global_step, **logs})

    common = dict(output_dir=spec["output_dir"], max_steps=spec["steps"], seed=spec["seed"], data_seed=spec["seed"],
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=spec.get("bf16", False), fp16=False,
                  gradient_checkpointing=spec["gradient_checkpointing"],
                  gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch",
                  pad_to_multiple_of=None, **spec["trainer"])
    extra: dict = {}
    if spec["task"] == "sft":
        from trl import SFTConfig, SFTTrainer

        # the data file holds the rows in the order rlcli draws them: read it in order
        args = SFTConfig(train_sampling_strategy="sequential", shuffle_dataset=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
        batches: list[dict] = []
        compute_loss = trainer.compute_loss

        def counted_loss(model, inputs, *a, **kw):
            if model.training:
                labels = inputs["labels"]
                batches.append({"tokens": int(inputs["attention_mask"].sum()), "positions": int(labels.numel()),
                                "targets": int((labels[:, 1:] != -100).sum())})
            return compute_loss(model, inputs, *a, **kw)

        trainer.compute_loss = counted_loss
        n = spec["steps"] * spec["trainer"]["per_device_train_batch_size"]
        extra["example_ids"] = [list(trainer.train_dataset[i]["input_ids"]) for i in range(min(n, len(data)))]
        # TRL folds the assistant mask into a `labels` column (-100 outside the assistant turns)
        extra["example_masks"] = [[int(t != -100) for t in trainer.train_dataset[i]["labels"]]
                                  for i in range(min(n, len(data)))]
        extra["batches"] = batches
    elif spec["task"] == "reasoning":
        from trl import GRPOConfig, GRPOTrainer

        # the reward rlcli trains on, from the same file (it needs only the standard library and reasoning-gym)
        task = load_file("rlcli_reasoning_gym", REPO / "rlcli" / "tasks" / "reasoning_gym.py")

        def reasoning_gym_score(prompts, completions, reasoning_gym, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [task.score_one(t, {"reasoning_gym": meta}) for t, meta in zip(texts, reasoning_gym)]

        args = GRPOConfig(shuffle_dataset=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[reasoning_gym_score], args=args, train_dataset=data,
                              processing_class=tokenizer, peft_config=peft_config)
        tokenize_prompts = trainer._tokenize_prompts
        first_prompts: list = []

        def recorded(prompts, *a, **kw):
            out = tokenize_prompts(prompts, *a, **kw)
            if not first_prompts:
                first_prompts.append(list(out[0][0]))
            return out

        trainer._tokenize_prompts = recorded
        extra["first_prompt_ids"] = first_prompts
    else:
        from trl import GRPOConfig, GRPOTrainer
        from trl.chat_template_utils import qwen3_template

        builtin = load_file("rlcli_builtin_tools", REPO / "rlcli" / "env" / "builtin_tools.py")
        tools_recipe = load_file("smollm2_tools", REPO / "recipes" / "smollm2_tools.py")

        # recipes/smollm2_tools.py:calculator without its `-> str`: transformers would put a "return" entry into
        # the schema it renders, which rlcli's schema (and so its system prompt) does not have
        def calculator(expression: str):
            """Evaluate an arithmetic expression.

            Args:
                expression: e.g. "12*7"
            """
            return builtin.calculator(expression)

        def exact_answer(prompts, completions, answer, **kwargs):
            finals = []
            for messages in completions:
                said = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
                finals.append(said[-1] if said else "")
            return tools_recipe.exact_answer(finals, [{"answer": a} for a in answer])

        # SmolLM2 is ChatML and the calls are Hermes <tool_call>...</tool_call>, as for Qwen: TRL's Qwen parser reads
        # them (TRL has none for SmolLM2's template, which knows no tools)
        tokenizer.response_template = qwen3_template
        args = GRPOConfig(shuffle_dataset=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=args, train_dataset=data,
                              processing_class=tokenizer, peft_config=peft_config, tools=[calculator])
        tokenize_prompts = trainer._tokenize_prompts
        first_prompts: list = []

        def recorded(prompts, *a, **kw):
            out = tokenize_prompts(prompts, *a, **kw)
            if not first_prompts:
                first_prompts.append(list(out[0][0]))
            return out

        trainer._tokenize_prompts = recorded
        extra["first_prompt_ids"] = first_prompts

    trainer.add_callback(Measure())
    trainer.train()
    if spec["task"] == "reasoning":  # the final adapter, for the held-out evaluation in trl_compare.py
        trainer.save_model(str(Path(spec["output_dir"]) / "adapter"))
    result = {"step_seconds": [b - a for a, b in itertools.pairwise(marks)], "peak_rss_steps": hwm[0],
              "peak_rss_run": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "logs": history,
              "seconds_in_process": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(), **extra}
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
