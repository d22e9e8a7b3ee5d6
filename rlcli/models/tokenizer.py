"""A byte-level tokenizer that needs no download.

Models built from scratch (tests, the offline demo, CI) use it: every UTF-8 byte is one token, plus a few
special tokens. It is a real ``PreTrainedTokenizerFast`` (a byte-level BPE with no merges), so
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it like any hub tokenizer, and chat templates,
padding sides and batch encoding behave exactly as they do for real models.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_TOKENIZER_NAME = "byte"

# PAD and EOS are distinct ids on purpose (ppo-details.md item 2): masks built from `ids != pad` keep the real EOS.
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]

# Models without a chat template of their own get this one; it is prefix-stable (rendering messages[:i] is a
# prefix of rendering messages[:i+1]), which is what lets SFT put the loss on assistant turns only.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Return the built-in byte-level tokenizer: 4 special tokens (ids 0-3) then the 256 bytes (ids 4-259)."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer
