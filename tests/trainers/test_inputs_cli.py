"""Inputs that pass a schema check and would then crash or be misread, each refused by ``--dry-run``: prompts longer
than the model's positions leave room for (an IndexError in the sampler), duplicate YAML keys (the last would silently
win), empty data and eval files. Each is one paragraph naming what and where, no traceback."""

from __future__ import annotations

import json

import pytest

from tests.helpers import invoke_cli, plain, run_cli

PPO = "configs/tiny/ppo.yaml"
ONE_STEP = ["ppo.steps=1", "ppo.batch_size=16", "ppo.mini_batch_size=16", "logging.progress=false",
            "train.save_every=null"]


@pytest.fixture
def long_prompts(tmp_path):
    """16 prompts, one of 106 bytes: with the tiny recipe's 128 positions and 32 new tokens, 96 fit."""
    rows = [{"prompt": "x" * 100 + " seven"}] + [{"prompt": "write sevens"}] * 15
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_prompt_longer_than_the_positions_leave_is_cut_and_counted(long_prompts, tmp_path, monkeypatch):
    code, out, err = invoke_cli("ppo", PPO, f"output_dir={tmp_path / 'dry'}", f"data.path={long_prompts}",
                                "--dry-run", monkeypatch=monkeypatch)
    text = plain(out)
    assert code == 0, err
    assert "prompts longer than 96 tokens keep their last 96 tokens: the model has 128 positions, less " \
           "generation.max_new_tokens=32" in text, text
    res = run_cli("ppo", PPO, f"output_dir={tmp_path / 'run'}", f"data.path={long_prompts}", *ONE_STEP)
    text = plain(res.stdout)
    assert res.returncode == 0, res.stderr[-3000:]  # was: IndexError: index out of range in self
    assert "note: 1 of 16 prompts are longer than 96 tokens (the model's 128 positions less 32 new tokens) and " \
           "keep their last 96" in text, text


def test_long_prompts_refused_when_the_recipe_says_so(long_prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, _, err = invoke_cli("ppo", PPO, f"output_dir={out}", f"data.path={long_prompts}", *ONE_STEP,
                              "data.long_prompts=refuse", monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 1, err
    assert "data.long_prompts: refuse: 1 of 16 prompts are longer than 96 tokens" in err and "'xxxx" in err, err
    assert not (out / "model.safetensors").exists()


DUPLICATED = """output_dir: runs/x
seed: 0
model:
  architecture: gpt2
  tokenizer: byte
  config: {n_layer: 2, n_embd: 64, n_head: 2, n_positions: 128}
data:
  path: data/tiny/prompts.jsonl
reward:
  function: recipes/sevens.py:score
kl:
  coef: 0.05
ppo:
  steps: 60
  steps: 7
kl:
  coef: 0.5
"""


def test_a_key_set_twice_is_refused_naming_both_lines(tmp_path, monkeypatch):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(DUPLICATED)
    for extra in (["--dry-run"], []):
        code, _, err = invoke_cli("ppo", str(recipe), f"output_dir={tmp_path / 'o'}", *extra, monkeypatch=monkeypatch)
        err = plain(err)
        assert code == 2, err
        assert f"{recipe}:15: ppo.steps: set twice in this mapping, on line 14 and again on line 15" in err, err
        assert f"{recipe}:16: kl: set twice in this mapping, on line 11 and again on line 16" in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, recipe, key", [("sft", "configs/tiny/sft.yaml", "data.path"),
                                                  ("ppo", PPO, "data.path"),
                                                  ("ppo", PPO, "data.eval_path"),
                                                  ("rm", "configs/tiny/rm.yaml", "data.eval_path")])
@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_an_empty_data_or_eval_file_is_refused_by_dry_run(tmp_path, monkeypatch, command, recipe, key, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    code, _, err = invoke_cli(command, recipe, f"output_dir={tmp_path / 'o'}", f"{key}={empty}", "--dry-run",
                              monkeypatch=monkeypatch)
    err = plain(err)
    assert code == 2 and f"command line: {key}: file {empty} is empty: it has no rows" in err, err


def test_an_empty_csv_or_parquet_is_refused_by_dry_run(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    header_only = tmp_path / "rows.csv"
    header_only.write_text("prompt,completion\n")
    no_rows = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}), no_rows)
    for path in (header_only, no_rows):
        code, _, err = invoke_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'o'}", f"data.path={path}",
                                  "--dry-run", monkeypatch=monkeypatch)
        assert code == 2 and f"file {path} is empty: it has no rows" in plain(err), err


def test_no_network_is_said_at_once_not_after_a_minute_of_hub_retries(tmp_path):
    """The hub's endpoint refusing connections (as on a machine without network): rlcli's own error names the id
    within seconds, not after the hub library's retries of each file (about a minute)."""
    import time

    start = time.time()
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={tmp_path / 'o'}", "model.architecture=null",
                  "model.config=null", "model.tokenizer=null", "model.name_or_path=nobody/no-such-model",
                  env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=120)
    err = plain(res.stderr)
    assert res.returncode == 1 and time.time() - start < 30, err
    assert "model.name_or_path: 'nobody/no-such-model' is not a local path and not in the local Hugging Face " \
           "cache" in err and "the Hugging Face hub (http://127.0.0.1:9) cannot be reached" in err, err
    assert "Retrying" not in res.stderr + res.stdout and "Traceback" not in res.stderr
