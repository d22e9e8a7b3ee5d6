"""How recipe problems are worded: suggestions prefer the same section and known aliases, and a problem caused by a
key set on the command line says "command line", not the recipe file."""

from __future__ import annotations

import pytest

from rlcli.config import RecipeError, load_recipe
from rlcli.config.sft import SFTRecipe
from tests.helpers import REPO, plain, run_cli

TINY = REPO / "configs/tiny/sft.yaml"


def _problems(*overrides):
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, TINY, list(overrides))
    return {p.key: p for p in err.value.problems}


@pytest.mark.parametrize("key, meant", [
    ("optim.lr", "'learning_rate'"),  # was lora.r: a one-letter key is close to any short name
    ("optim.learnin_rate", "'learning_rate'"),
    ("train.bs", "'batch_size'"),
    ("data.max_seq_length", "'max_length'"),
    ("train.learning_rate", "'optim.learning_rate'"),  # the right key in another section
    ("train.lr", "'optim.learning_rate'"),
])
def test_did_you_mean(key, meant):
    problem = _problems(f"{key}=1")[key]
    assert f"did you mean {meant}?" in problem.message, problem.message


def test_unknown_key_without_a_likely_meaning_gets_no_guess():
    assert "did you mean" not in _problems("optim.momentum=0.9")["optim.momentum"].message


def test_problems_of_command_line_keys_blame_the_command_line(tmp_path):
    # the section's own check fails (batch arithmetic), because of a key set on the command line
    problem = _problems("train.batch_size=33", "train.micro_batch_size=16")["train.batch_size"]
    assert problem.source == "command line" and "batch_size=33" in problem.message
    problem = _problems("model.name_or_path=gpt2")["model"]
    assert problem.source == "command line" and "exactly one of" in problem.message
    # ... and the same problem of the file's own keys still points at its line
    path = tmp_path / "r.yaml"
    path.write_text(TINY.read_text().replace("batch_size: 32", "batch_size: 33\n  micro_batch_size: 16"))
    with pytest.raises(RecipeError) as err:
        load_recipe(SFTRecipe, path, [])
    (problem,) = err.value.problems
    line = path.read_text().splitlines().index("  batch_size: 33") + 1
    assert (problem.key, problem.source, problem.line) == ("train.batch_size", str(path), line), problem


def test_help_names_real_keys():
    res = run_cli("--help")
    text = plain(res.stdout)
    assert "optim.learning_rate=3e-4" in text and "train.learning_rate" not in text


def test_sft_of_an_encoder_decoder_is_found_by_dry_run_and_blames_the_command_line(tmp_path):
    res = run_cli("sft", str(TINY), f"output_dir={tmp_path / 'o'}", "model.architecture=t5", "--dry-run")
    err = plain(res.stderr)
    assert res.returncode == 2 and "command line: model.architecture: rlcli sft trains decoder-only" in err, err


@pytest.mark.parametrize("key, meant", [
    ("ppo.clip_ratio_high", "'clip_range_high'"),  # verl
    ("ppo.epsilon_high", "'clip_range_high'"),  # TRL's GRPOConfig
    ("ppo.clip_ratio_c", "'dual_clip'"),
    ("ppo.num_generations", "'group_size'"),
    ("ppo.entropy_coeff", "'entropy_coef'"),
    ("ppo.beta", "'kl.coef'"),
    ("kl.kl_loss_type", "'estimator'"),
])
def test_settings_copied_from_trl_or_verl_name_rlclis_key(key, meant):
    from rlcli.config.ppo import PPORecipe

    with pytest.raises(RecipeError) as err:
        load_recipe(PPORecipe, REPO / "configs/tiny/grpo.yaml", [f"{key}=1"])
    problem = {p.key: p for p in err.value.problems}[key]
    assert f"did you mean {meant}?" in problem.message, problem.message
