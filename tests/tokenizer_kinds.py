"""Tokenizers of the kinds users bring, saved to disk for tiny models built from scratch (``model.tokenizer: DIR``).

- ``own_pad``: rlcli's byte tokenizer as is: PAD, EOS and BOS are three distinct ids.
- ``pad_eos``: no pad token of its own (GPT-2, Llama, Qwen base), so rlcli pads with EOS; BOS kept.
- ``no_bos``: PAD = EOS and no BOS at all (GPT-2 style BPE saved by another program).
- ``chat_eot``: a ChatML template whose end of turn ``<|im_end|>`` is a special token that is not EOS (SmolLM2,
  Qwen instruct); PAD = EOS.
"""

from __future__ import annotations

from pathlib import Path

from rlcli.models.tokenizer import build_byte_tokenizer

KINDS = ("own_pad", "pad_eos", "no_bos", "chat_eot")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tokenizer(kind: str, directory: Path) -> Path:
    """Write a tokenizer of ``kind`` (see the module docstring) into ``directory`` and return it."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; one of {KINDS}")
    tok = build_byte_tokenizer()
    if kind != "own_pad":
        tok.pad_token = None
    if kind in ("no_bos", "chat_eot"):
        tok.bos_token = None
    if kind == "chat_eot":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return directory
