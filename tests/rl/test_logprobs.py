import math

import pytest
import torch

from rlcli.rl.logprobs import entropy_from_logits, logprobs_from_logits

# softmax([0, ln 2, ln 3]) = [1/6, 2/6, 3/6]
LOGITS = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]]])


def test_logprob_by_hand():
    out = logprobs_from_logits(LOGITS, torch.tensor([[2]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5)]]))


def test_temperature_divides_logits():
    # At T=2 the unnormalised probabilities are exp(z / 2) = 1, sqrt 2, sqrt 3.
    expected = math.log(math.sqrt(3.0) / (1.0 + math.sqrt(2.0) + math.sqrt(3.0)))
    out = logprobs_from_logits(LOGITS, torch.tensor([[2]]), temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([[expected]]))


def test_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logprobs_from_logits(logits, labels, temperature), reference)


def test_bf16_logits_give_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 9, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, reference)


def test_gradient_flows_to_logits():
    logits = LOGITS.clone().requires_grad_(True)
    logprobs_from_logits(logits, torch.tensor([[2]])).sum().backward()
    # d log p_2 / d z = onehot(2) - p
    torch.testing.assert_close(logits.grad, torch.tensor([[[-1 / 6, -2 / 6, 1 - 3 / 6]]]))


def test_entropy_by_hand():
    expected = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))
    torch.testing.assert_close(entropy_from_logits(LOGITS), torch.tensor([[expected]]))
    uniform = torch.zeros(2, 3, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8.0)))


def test_entropy_temperature():
    probs = [p / (1.0 + math.sqrt(2.0) + math.sqrt(3.0)) for p in (1.0, math.sqrt(2.0), math.sqrt(3.0))]
    expected = -sum(p * math.log(p) for p in probs)
    torch.testing.assert_close(entropy_from_logits(LOGITS, temperature=2.0), torch.tensor([[expected]]))
    for banned in (-1e4, float("-inf")):  # p = 0 on the last token: no nan from 0 * log 0
        peaked = torch.tensor([[[0.0, 0.0, banned]]])
        torch.testing.assert_close(entropy_from_logits(peaked), torch.tensor([[math.log(2.0)]]))


def test_temperature_must_be_positive():
    for fn in (lambda t: logprobs_from_logits(LOGITS, torch.tensor([[0]]), temperature=t),
               lambda t: entropy_from_logits(LOGITS, temperature=t)):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fn(0.0)


def test_entropy_gradient_by_hand():
    # dH/dz_i = -p_i (log p_i + H): an entropy bonus needs it (p = [1, 2, 3] / 6)
    logits = LOGITS.clone().requires_grad_(True)
    entropy_from_logits(logits).sum().backward()
    p = torch.tensor([1 / 6, 2 / 6, 3 / 6])
    h = -(p * p.log()).sum()
    torch.testing.assert_close(logits.grad, (-p * (p.log() + h))[None, None])
