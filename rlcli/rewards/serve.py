"""``rlcli serve-reward CONFIG``: a reward function or reward model behind the HTTP contract ``reward.url`` calls.

    rlcli serve-reward configs/serve_reward.yaml                       # http://127.0.0.1:8000/score
    rlcli serve-reward configs/serve_reward.yaml port=9000 token_env=REWARD_TOKEN

The recipe is checked like any other (``--dry-run`` stops there), the reward built once, and uvicorn serves
``POST <path>`` (token, size and contract checked; requests within ``batch_wait_ms`` scored in one call, one call at
a time; a rejected request gets 422 alone) and ``GET /health``. A served reward function must score each response
on its own. uvicorn and starlette are the optional extra ``rlcli[serve]``. In detail: docs/internals.md,
"rlcli/rewards/serve.py".
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import importlib.util
import json
import math
import socket
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcli.config.errors import Problem, RecipeError, UserError
from rlcli.rewards.remote import is_loopback, read_token, token_problem
from rlcli.rewards.sources import check_reward_source

SERVER_LIBRARIES = ("uvicorn", "starlette")


def missing_libraries() -> str | None:
    missing = [name for name in SERVER_LIBRARIES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"rlcli serve-reward needs {' and '.join(missing)} (an HTTP server), which are not installed: "
            "pip install 'rlcli[serve]'")


def check_serve(recipe) -> list[Problem]:
    """Problems with a serve-reward recipe findable without loading the reward."""
    problems = []
    missing = missing_libraries()
    if missing:
        problems.append(Problem("", missing))
    problems += check_reward_source(recipe.reward)
    if recipe.token_env is not None:
        problems += [p for p in [token_problem(recipe.token_env, "token_env")] if p is not None]
    for key in ("tls_certfile", "tls_keyfile"):
        path = getattr(recipe, key)
        if path is not None and not Path(path).is_file():
            problems.append(Problem(key, f"{path} is not a file"))
    return problems


def serve_warnings(recipe) -> list[str]:
    """Legal but risky settings: said at start, not refused."""
    if is_loopback(recipe.host):
        return []
    if recipe.token_env is None:
        return [(f"listening on {recipe.host} without a token: anyone who can reach this port can use the reward "
                 "(set token_env)")]
    if recipe.tls_certfile is None:
        return [(f"listening on {recipe.host} over plain http: the token and the texts cross the network "
                 "unencrypted (set tls_certfile and tls_keyfile)")]
    return []


# --- the contract ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRequest:
    """One request's samples (the contract's request, checked)."""

    prompts: list
    responses: list[str]
    rows: list[dict]
    answers: list[str] | None

    def __len__(self) -> int:
        return len(self.responses)


def parse_request(data: Any) -> ScoreRequest:
    """The contract's request, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object with 'prompts' and 'responses', got a JSON {type(data).__name__}")
    unknown = sorted(set(data) - {"prompts", "responses", "rows", "answers"})
    if unknown:
        raise ValueError(f"unknown keys {unknown} (the request has prompts, responses, rows, answers)")
    responses = data.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of strings")
    n = len(responses)
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != n:
        raise ValueError(f"'prompts' must be a list with one prompt per response ({n})")
    rows = data.get("rows")
    if rows is None:
        rows = [{} for _ in range(n)]
    if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"'rows' must be a list of {n} objects (one per response), or left out")
    answers = data.get("answers")
    if answers is not None and (not isinstance(answers, list) or len(answers) != n
                                or not all(isinstance(a, str) for a in answers)):
        raise ValueError(f"'answers' must be a list of {n} strings, or left out")
    return ScoreRequest(prompts, responses, rows, answers)


def score_requests(source, requests: list[ScoreRequest]) -> list[tuple[list[float], list | None]]:
    """Score several requests in one call of ``source``; each request's (scores, info)."""
    prompts = [p for r in requests for p in r.prompts]
    responses = [x for r in requests for x in r.responses]
    rows = [x for r in requests for x in r.rows]
    # a request without answers has its responses as answers (what a function reward gets outside an environment)
    answers = (None if all(r.answers is None for r in requests)
               else [a for r in requests for a in (r.answers if r.answers is not None else r.responses)])
    scores = source(prompts, responses, rows, answers=answers).tolist()
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise UserError(f"the reward gave non-finite scores to {len(bad)} of {len(scores)} responses")
    info = getattr(source, "last_info", None)
    out, at = [], 0
    for r in requests:
        out.append((scores[at : at + len(r)], None if info is None else info[at : at + len(r)]))
        at += len(r)
    return out


class Batcher:
    """Merges the requests waiting at one moment into calls of up to ``max_batch`` responses, run one at a time in
    one worker thread."""

    def __init__(self, source, max_batch: int, wait_s: float):
        self.source, self.max_batch, self.wait_s = source, max_batch, wait_s
        self.pending: collections.deque = collections.deque()
        self.worker: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rlcli-reward")

    async def score(self, request: ScoreRequest) -> tuple[list[float], list | None]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((request, future))
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            if self.wait_s and sum(len(r) for r, _ in self.pending) < self.max_batch:
                await asyncio.sleep(self.wait_s)  # let the requests sent together arrive
            batch, size = [], 0
            while self.pending and (not batch or size + len(self.pending[0][0]) <= self.max_batch):
                request, future = self.pending.popleft()
                if not future.done():  # a client that went away has its future cancelled
                    batch.append((request, future))
                    size += len(request)
            if batch:
                await self._run(batch)

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.pool, score_requests, self.source, [r for r, _ in batch])
        except Exception as exc:  # noqa: BLE001 (each request gets its own answer below)
            if len(batch) > 1:  # one bad request must not fail the others merged with it
                for item in batch:
                    await self._run([item])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


