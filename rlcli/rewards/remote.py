"""Rewards from an HTTP service (``reward.url``): the client side of the contract ``rlcli serve-reward`` serves.

    POST <reward.url>   Content-Type: application/json   [Authorization: Bearer <token from $reward.token_env>]
    {"prompts": [...], "responses": ["...", ...], "rows": [{...}, ...], "answers": ["...", ...]}   # answers: env only
    -> 200 {"scores": [0.5, ...], "info": [{...}, ...]}                  # one score per response; info optional

1. the batch is cut into requests of ``reward.batch_size`` responses; at most ``reward.max_concurrency`` are in
   flight at once;
2. each request has ``reward.timeout_s`` to connect, be answered and read; a connection error, a timeout or an
   HTTP 5xx / 429 answer is retried ``reward.retries`` times after a backoff (``reward.retry_backoff_s``, doubled
   each time, ±25 % jitter from a generator of its own: the run's random streams are untouched, so a run scored over
   HTTP samples exactly what it would in-process);
3. the answer is checked (JSON, one finite number per response, ``info`` one object per response when given);
   anything else, or a request that still fails, stops the run with one ``UserError`` naming the service.

Why the standard library (``urllib`` and a few threads) and not httpx / aiohttp: every install can score over HTTP
(no extra to forget), the request is one JSON POST, and the rollout loop is synchronous: an async client would
need an event loop of its own for nothing. The worker threads are daemons and every wait has a deadline, so a
service that stops answering can never hold the run (or its exit) forever.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import queue
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from rlcli.config.errors import Problem, UserError
from rlcli.launch import is_main_process

MAX_ANSWER_BYTES = 64 * 2**20  # an answer of scores this large is not one
KEY = "reward.url"


def service_name(url: str) -> str:
    """The service as errors name it: scheme, host, port and path (no query string, which may hold secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def token_problem(variable: str, key: str) -> Problem | None:
    """What is wrong with the token in ``$variable`` (unset, empty, not one header-safe word), never showing it."""
    token = os.environ.get(variable, "").strip()
    if not token:
        state = "is empty" if variable in os.environ else "is not set"
        return Problem(key, f"the environment variable {variable} {state}: export the token in it (or remove {key})")
    if not all(33 <= ord(c) < 127 for c in token):
        return Problem(key, f"the token in the environment variable {variable} holds spaces, control or non-ASCII "
                            "characters: a bearer token is one word of printable ASCII")
    return None


def read_token(variable: str, key: str) -> str:
    """The token in ``$variable`` (surrounding whitespace dropped), or a ``UserError`` naming ``key``."""
    problem = token_problem(variable, key)
    if problem is not None:
        raise UserError(problem.message, key=key)
    return os.environ[variable].strip()


def check_reward_url(cfg) -> list[Problem]:
    """Problems with a ``reward.url`` section findable without calling the service: the token's variable holds a
    token, the CA file exists."""
    problems = []
    if cfg.token_env is not None:
        problems += [p for p in [token_problem(cfg.token_env, "reward.token_env")] if p is not None]
    if cfg.ca_file is not None and not os.path.isfile(cfg.ca_file):
        problems.append(Problem("reward.ca_file", f"{cfg.ca_file} is not a file (a PEM file of CA certificates)"))
    return problems


def service_warnings(cfg) -> list[str]:
    """Legal but risky settings: said, not refused."""
    host = urlsplit(cfg.url).hostname
    notes = []
    if cfg.url.startswith("http://") and cfg.token_env is not None and not is_loopback(host):
        notes.append(f"reward.url sends the token in reward.token_env unencrypted to {host} (http://, not https://)")
    if cfg.url.startswith("https://") and not cfg.verify_tls:
        notes.append("reward.verify_tls is false: the service's certificate is not checked")
    return notes


class _Retry(Exception):
    """A failure worth another try (connection, timeout, 5xx / 429)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # a redirect would re-send the token to wherever it points (and urllib turns a redirected POST into a GET)
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise UserError(f"{service_name(req.full_url)} answered HTTP {code} redirecting to {service_name(newurl)}: "
                        "set reward.url to the address that answers (redirects are not followed)", key=KEY)


@dataclass(frozen=True)
class Answer:
    scores: list[float]
    info: list[dict | None] | None


class HTTPReward:
    """A reward source that scores over HTTP: ``source(prompts, responses, rows, answers=...)`` -> Tensor [N]
    float32. After each call ``last_info`` holds the service's per-response ``info`` (None when it sent none)."""

    def __init__(self, cfg, *, announce: bool = True):
        problems = check_reward_url(cfg)
        if problems:
            raise UserError(problems[0].message, key=problems[0].key)
        self.url, self.name = cfg.url, service_name(cfg.url)
        self.batch_size, self.max_concurrency = cfg.batch_size, cfg.max_concurrency
        self.timeout_s, self.retries, self.backoff_s = cfg.timeout_s, cfg.retries, cfg.retry_backoff_s
        self.token_env = cfg.token_env
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rlcli"}
        if cfg.token_env is not None:
            self._headers["Authorization"] = f"Bearer {read_token(cfg.token_env, 'reward.token_env')}"
        handlers: list[Any] = [_NoRedirect()]
        if is_loopback(urlsplit(cfg.url).hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # an http_proxy set for the internet is not for loopback
        if cfg.url.startswith("https://"):
            context = ssl.create_default_context(cafile=cfg.ca_file)
            if not cfg.verify_tls:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._jitter = random.Random()  # its own: the run's random streams must not see how often a request failed
        self.last_info: list[dict | None] | None = None
        if announce and is_main_process():
            from rlcli.logging import console

            for note in service_warnings(cfg):
                console.print(f"warning: {note}", style="yellow")

    def __repr__(self) -> str:  # never the headers: they hold the token
        return f"HTTPReward({self.name!r})"

    def __call__(self, prompts: list, responses: list[str], rows: list[dict[str, Any]],
                 answers: list[str] | None = None, histories: list | None = None) -> torch.Tensor:
        n = len(responses)
        spans = [(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        bodies = [encode_request(prompts[a:b], responses[a:b], rows[a:b], None if answers is None else answers[a:b])
                  for a, b in spans]
        calls = [lambda body=body, span=span: self._post(body, span) for body, span in zip(bodies, spans)]
        answered = run_bounded(calls, workers=self.max_concurrency, limit_s=self._time_limit(len(spans)), name=self.name)
        scores = [s for a in answered for s in a.scores]
        info = [i for a, (lo, hi) in zip(answered, spans) for i in (a.info or [None] * (hi - lo))]
        self.last_info = info if any(i is not None for i in info) else None
        return torch.tensor(scores, dtype=torch.float32)

    def _time_limit(self, requests: int) -> float:
        """The longest a call may take when every request uses all its tries: a last guard, never reached unless a
        service trickles its answer out byte by byte."""
        waves = math.ceil(requests / self.max_concurrency)
        one = (self.retries + 1) * 2 * self.timeout_s + sum(1.25 * self.backoff_s * 2**i for i in range(self.retries))
        return waves * one + 10.0

    def _post(self, body: bytes, span: tuple[int, int]) -> Answer:
        what = f"responses {span[0]}-{span[1] - 1}"
        started, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1) * self._jitter.uniform(0.75, 1.25)
                if is_main_process():
                    from rlcli.logging import console

                    console.print(f"reward service {self.name}: {last}; retry {attempt} of {self.retries} in "
                                  f"{wait:.2g} s", style="yellow")
                time.sleep(wait)
            try:
                return self._attempt(body, span[1] - span[0], what)
            except _Retry as exc:
                last = str(exc)
        seconds = time.monotonic() - started
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''} in {seconds:.0f} s"
        raise UserError(f"the reward service {self.name} failed for {what} of a batch: {last} ({tries}; "
                        f"reward.retries={self.retries}, reward.timeout_s={self.timeout_s:g}). Check that the service "
                        "is running and reachable (rlcli serve-reward serves one), then run again: a PPO run continues "
                        "from its last checkpoint with --resume", key=KEY)

    def _attempt(self, body: bytes, n: int, what: str) -> Answer:
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = _read(response, deadline, self.timeout_s, self.name)
        except urllib.error.HTTPError as exc:
            raise self._refused(exc, what) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise UserError(f"the reward service {self.name}: its TLS certificate failed the check "
                                f"({reason.verify_message}): give its CA in reward.ca_file", key=KEY) from None
            raise _Retry(_describe(reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a garbled status line
            raise _Retry(_describe(exc)) from None
        return parse_answer(raw, n, name=self.name, what=what)

    def _refused(self, exc: urllib.error.HTTPError, what: str) -> Exception:
        try:
            detail = _excerpt(exc.read(4096))  # the service's own words (serve-reward: {"error": ...})
        except (OSError, http.client.HTTPException, ValueError):
            detail = ""
        status = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
        if exc.code >= 500 or exc.code == 429:
            return _Retry(status)
        if exc.code in (401, 403):
            sent = f"the token in ${self.token_env}" if self.token_env else "no token (reward.token_env is not set)"
            return UserError(f"the reward service {self.name} refused the request ({status}): rlcli sent {sent}; "
                             "set reward.token_env to the variable holding the token the service expects", key=KEY)
        return UserError(f"the reward service {self.name} refused {what} of a batch ({status})", key=KEY)


def _read(response, deadline: float, timeout_s: float, name: str) -> bytes:
    """The whole body, within the request's deadline (each socket read is bounded by the timeout too)."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _Retry(f"no complete answer within reward.timeout_s={timeout_s:g} s")
        chunk = response.read1(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise UserError(f"the reward service {name} answered with more than "
                            f"{MAX_ANSWER_BYTES >> 20} MiB: not an answer of scores", key=KEY)
        chunks.append(chunk)


def _describe(reason: Any) -> str:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    text = str(reason) or type(reason).__name__
    return text if isinstance(reason, str) else f"{type(reason).__name__}: {text}"


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _jsonable(value: Any) -> Any:
    """What JSON cannot hold in a dataset row (dates, bytes, numpy scalars), as the closest thing it can."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def encode_request(prompts: list, responses: list[str], rows: list[dict], answers: list[str] | None) -> bytes:
    """One request's JSON body (the contract's request)."""
    payload: dict[str, Any] = {"prompts": list(prompts), "responses": list(responses), "rows": list(rows)}
    if answers is not None:
        payload["answers"] = list(answers)
    return json.dumps(payload, default=_jsonable, ensure_ascii=False).encode("utf-8")


def parse_answer(raw: bytes, n: int, *, name: str, what: str = "a request") -> Answer:
    """Check an answer against the contract: ``{"scores": [n finite numbers], "info": [n objects or null]}``."""
    where = f"the reward service {name} answered {what}"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{where} with something that is not JSON: {_excerpt(raw, 120)!r}", key=KEY) from None
    if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise UserError(f"{where} with {got}; expected an object {{\"scores\": [one number per response]}}", key=KEY)
    scores = data["scores"]
    if len(scores) != n:
        raise UserError(f"{where} with {len(scores)} scores for {n} responses", key=KEY)
    bad = [i for i, s in enumerate(scores)
           if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)]
    if bad:
        raise UserError(f"{where} with scores that are not finite numbers at {len(bad)} of {n} responses (first: "
                        f"{scores[bad[0]]!r} at response {bad[0]})", key=KEY)
    info = data.get("info")
    if info is not None and (not isinstance(info, list) or len(info) != n
                             or any(i is not None and not isinstance(i, dict) for i in info)):
        raise UserError(f"{where} with an 'info' that is not a list of {n} objects (or nulls), one per response",
                        key=KEY)
    return Answer([float(s) for s in scores], info)


def run_bounded(calls: list, *, workers: int, limit_s: float, name: str) -> list:
    """``[call() for call in calls]``, at most ``workers`` at once, in daemon threads; the first exception is raised
    (the calls not started yet are dropped). Past ``limit_s`` seconds it gives up with a ``UserError``: a daemon
    thread left waiting on a dead socket cannot keep the process from exiting, as a ThreadPoolExecutor's would."""
    if not calls:
        return []
    results: list = [None] * len(calls)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(calls)):
        todo.put(i)
    finished, failed = threading.Event(), []
    lock, remaining = threading.Lock(), [len(calls)]

    def work() -> None:
        while not failed:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = calls[i]()
            except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
                failed.append(exc)
                finished.set()
                return
            with lock:
                remaining[0] -= 1
                if not remaining[0]:
                    finished.set()

    for _ in range(min(workers, len(calls))):
        threading.Thread(target=work, daemon=True, name="rlcli-reward-http").start()
    if not finished.wait(limit_s):
        raise UserError(f"the reward service {name} did not finish a batch within {limit_s:.0f} s (every request's "
                        "retries included): it answers too slowly", key=KEY)
    if failed:
        raise failed[0]
    return results
