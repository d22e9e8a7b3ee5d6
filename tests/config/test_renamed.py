"""Old recipe key names keep working for one release: the value reaches the new key, and the run says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlcli.config.env import EnvRolloutRecipe
from rlcli.config.errors import RecipeError
from rlcli.config.loader import load_recipe_and_origin
from rlcli.config.ppo import PPORecipe
from rlcli.config.renamed import MIGRATIONS, old_names
from rlcli.config.rm import RMRecipe
from rlcli.config.sft import SFTRecipe

REPO = Path(__file__).resolve().parents[2]
PPO, CALC, SFT, RM, ROLLOUT = (REPO / "configs" / p for p in ("tiny/ppo.yaml", "calculator.yaml", "tiny/sft.yaml",
                                                                "tiny/rm.yaml", "calculator_eval.yaml"))


def _load(schema, path, *overrides):
    recipe, origin = load_recipe_and_origin(schema, path, list(overrides))
    return recipe, [n.render() for n in origin.notes]


def _with(tmp_path, path: Path, edit) -> Path:
    """A copy of the recipe at ``path``, its parsed YAML changed by ``edit``."""
    data = yaml.safe_load(path.read_text())
    edit(data)
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.mark.parametrize("schema, path, old, new, value", [
    (SFTRecipe, SFT, "train.eval_every", "eval.every", 7),
    (SFTRecipe, SFT, "train.eval_batch_size", "eval.batch_size", 5),
    (RMRecipe, RM, "train.eval_every", "eval.every", 7),
    (RMRecipe, RM, "train.eval_batch_size", "eval.batch_size", 5),
    (PPORecipe, CALC, "train.keep_best", "eval.keep_best", "eval/pass@1"),
    (PPORecipe, CALC, "train.keep_best_mode", "eval.keep_best_mode", "min"),
    (PPORecipe, CALC, "env.max_new_tokens", "generation.max_new_tokens", 24),
    (PPORecipe, CALC, "env.system_prompt", "env.describe_tools", True),
    (EnvRolloutRecipe, ROLLOUT, "temperature", "generation.temperature", 0.3),
    (EnvRolloutRecipe, ROLLOUT, "top_k", "generation.top_k", 5),
    (EnvRolloutRecipe, ROLLOUT, "top_p", "generation.top_p", 0.9),
    (EnvRolloutRecipe, ROLLOUT, "env.max_new_tokens", "generation.max_new_tokens", 24),
])
def test_an_old_name_sets_the_new_key_and_says_so(tmp_path, schema, path, old, new, value):
    def old_only(data):  # the shipped recipe may set the new key; the user's old recipe would not have
        node = data
        *parents, last = new.split(".")
        for part in parents:
            node = node.get(part) or {}
        node.pop(last, None)

    src = _with(tmp_path, path, old_only)
    recipe, notes = _load(schema, src, f"{old}={value}")
    got = recipe
    for part in new.split("."):
        got = getattr(got, part)
    assert got == value
    assert notes == [f"command line: {old} is now {new}: rename it (the old name works until the next release)"]
    # the new name gives the same recipe, without a note
    renamed, quiet = _load(schema, src, f"{new}={value}")
    assert quiet == [] and renamed == recipe


def test_an_old_name_in_the_file_is_placed_at_its_line(tmp_path):
    src = tmp_path / "r.yaml"
    text = CALC.read_text().replace("  max_new_tokens: 40\n", "")
    src.write_text(text.replace("  max_turns: 2\n", "  max_turns: 2\n  max_new_tokens: 40\n"))
    line = src.read_text().splitlines().index("  max_new_tokens: 40") + 1
    recipe, notes = _load(PPORecipe, src)
    assert recipe.generation.max_new_tokens == 40
    assert notes == [f"{src}:{line}: env.max_new_tokens is now generation.max_new_tokens: rename it (the old name "
                     "works until the next release)"]
    # a bad value under the old name is reported at the old key's line, under the new key
    src.write_text(src.read_text().replace("  max_new_tokens: 40", "  max_new_tokens: -1"))
    with pytest.raises(RecipeError) as err:
        _load(PPORecipe, src)
    [problem] = err.value.problems
    assert (problem.key, problem.line) == ("generation.max_new_tokens", line)


def test_the_old_and_the_new_name_together_are_refused():
    with pytest.raises(RecipeError) as err:
        _load(PPORecipe, CALC, "env.max_new_tokens=24")  # the recipe sets generation.max_new_tokens: 40
    assert [p.render() for p in err.value.problems] == [
        "command line: env.max_new_tokens is the old name of generation.max_new_tokens, which is set too: keep "
        "generation.max_new_tokens only"]


def test_whiten_advantages_became_a_scaling():
    assert _load(PPORecipe, PPO)[0].ppo.advantage_scaling == "batch"  # gae's default: whitened, as before
    for old, new in (("true", "batch"), ("false", "none")):
        recipe, notes = _load(PPORecipe, PPO, f"ppo.whiten_advantages={old}")
        assert recipe.ppo.advantage_scaling == new
        assert notes == [f"command line: ppo.whiten_advantages={old} is now ppo.advantage_scaling={new} (the old "
                         "name works until the next release)"]
    # never read by a critic-free estimator: dropped, its scaling left to the estimator
    recipe, notes = _load(PPORecipe, REPO / "configs/tiny/grpo.yaml", "ppo.whiten_advantages=false")
    assert recipe.ppo.advantage_scaling == "group" and "ignored with ppo.advantage=grpo" in notes[0]
    with pytest.raises(RecipeError, match="ppo.advantage_scaling, which is set too"):  # in a recipe, both is a clash
        _load(PPORecipe, PPO, "ppo.whiten_advantages=true", "ppo.advantage_scaling=none")
    with pytest.raises(RecipeError, match="group scales by the spread"):
        _load(PPORecipe, PPO, "ppo.advantage_scaling=group")


def test_score_scale_became_the_reward_weight():
    recipe, notes = _load(PPORecipe, PPO, "ppo.score_scale=2", "reward.weight=1.5")
    assert (recipe.reward.weight, recipe.reward.environment_weight) == (3.0, 2.0)
    assert "reward.weight and reward.environment_weight (both multiplied by 2)" in notes[0]
    recipe, notes = _load(PPORecipe, PPO, "ppo.score_scale=1.0")
    assert recipe.reward.weight == 1.0 and "1.0 changed nothing" in notes[0]
    for bad in ("0", "-2", "true", "x"):
        with pytest.raises(RecipeError, match="expected a number > 0"):
            _load(PPORecipe, PPO, f"ppo.score_scale={bad}")
    for bad in ("[1]", "true"):  # a bad weight is named by the schema, under its own key (true is not 1 × 2)
        with pytest.raises(RecipeError) as err:
            _load(PPORecipe, PPO, "ppo.score_scale=2", f"reward.weight={bad}")
        assert [p.key for p in err.value.problems] == ["reward.weight"]
    with pytest.raises(RecipeError, match="after ppo.score_norm=running"):
        _load(PPORecipe, PPO, "ppo.score_scale=2", "ppo.score_norm=running")


def test_removed_keys_that_did_nothing_are_dropped_with_a_note():
    recipe, notes = _load(PPORecipe, PPO, "generation.top_k=0", "generation.top_p=1.0")
    assert len(notes) == 2 and all("is no longer a key and is ignored" in n for n in notes)
    with pytest.raises(RecipeError) as err:
        _load(PPORecipe, PPO, "generation.top_k=10", "ppo.batch_size=7")  # reported together with the schema's
    rendered = [p.render() for p in err.value.problems]
    assert rendered[0].startswith("command line: generation.top_k=10: rlcli ppo samples the full distribution")
    assert any("ppo.batch_size" in r for r in rendered[1:])
    _, notes = _load(PPORecipe, PPO, "ref_model.architecture=gpt2", "ref_model.tokenizer=byte",
                     "ref_model.gradient_checkpointing=true")
    assert [n.split(" is no longer")[0] for n in notes] == ["command line: ref_model.tokenizer",
                                                           "command line: ref_model.gradient_checkpointing"]
    _, notes = _load(EnvRolloutRecipe, ROLLOUT, "logging.progress=false")
    assert notes[0].startswith("command line: logging.progress is no longer a key and is ignored: env-rollout")


def test_every_old_name_is_gone_from_the_schema():
    """An old name is not also a key of its own (it would mean two things)."""
    from rlcli.config.loader import _key_paths

    for schema in (SFTRecipe, RMRecipe, PPORecipe, EnvRolloutRecipe):
        keys = set(_key_paths(schema))
        assert not keys & set(old_names(schema.__name__)), schema.__name__
    assert set(MIGRATIONS) == {"SFTRecipe", "RMRecipe", "PPORecipe", "EnvRolloutRecipe"}


def test_a_checkpoint_saved_under_the_old_names_resumes(tmp_path):
    """--resume compares the checkpoint's recipe.yaml, written by an earlier release under the old names."""
    from rlcli.rundir import check_resume_recipe

    recipe, _ = _load(PPORecipe, CALC)
    old = recipe.model_dump(mode="json")
    old["train"]["keep_best"] = old["eval"].pop("keep_best")
    old["train"]["keep_best_mode"] = old["eval"].pop("keep_best_mode")
    old["env"]["max_new_tokens"] = old["generation"].pop("max_new_tokens")
    old["env"]["system_prompt"] = old["env"].pop("describe_tools")
    old["ppo"].update(whiten_advantages=True, score_scale=1.0, advantage_scaling="none")
    old["generation"].update(top_k=0, top_p=1.0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    check_resume_recipe(recipe, tmp_path)  # no difference
    old["env"]["max_new_tokens"] = 12
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(RecipeError, match="generation.max_new_tokens"):
        check_resume_recipe(recipe, tmp_path)


def test_the_command_line_prints_the_note_and_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlcli", "sft", str(SFT), "--dry-run", "train.eval_batch_size=10",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
                               "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "note: command line: train.eval_batch_size is now eval.batch_size" in done.stderr
    assert "batch_size: 10" in done.stdout.split("eval:")[1]
