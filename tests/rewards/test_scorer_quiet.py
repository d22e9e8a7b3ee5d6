"""``RewardModelScorer.from_pretrained`` loads without drawing transformers' weight-loading progress bar."""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from rlcli.config.common import ModelConfig
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.rewards.reward_model import RewardModelScorer
from tests.helpers import TINY_GPT2


def test_from_pretrained_draws_no_progress_bar(tmp_path, capfd):
    cfg = ModelConfig(**TINY_GPT2)
    tokenizer = load_tokenizer(cfg)
    load_model(cfg, "classifier", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    scorer = RewardModelScorer.from_pretrained(str(tmp_path))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out and "it/s" not in captured.err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is left as it was
    assert scorer(["a text"]).shape == (1,)
