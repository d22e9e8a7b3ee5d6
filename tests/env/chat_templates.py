"""Chat templates with different tool conventions, for the chat-protocol contract tests, and tiny tokenizers that
carry them (the byte tokenizer plus each template's special tokens)."""

from __future__ import annotations

from rlcli.models.tokenizer import build_byte_tokenizer

# Hermes / Qwen 2.5 style: tools listed in the system turn, calls as <tool_call> JSON after the content, consecutive
# tool results grouped into one user turn inside <tool_response> tags.
HERMES = """
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
HERMES_SPECIALS = ["<|im_start|>", "<|im_end|>"]

# Llama 3.1 style: BOS, header tokens, tools in the system turn as indented JSON, a call is the whole assistant turn
# as {"name", "parameters"} JSON, results come back under an "ipython" header; <|eot_id|> ends every turn with
# nothing after it. (Unlike Meta's own template, contents are not trimmed, so episodes round-trip.)
LLAMA3 = """
{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set rest = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- system }}
{%- if tools %}
{{- '\\nRespond with JSON {"name": function name, "parameters": arguments} to call one of these functions:\\n\\n' }}
{%- for t in tools %}{{- (t | tojson(indent=4)) + '\\n\\n' }}{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for message in rest %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- set call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + call.name + '", "parameters": ' + (call.arguments | tojson) + '}<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML that trims what it renders (as Meta's Llama 3 template does): episodes whose text has edge whitespace
# cannot round-trip.
TRIMMING = """
{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + (message.content | trim) + '<|im_end|>\\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# ChatML that drops the reasoning of earlier assistant turns (as DeepSeek-R1's template does).
DROPS_REASONING = """
{%- for message in messages %}
{%- set content = message.content %}
{%- if message.role == 'assistant' and not loop.last and '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# ChatML that passes the probe but rewrites one earlier assistant turn once a tool result follows it: only the
# check at the end of a real episode can see it.
SNEAKY = """
{%- for message in messages %}
{%- set content = message.content %}
{%- if message.role == 'assistant' and not loop.last and 'rewrite me' in content %}{%- set content = content | upper %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def byte_tokenizer_with(template: str, specials: list[str], bos: str | None = None):
    """The byte tokenizer with ``specials`` added as special tokens and ``template`` as its chat template."""
    tok = build_byte_tokenizer()
    tok.add_tokens(specials, special_tokens=True)
    if bos is not None:
        tok.bos_token = bos
    tok.chat_template = template
    return tok


def hermes_tokenizer():
    return byte_tokenizer_with(HERMES, HERMES_SPECIALS)


def llama3_tokenizer():
    return byte_tokenizer_with(LLAMA3, LLAMA3_SPECIALS, bos="<|begin_of_text|>")
