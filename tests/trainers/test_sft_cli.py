"""``rlcli sft`` end to end through the real entry point: it learns, saves a loadable model, resumes exactly,
runs under accelerate with 2 processes, and refuses bad input cleanly."""

from __future__ import annotations

import importlib.util
import json
import re
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO, accelerate_launch, kill_when, plain, read_metrics, run_cli, run_drift_bound

TINY = "configs/tiny/sft.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    res = run_cli("sft", TINY, f"output_dir={out}", "logging.progress=false")
    assert res.returncode == 0, res.stderr
    return out


def test_loss_halves_and_model_reloads(trained):
    metrics = read_metrics(trained)
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 150
    assert metrics[-1]["loss"] <= 0.5 * metrics[0]["loss"], (metrics[0]["loss"], metrics[-1]["loss"])
    assert {"loss", "lr", "tokens_per_s", "epoch"} <= set(metrics[0]) and "eval_loss" in metrics[-1]
    assert (trained / "recipe.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    rows = [json.loads(line) for line in (REPO / "data/tiny/sft.jsonl").read_text().splitlines()][:20]
    correct = 0
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        correct += tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == row["completion"]
    assert correct >= 16, f"only {correct}/20 prompts answered exactly"


def test_resume_after_kill_matches_uninterrupted(trained, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step-00000050"
    kill_when(["sft", TINY, f"output_dir={out}", "logging.progress=false"], ckpt.exists)
    assert ckpt.exists()
    res = run_cli("sft", TINY, f"output_dir={out}", "logging.progress=false", "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming at step" in res.stdout
    assert re.search(r"\d+ CPU threads?", res.stdout)  # the run header says how many threads it uses
    expected = read_metrics(trained)
    got = read_metrics(out)
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    assert [m["loss"] for m in got] == [m["loss"] for m in expected]  # bit for bit on CPU
    assert got[-1]["eval_loss"] == pytest.approx(expected[-1]["eval_loss"], rel=1e-6)


def test_refuses_to_clobber_a_run(trained):
    res = run_cli("sft", TINY, f"output_dir={trained}")
    assert res.returncode == 1 and "already holds a run" in plain(res.stderr)
    assert "Traceback" not in res.stderr


def test_resume_without_checkpoint(tmp_path):
    res = run_cli("sft", TINY, f"output_dir={tmp_path / 'none'}", "--resume")
    assert res.returncode == 1 and "no checkpoint" in plain(res.stderr)


def test_dry_run_prints_resolved_recipe_and_writes_nothing(tmp_path):
    out = tmp_path / "dry"
    res = run_cli("sft", TINY, f"output_dir={out}", "--dry-run")
    assert res.returncode == 0, res.stderr
    text = plain(res.stdout)
    # micro_batch_size unset in the recipe: resolved to the whole share of the one process
    assert "dry run OK" in text and "micro_batch_size: 32" in text and "1 accumulation step(s)" in text
    res = run_cli("sft", TINY, f"output_dir={out}", "train.micro_batch_size=16", "--dry-run")
    assert "micro_batch_size: 16" in plain(res.stdout) and "2 accumulation step(s)" in plain(res.stdout)
    assert not out.exists()


def test_workstation_recipe_passes_dry_run_offline():
    # as shipped (TensorBoard is optional: a commented line), without tensorboard installed
    res = run_cli("sft", "configs/sft_gpt2_imdb.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "name_or_path: gpt2" in res.stdout
    if importlib.util.find_spec("tensorboard") is None:  # asked for and missing: the dry run names the package
        res = run_cli("sft", "configs/sft_gpt2_imdb.yaml", "logging.report_to=[tensorboard]", "--dry-run")
        assert res.returncode == 2 and "pip install tensorboard" in plain(res.stderr), res.stderr


NO_DROPOUT = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0"]


def test_accelerate_two_processes_match_one(tmp_path):
    """Same global batch on 1 and 2 processes gives the same updates (dropout off, so only float summation
    order differs)."""
    common = ["logging.progress=false", "train.max_steps=20", "train.save_every=null", "eval.every=null", *NO_DROPOUT]
    out = tmp_path / "ddp"
    # a user's command: Accelerate's own CPU launcher starts one process, rlcli then starts the two asked for;
    # they meet on a free port, so a port taken by another listener (a second run on the machine) does not matter
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = accelerate_launch("--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", "--main_process_port", str(port),
                                "-m", "rlcli", "sft", TINY, f"output_dir={out}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in plain(res.stdout)
    two = read_metrics(out)
    res = run_cli("sft", TINY, f"output_dir={tmp_path / 'one'}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    one = read_metrics(tmp_path / "one")
    assert len(two) == len(one) == 20
    # the same sums in another order, drifting apart step by step: GPT-2's widest reduction is its MLP's (4 × n_embd
    # 128), 2 layers (tests/helpers.run_drift_bound); the loss falls by many times that bound
    for a, b in zip(one, two):
        assert abs(b["loss"] - a["loss"]) <= run_drift_bound(a["loss"], width=512, layers=2, steps=a["step"]), (
            a["step"], a["loss"], b["loss"])
    assert one[-1]["loss"] < 0.7 * one[0]["loss"]
    assert one[0]["loss"] - one[-1]["loss"] > 10 * run_drift_bound(one[0]["loss"], width=512, layers=2, steps=20)
    assert (out / "model.safetensors").exists()


def _chat_data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["red", "green", "blue", "cyan"] * 8]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_lora_on_a_trained_model_learns_and_merges(trained, tmp_path):
    out = tmp_path / "lora"
    res = run_cli("sft", TINY, f"output_dir={out}", "logging.progress=false", "train.max_steps=30",
                  f"model.name_or_path={trained}", "model.architecture=null", "model.tokenizer=null",
                  f"data.path={_chat_data(tmp_path)}", "data.format=messages", "data.eval_fraction=0",
                  "lora.r=8", "lora.merge_on_save=true", "optim.learning_rate=1e-2", "train.save_every=null")
    assert res.returncode == 0, res.stderr
    metrics = read_metrics(out)
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], (metrics[0]["loss"], metrics[-1]["loss"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(trained)
    assert not (out / "model.safetensors").exists(), "a LoRA run saves the adapter, not a full copy"
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)


def test_lora_on_a_scratch_base_saves_the_base(tmp_path):
    out = tmp_path / "lora"
    res = run_cli("sft", TINY, f"output_dir={out}", "logging.progress=false", "train.max_steps=3", "lora.r=4",
                  "train.save_every=null", "eval.every=null")
    assert res.returncode == 0, res.stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_chat_messages_format(tmp_path):
    res = run_cli("sft", TINY, f"output_dir={tmp_path / 'chat'}", f"data.path={_chat_data(tmp_path)}", "data.format=messages",
                  "train.max_steps=15", "data.eval_fraction=0", "logging.progress=false", "train.save_every=null")
    assert res.returncode == 0, res.stderr
    m = read_metrics(tmp_path / "chat")
    assert m[-1]["loss"] < 0.5 * m[0]["loss"]


# --- bad input: clear message, non-zero exit, no traceback, no final model -----------------------------------

BAD_ROWS = '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n'
BAD_JSON = '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": }\n'


@pytest.mark.parametrize(
    "case, recipe_text, overrides, data_text, code, fragments",
    [
        ("missing recipe", None, [], None, 2, ["recipe file not found"]),
        ("yaml syntax", "output_dir: x\nmodel: {architecture: gpt2\n", [], None, 2, ["YAML syntax error", ":3"]),
        ("unknown key", None, ["train.lerning_rate=0.1"], None, 2, ["train.lerning_rate", "unknown key"]),
        ("wrong type", None, ["train.batch_size=lots"], None, 2, ["train.batch_size", "valid integer", "'lots'"]),
        ("missing data file", None, ["data.path=nowhere.jsonl"], None, 2,
         ["command line: data.path", "nowhere.jsonl", "does not exist"]),
        ("data file of another type", None, ["data.path=README.md"], None, 2,
         ["command line: data.path", "unsupported file type '.md'"]),
        ("missing field", None, ["data.path=DATA"], BAD_ROWS, 1, ["data.jsonl:2: no value for 'completion'"]),
        ("malformed JSON line", None, ["data.path=DATA"], BAD_JSON, 2,  # found by the first pass (--dry-run too)
         ["data.jsonl:3: not valid JSON: Expecting value (column 31)"]),
        ("empty dataset", None, ["data.path=DATA"], "", 2, ["command line: data.path", "empty", "no rows"]),
        ("unknown architecture", None, ["model.architecture=gtp2"], None, 2, ["unknown architecture 'gtp2'", "gpt2"]),
        ("batch does not divide", None, ["train.batch_size=30", "train.micro_batch_size=16"], None, 2,
         ["batch_size=30", "micro_batch_size", "divisor of 30"]),
        ("model not in the cache (offline)", None, ["model.architecture=null", "model.name_or_path=nowhere/model"],
         None, 1, ["model.name_or_path: 'nowhere/model' is not a local path and not in the local Hugging Face cache",
                   "HF_HUB_OFFLINE is set"]),
    ],
)
def test_bad_input(tmp_path, case, recipe_text, overrides, data_text, code, fragments):
    recipe = REPO / TINY
    if case == "missing recipe":
        recipe = tmp_path / "missing.yaml"
    elif recipe_text is not None:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(recipe_text)
    data = tmp_path / "data.jsonl"
    if data_text is not None:
        data.write_text(data_text)
    overrides = [o.replace("DATA", str(data)) for o in overrides]
    out = tmp_path / "out"
    res = run_cli("sft", str(recipe), f"output_dir={out}", *overrides)
    err = plain(res.stderr)
    assert res.returncode == code, (case, res.returncode, res.stderr[-2000:])
    for fragment in fragments:
        assert fragment in err, (case, fragment, err)
    assert "Traceback" not in res.stderr + res.stdout
    assert "An error occurred" not in err and "Failed to load" not in err  # the library's words, not the cause
    assert res.stderr.lstrip().startswith("╭"), res.stderr  # nothing but the error panel
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
