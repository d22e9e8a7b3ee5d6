"""Fixtures for the text-environment tests: the byte tokenizer, a tiny random GPT-2 and a scripted policy
(``tests.helpers.ScriptedLM``)."""

from __future__ import annotations

import pytest

from rlcli.models.tokenizer import build_byte_tokenizer
from tests.helpers import ScriptedLM, tiny_gpt2


@pytest.fixture(scope="session")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def model(tok):
    return tiny_gpt2(tok)


@pytest.fixture
def scripted(tok):
    """``scripted(plans)`` -> a ScriptedLM over a fresh tiny GPT-2."""
    return lambda plans: ScriptedLM(tiny_gpt2(tok), tok, plans).eval()
