"""Reading a classifier's score at the last real token, and the ``RewardModelScorer`` API that PPO uses."""

from __future__ import annotations

import warnings

import pytest
import torch

from rlcli.config.common import ModelConfig
from rlcli.config.errors import UserError
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.rewards.reward_model import (
    REWARD_STATS_FILE,
    RewardModelScorer,
    last_token_index,
    save_reward_stats,
    sequence_scores,
)
from tests.helpers import TINY_GPT2, float32_rounding_bound

CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64},
    "bert": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 64},
}
TEXTS = ["sort: 3 1 2\n1 2 3", "hi", "a somewhat longer text than the others", "x y"]


def _rounding(reference: torch.Tensor) -> float:
    """Batched vs one-by-one, padded left vs right: the same scores summed in another order (widest reduction: the
    MLPs' 64; at most 2 layers): tests/helpers.float32_rounding_bound."""
    return float32_rounding_bound(reference, width=64, layers=2)


def classifier(arch: str, *, pad_is_eos: bool = False, num_labels: int = 1):
    cfg = ModelConfig(architecture=arch, config=CONFIGS[arch])
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, "classifier", tok, num_labels=num_labels).eval()
    if pad_is_eos:  # a GPT-2 style tokenizer: no pad token of its own
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.eos_token_id
    return model, tok


def pad_batch(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_last_token_index_with_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1],
                         [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_score_is_read_at_the_last_real_token_even_when_pad_is_eos(arch):
    model, tok = classifier(arch, pad_is_eos=True)
    eos = tok.eos_token_id
    rows = [tok(t)["input_ids"] + [eos] for t in TEXTS]  # every text ends with EOS, the same id as the padding
    with torch.no_grad():
        alone = torch.cat([sequence_scores(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                           for r in rows])
        for side in ("right", "left"):
            ids, mask = pad_batch(rows, eos, side)
            assert torch.allclose(sequence_scores(model, ids, mask), alone, rtol=0, atol=_rounding(alone)), side
        # transformers' own reading takes the last token that is not the pad id: one token early here
        ids, mask = pad_batch(rows, eos, "right")
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, alone, atol=1e-3)


def test_scores_are_differentiable_for_training():
    model, tok = classifier("gpt2")
    ids, mask = pad_batch([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "right")
    sequence_scores(model, ids, mask).sum().backward()
    assert model.score.weight.grad is not None and model.transformer.wte.weight.grad.abs().sum() > 0


def test_encoder_classifiers_keep_their_own_pooling():
    model, tok = classifier("bert")
    ids, mask = pad_batch([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "right")
    with torch.no_grad():
        assert torch.equal(sequence_scores(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits)


# --- RewardModelScorer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_rm(tmp_path_factory):
    """A tiny one-output reward model saved like an ``rlcli rm`` output dir, with reward_stats.json."""
    out = tmp_path_factory.mktemp("rm")
    model, tok = classifier("gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_reward_stats(out, mean=1.5, std=2.0, count=10, max_length=16)
    return out, model, tok


def one_by_one(model, tok, texts, max_length=None):
    scores = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"][-max_length:] if max_length else tok(t)["input_ids"]
            scores.append(sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, 0])
    return torch.stack(scores)


def test_scorer_batches_without_gradients_and_matches_one_by_one(saved_rm):
    path, model, tok = saved_rm
    scorer = RewardModelScorer.from_pretrained(str(path), batch_size=3, device="cpu", max_length=64)
    scores = scorer(TEXTS)
    assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32 and not scores.requires_grad
    assert not scorer.model.training
    assert torch.allclose(scores, one_by_one(model, tok, TEXTS), rtol=0, atol=_rounding(scores))
    assert torch.allclose(RewardModelScorer.from_pretrained(str(path), batch_size=1, max_length=64)(TEXTS), scores,
                          rtol=0, atol=_rounding(scores))


def test_scorer_keeps_the_end_of_long_texts(saved_rm):
    path, model, tok = saved_rm
    scorer = RewardModelScorer.from_pretrained(str(path))
    assert scorer.max_length == 16  # the length the run trained with, from reward_stats.json
    long = "the prompt is long and gets cut; the answer at the end: 1 2 3"
    want = one_by_one(model, tok, [long], max_length=16)
    assert torch.allclose(scorer([long]), want, rtol=0, atol=_rounding(want))
    assert torch.isfinite(scorer([""])).all()  # an empty response still gets a score


def test_scorer_normalises_with_the_saved_statistics(saved_rm):
    path, _, _ = saved_rm
    raw = RewardModelScorer.from_pretrained(str(path))(TEXTS)
    normalised = RewardModelScorer.from_pretrained(str(path), normalize=True)(TEXTS)
    assert torch.allclose(normalised, (raw - 1.5) / 2.0, atol=1e-6)


def test_normalize_needs_reward_stats(saved_rm, tmp_path):
    _, model, tok = saved_rm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / REWARD_STATS_FILE).exists()
    assert RewardModelScorer.from_pretrained(str(tmp_path))(TEXTS[:1]).shape == (1,)
    with pytest.raises(UserError, match="reward_stats.json"):
        RewardModelScorer.from_pretrained(str(tmp_path), normalize=True)


def test_label_picks_an_output_by_name_or_index(tmp_path):
    model, tok = classifier("gpt2", num_labels=2)
    model.config.id2label, model.config.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with torch.no_grad():
        ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
        both = sequence_scores(model, ids, torch.ones_like(ids))[0]
    positive = RewardModelScorer.from_pretrained(str(tmp_path), label="POSITIVE")(TEXTS[:1])
    first = RewardModelScorer.from_pretrained(str(tmp_path), label=0)(TEXTS[:1])
    assert positive.item() == pytest.approx(both[1].item(), abs=1e-5)
    assert first.item() == pytest.approx(both[0].item(), abs=1e-5)
    with pytest.raises(UserError, match="NEGATIVE, POSITIVE"):
        RewardModelScorer.from_pretrained(str(tmp_path), label="happy")
    with pytest.raises(UserError, match="out of range"):
        RewardModelScorer.from_pretrained(str(tmp_path), label=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RewardModelScorer.from_pretrained(str(tmp_path))
    assert any("2 outputs" in str(w.message) for w in caught)


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not be loaded"):
        RewardModelScorer.from_pretrained(str(tmp_path / "nothing-here"))


def test_from_pretrained_draws_no_progress_bar(tmp_path, capfd):
    """``RewardModelScorer.from_pretrained`` loads without drawing transformers' weight-loading progress bar."""
    from transformers.utils import logging as hf_logging

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
