"""Recipe loading: overrides, type errors, unknown keys with did-you-mean, YAML errors with lines."""

from __future__ import annotations

import pytest

from rlcli.config import RecipeError, load_recipe
from rlcli.config.errors import Problem
from rlcli.config.loader import parse_override
from rlcli.config.sft import SFTRecipe

BASE = """\
output_dir: runs/x
model:
  architecture: gpt2
data:
  path: data/tiny/sft.jsonl
train:
  batch_size: 32
  micro_batch_size: 8
"""


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_overrides_parse_as_yaml_scalars():
    assert parse_override("train.batch_size=64") == ("train.batch_size", 64)
    assert parse_override("optim.learning_rate=3e-4") == ("optim.learning_rate", 3e-4)
    assert parse_override("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    assert parse_override("data.packing=true") == ("data.packing", True)
    assert parse_override("output_dir=runs/a") == ("output_dir", "runs/a")


def test_overrides_apply_and_defaults_fill(tmp_path):
    r = load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.batch_size=64", "optim.learning_rate=1e-5", "seed=7"])
    assert r.train.batch_size == 64 and r.optim.learning_rate == 1e-5 and r.seed == 7
    assert r.train.mixed_precision == "no" and r.data.format == "auto"


def test_yaml_1_1_quirks(tmp_path):
    r = load_recipe(SFTRecipe, _write(tmp_path, BASE + "  mixed_precision: no\noptim:\n  learning_rate: 1e-5\n"))
    assert r.train.mixed_precision == "no" and r.optim.learning_rate == 1e-5


def test_all_problems_reported_together_with_lines_and_suggestions(tmp_path):
    text = BASE.replace("  path:", "  formt: text\n  path:") + "optim:\n  lerning_rate: 0.1\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, _write(tmp_path, text), ["train.epochs=abc"])
    problems = {p.key: p for p in err.value.problems}
    assert set(problems) == {"data.formt", "optim.lerning_rate", "train.epochs"}
    assert "did you mean 'format'" in problems["data.formt"].message and problems["data.formt"].line == 5
    assert "did you mean 'learning_rate'" in problems["optim.lerning_rate"].message
    assert problems["train.epochs"].source == "command line"


def test_batch_arithmetic_quotes_values(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.batch_size=30"])
    msg = str(err.value)
    assert "train" in msg and "batch_size=30" in msg and "micro_batch_size" in msg


def test_batch_arithmetic_uses_the_process_count_it_is_given(tmp_path, monkeypatch):
    """The count comes from the caller (the command line reads the launch once); the environment is not read."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert load_recipe(SFTRecipe, _write(tmp_path, BASE)).train.micro_batch_size == 8
    with pytest.raises(RecipeError, match="16 × 4 = 64: set train.micro_batch_size to a divisor of 8"):
        load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.micro_batch_size=16"], processes=4)
    # unset, the micro-batch is each process's whole share
    recipe = load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.micro_batch_size=null", "train.batch_size=32"],
                         processes=4)
    assert recipe.train.micro_batch_size == 8
    with pytest.raises(RecipeError, match="multiple of the process count 3: set train.batch_size"):
        load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.micro_batch_size=null", "train.batch_size=32"],
                    processes=3)


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, _write(tmp_path, BASE + "seed: 1: 2\n"))
    assert err.value.problems[0].line == 9 and "YAML syntax error" in str(err.value)


def test_model_needs_exactly_one_source(tmp_path):
    with pytest.raises(RecipeError, match="exactly one of 'name_or_path'"):
        load_recipe(SFTRecipe, _write(tmp_path, BASE), ["model.name_or_path=gpt2"])


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(SFTRecipe, tmp_path / "nope.yaml")


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, _write(tmp_path, BASE), ["train.learning_rate=0.1"])
    assert "did you mean 'optim.learning_rate'" in str(err.value)


def test_problems_found_after_validation_point_to_the_file_line_or_the_command_line(tmp_path):
    """A command's own checks return typed problems; `locate` places each where its key was set."""
    from rlcli.config.loader import load_recipe_and_origin, locate

    path = _write(tmp_path, BASE)
    recipe, origin = load_recipe_and_origin(SFTRecipe, path, ["train.batch_size=64"])
    assert not hasattr(recipe, "_rlcli_origin")  # the origin travels beside the recipe, not hidden on it
    found = [Problem("data.path", "does not exist"), Problem("train.batch_size", "too big"),
             Problem("", "something else: is off")]
    problems = locate(found, origin)
    assert (problems[0].key, problems[0].source, problems[0].line) == ("data.path", str(path), 5)
    assert (problems[1].key, problems[1].source, problems[1].line) == ("train.batch_size", "command line", None)
    assert problems[2].key == "" and problems[2].message == "something else: is off"  # no key parsed out of text
    assert problems[0].render() == f"{path}:5: data.path: does not exist"
    # a recipe built in code has no origin: the source given is used
    assert locate([Problem("data.path", "nope")], "mine")[0].render() == "mine: data.path: nope"


def test_a_recipe_check_finding_several_problems_lists_each_at_its_key(tmp_path):
    """A cross-section check (the PPO recipe's sizes) reports each problem under its own key and line, not one
    joined sentence at the top of the file."""
    from rlcli.config.ppo import PPORecipe

    text = """\
output_dir: runs/x
model:
  architecture: gpt2
  tokenizer: byte
data:
  path: data/tiny/prompts.jsonl
reward:
  function: recipes/sevens.py:score
generation:
  max_new_tokens: 8
  min_new_tokens: 16
ppo:
  advantage: grpo
  group_size: 8
  batch_size: 60
  mini_batch_size: 25
"""
    with pytest.raises(RecipeError) as err:
        load_recipe(PPORecipe, _write(tmp_path, text), ["ppo.group_size=1"])
    where = {(p.key, p.line, p.source) for p in err.value.problems}
    path = str(tmp_path / "r.yaml")
    assert ("generation.min_new_tokens", 11, path) in where
    assert ("ppo.group_size", None, "command line") in where
    assert ("ppo.batch_size", 15, path) in where
    assert ("ppo.advantage_scaling", None, path) in where  # grpo's default scaling, not written in the file
    assert len(err.value.problems) == 4


def test_model_config_null_means_no_overrides():
    # clearing a from-scratch recipe's model section to load a saved model: model.config=null, not a type error
    from rlcli.config.common import ModelConfig

    assert ModelConfig(name_or_path="some/dir", config=None).config == {}