def create_app(source, recipe, token: str | None):
    """The starlette app: ``POST recipe.path`` scores, ``GET /health`` answers."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(source, recipe.max_batch_size, recipe.batch_wait_ms / 1000)
    limit = int(recipe.max_request_mb * 2**20)
    expected = f"Bearer {token}".encode() if token is not None else None

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    async def score(request: Request) -> JSONResponse:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: the token cannot be guessed byte by byte
                return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                             **{"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return error(413, f"request body over max_request_mb={recipe.max_request_mb:g} MiB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return error(413, f"request body over max_request_mb={recipe.max_request_mb:g} MiB")
        try:
            parsed = parse_request(json.loads(body))
        except ValueError as exc:  # json's errors are ValueErrors too
            return error(400, f"not a scoring request: {exc}")
        if len(parsed) > recipe.max_batch_size:
            return error(413, f"{len(parsed)} responses in one request; this service takes at most "
                              f"max_batch_size={recipe.max_batch_size} (set the client's reward.batch_size to that "
                              "or less)")
        if not len(parsed):
            return JSONResponse({"scores": []})
        try:
            scores, info = await batcher.score(parsed)
        except UserError as exc:
            return error(422, str(exc))
        except Exception as exc:  # noqa: BLE001 (the service stays up; its operator sees the traceback)
            traceback.print_exception(exc, file=sys.stderr)
            return error(500, f"the reward failed: {type(exc).__name__}: {exc}")
        return JSONResponse({"scores": scores} if info is None else {"scores": scores, "info": info})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route(recipe.path, score, methods=["POST"]), Route("/health", health, methods=["GET"])])
    app.state.batcher = batcher
    return app


# --- the server --------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a ``UserError`` naming the key to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host!r}: {exc.strerror} (an address of this machine, e.g. 127.0.0.1)",
                        key="host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port}: {exc.strerror} (choose another port, or 0 for any "
                        "free one)", key="port") from None
    return sock


def url_of(recipe, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = recipe.host if recipe.host not in ("0.0.0.0", "::") else host
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if recipe.tls_certfile else 'http'}://{shown}:{port}{recipe.path}"


def make_server(recipe, source, token: str | None):
    """A uvicorn server for ``source``, its bound socket and the scoring URL (the socket is bound here, so that
    port 0 is known before serving starts)."""
    import uvicorn

    app = create_app(source, recipe, token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                            timeout_graceful_shutdown=5, ssl_certfile=recipe.tls_certfile,
                            ssl_keyfile=recipe.tls_keyfile)
    try:
        config.load()  # reads the certificate and key now, so that a bad one is an error before anything listens
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UserError(f"cannot use {recipe.tls_certfile} / {recipe.tls_keyfile} for https: {exc}",
                        key="tls_certfile") from None
    sock = bind(recipe.host, recipe.port)
    return uvicorn.Server(config), sock, url_of(recipe, sock)


def describe(cfg) -> str:
    if cfg.function is not None:
        return f"reward function {cfg.function}"
    return f"reward model {cfg.model or cfg.adapter}" + (f" (label {cfg.label})" if cfg.label is not None else "")


def serve(config: Path, overrides: list[str], *, dry_run: bool = False) -> None:
    """``rlcli serve-reward``: steps 1-3 of the module docstring; returns when the server is stopped (Ctrl-C)."""
    from rlcli.config.loader import load_recipe_and_origin, locate, recipe_to_yaml
    from rlcli.config.serve import ServeRewardRecipe
    from rlcli.logging import console

    # step 1: the recipe
    recipe, origin = load_recipe_and_origin(ServeRewardRecipe, config, overrides)
    problems = locate(check_serve(recipe), origin)
    if problems:
        raise RecipeError(problems)
    if dry_run:
        from rich.syntax import Syntax

        console.print(Syntax(recipe_to_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
        console.print(f"[green]dry run OK[/]: {config} is valid (no reward was loaded)")
        return

    # step 2: the reward
    from rlcli.rewards.sources import build_reward

    token = read_token(recipe.token_env, "token_env") if recipe.token_env is not None else None
    source = build_reward(recipe.reward, device=recipe.device)

    # step 3: serve
    server, sock, url = make_server(recipe, source, token)
    for note in serve_warnings(recipe):
        console.print(f"warning: {note}", style="yellow")
    auth = f"; requests need the token in ${recipe.token_env}" if token is not None else ""
    # a plain line, flushed: scripts (and the tests) read the address from it
    print(f"rlcli serve-reward: serving {describe(recipe.reward)} at {url} (health: {url.rsplit(recipe.path, 1)[0]}"
          f"/health){auth}; Ctrl-C stops", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the signal it caught
        pass
    finally:
        sock.close()
    print("rlcli serve-reward: stopped", flush=True)
