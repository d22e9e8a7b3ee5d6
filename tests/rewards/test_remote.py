"""``reward.url`` (rlcli/rewards/remote.py) against scripted services on loopback: batching and the concurrency
limit, retries on 5xx / dropped connections, and every way a service can fail ending in one ``UserError`` that
names the service, quickly (never a hang), without the token in it."""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch

from rlcli.config.errors import RecipeError, UserError
from rlcli.config.loader import Origin, validate
from rlcli.config.reward import RewardConfig
from rlcli.rewards.remote import HTTPReward, check_reward_url, parse_answer, service_name
from tests.helpers import Service, answer, drop

TOKEN = "s3cret-token-value"


@pytest.fixture
def service():
    made = []

    def make(*script):
        made.append(Service(*script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def config(url, **keys) -> RewardConfig:
    return RewardConfig(url=url, **{"retry_backoff_s": 0.01, "timeout_s": 5.0, **keys})


def samples(n):
    responses = ["x" * (i % 7) for i in range(n)]
    return [f"p{i}" for i in range(n)], responses, [{"prompt": f"p{i}", "answer": i} for i in range(n)]


def test_batches_of_batch_size_at_most_max_concurrency_in_flight_in_order(service):
    svc = service(answer(delay=0.15))
    prompts, responses, rows = samples(10)
    reward = HTTPReward(config(svc.url, batch_size=3, max_concurrency=2))
    scores = reward(prompts, responses, rows)
    assert scores.dtype == torch.float32 and scores.tolist() == [float(len(r)) for r in responses]
    sizes = sorted(len(body["responses"]) for _, body in svc.requests)
    assert sizes == [1, 3, 3, 3]
    assert svc.peak == 2  # four requests, two at a time
    headers, body = next((h, b) for h, b in svc.requests if b["prompts"][0] == "p0")
    assert body == {"prompts": prompts[:3], "responses": responses[:3], "rows": rows[:3]}  # no answers outside an env
    assert headers["Content-Type"] == "application/json" and "Authorization" not in headers
    assert reward.last_info is None


def test_answers_and_info_travel(service):
    svc = service(answer(body={"scores": [1, 2.5], "info": [{"verdict": "ok"}, None]}))
    reward = HTTPReward(config(svc.url))
    assert reward(["a", "b"], ["r1", "r2"], [{}, {}], answers=["A1", "A2"]).tolist() == [1.0, 2.5]
    assert svc.requests[0][1]["answers"] == ["A1", "A2"]
    assert reward.last_info == [{"verdict": "ok"}, None]


def test_bearer_token_from_the_named_variable(service, monkeypatch):
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", TOKEN)
    svc = service(answer())
    reward = HTTPReward(config(svc.url, token_env="RLCLI_TEST_REWARD_TOKEN"))
    reward(["a"], ["rr"], [{}])
    assert svc.requests[0][0]["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in repr(reward)


def test_5xx_and_dropped_connections_are_retried_then_it_works(service):
    svc = service(answer(503, {"error": "warming up"}), drop, answer(502, b"bad gateway"), answer())
    reward = HTTPReward(config(svc.url, retries=3))
    assert reward(["a", "b"], ["r", "rrr"], [{}, {}]).tolist() == [1.0, 3.0]
    assert len(svc.requests) == 4


def test_the_run_random_streams_are_untouched_by_retries(service):
    svc = service(answer(503, b"{}"), answer())
    torch.manual_seed(0), random.seed(0)
    expected = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(0), random.seed(0)
    HTTPReward(config(svc.url))(["a"], ["r"], [{}])  # one retry, with its jittered backoff
    assert (torch.rand(3).tolist(), random.random()) == expected
    assert len(svc.requests) == 2


def test_a_service_that_keeps_failing_ends_in_one_error_naming_it(service):
    svc = service(answer(503, {"error": "overloaded"}))
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        HTTPReward(config(svc.url + "?key=abc", retries=2))(["a"], ["r"], [{}])
    message = str(caught.value)
    assert time.monotonic() - start < 5
    assert len(svc.requests) == 3 and "3 attempts" in message
    assert message.startswith("reward.url: the reward service " + svc.url + " failed")
    assert "HTTP 503" in message and "overloaded" in message and "--resume" in message
    assert "abc" not in message  # a query string may hold a secret: the service is named without it
    assert "\n" not in message


def test_connection_refused(service):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="connection refused"):
        HTTPReward(config(f"http://127.0.0.1:{port}/score", retries=1))(["a"], ["r"], [{}])


def test_a_slow_service_times_out_and_is_retried(service):
    svc = service(answer(delay=3.0))
    start = time.monotonic()
    with pytest.raises(UserError, match="timed out") as caught:
        HTTPReward(config(svc.url, timeout_s=0.3, retries=1))(["a"], ["r"], [{}])
    assert time.monotonic() - start < 2.5
    assert len(svc.requests) == 2 and "2 attempts" in str(caught.value)


def test_an_answer_that_trickles_in_still_has_a_deadline(service):
    def trickle(handler, request):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(100):  # a byte every 0.05 s: no single read times out
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.05)

    svc = service(trickle)
    start = time.monotonic()
    with pytest.raises(UserError, match="no complete answer within reward.timeout_s=0.4"):
        HTTPReward(config(svc.url, timeout_s=0.4, retries=0))(["a"], ["r"], [{}])
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("body, says", [
    ({"scores": [1.0]}, "with 1 scores for 2 responses"),
    (b'{"scores": [1.0, NaN]}', "not finite numbers at 1 of 2 responses (first: nan at response 1)"),
    ({"scores": [1.0, "2"]}, "not finite numbers"),
    ({"scores": [True, 1]}, "not finite numbers"),
    (b"<html>Internal error</html>", "not JSON: '<html>Internal error</html>'"),
    ([1.0, 2.0], "a JSON list; expected an object"),
    ({"score": [1, 2]}, "an object with keys ['score']"),
    ({"scores": [1, 2], "info": [{}]}, "'info' that is not a list of 2 objects"),
])
def test_malformed_answers_stop_at_once(service, body, says):
    svc = service(answer(body=body))
    with pytest.raises(UserError) as caught:
        HTTPReward(config(svc.url, retries=3))(["a", "b"], ["r", "s"], [{}, {}])
    assert says in str(caught.value) and svc.url in str(caught.value)
    assert len(svc.requests) == 1  # a wrong answer is not retried


def test_wrong_token_stops_at_once_and_never_shows_the_token(service, monkeypatch):
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", TOKEN)
    svc = service(answer(401, {"error": "missing or wrong bearer token"}))
    with pytest.raises(UserError) as caught:
        HTTPReward(config(svc.url, token_env="RLCLI_TEST_REWARD_TOKEN"))(["a"], ["r"], [{}])
    message = str(caught.value)
    assert "HTTP 401" in message and "$RLCLI_TEST_REWARD_TOKEN" in message and TOKEN not in message
    assert len(svc.requests) == 1


def test_a_redirect_is_not_followed_with_the_token(service, monkeypatch):
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", TOKEN)
    other = service(answer())

    def redirect(handler, request):
        handler.send_response(307)
        handler.send_header("Location", other.url)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    svc = service(redirect)
    with pytest.raises(UserError, match="redirects are not followed"):
        HTTPReward(config(svc.url, token_env="RLCLI_TEST_REWARD_TOKEN"))(["a"], ["r"], [{}])
    assert other.requests == []


def test_parse_answer_accepts_the_contract():
    got = parse_answer(b'{"scores": [1, -2.5e3], "info": [null, {"a": 1}]}', 2, name="s")
    assert got.scores == [1.0, -2500.0] and got.info == [None, {"a": 1}]
    assert service_name("https://h:8443/v1/score?token=x") == "https://h:8443/v1/score"


# --- the recipe keys ---------------------------------------------------------------------------------------------


def _reward_problems(reward: dict) -> list[str]:
    from rlcli.config.serve import ServeRewardRecipe

    try:
        validate(ServeRewardRecipe, {"reward": reward}, Origin("r.yaml"))
    except RecipeError as exc:
        return [p.render() for p in exc.problems]
    return []


@pytest.mark.parametrize("reward, says", [
    ({"url": "ftp://h/x"}, "reward.url: must start with http:// or https://"),
    ({"url": "http:///score"}, "reward.url: names no host"),
    ({"url": "http://user:pw@h/score"}, "must not hold credentials"),
    ({"url": "http://h/x", "function": "recipes/sevens.py:score"}, "exactly one of 'function', 'model', 'adapter'"),
    ({"function": "recipes/sevens.py:score", "token_env": "T"}, "reward.token_env: only used with reward.url"),
    ({"function": "recipes/sevens.py:score", "timeout_s": 5}, "reward.timeout_s: only used with reward.url"),
    ({"url": "http://h/x", "label": "POSITIVE"}, "reward.label: not used with reward.url"),
    ({"url": "http://h/x", "token_env": "$T"}, "the NAME of an environment variable"),
    ({"url": "http://h/x", "max_concurrency": 0}, "reward.max_concurrency"),
])
def test_recipe_keys_are_checked_naming_the_key(reward, says):
    problems = _reward_problems(reward)
    assert any(says in p for p in problems), problems
    assert all(p.startswith("r.yaml") for p in problems)


def test_a_resolved_recipe_with_every_default_is_accepted():
    # recipe.yaml holds every key at its default: reading it back must not count them as set
    resolved = RewardConfig(function="recipes/sevens.py:score").model_dump()
    assert RewardConfig(**resolved).function == "recipes/sevens.py:score"
    assert RewardConfig(**RewardConfig(url="http://h/x").model_dump()).url == "http://h/x"


def test_token_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("RLCLI_TEST_REWARD_TOKEN", raising=False)
    problems = check_reward_url(RewardConfig(url="http://h/x", token_env="RLCLI_TEST_REWARD_TOKEN"))
    assert [p.key for p in problems] == ["reward.token_env"]
    assert "RLCLI_TEST_REWARD_TOKEN is not set" in problems[0].message
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", "")
    empty = check_reward_url(RewardConfig(url="http://h/x", token_env="RLCLI_TEST_REWARD_TOKEN"))
    assert "is empty" in empty[0].message
    with pytest.raises(UserError, match="reward.token_env: the environment variable"):
        HTTPReward(RewardConfig(url="http://h/x", token_env="RLCLI_TEST_REWARD_TOKEN"))
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", "two words\n")
    bad = check_reward_url(RewardConfig(url="http://h/x", token_env="RLCLI_TEST_REWARD_TOKEN"))
    assert "holds spaces, control or non-ASCII characters" in bad[0].message and "two" not in bad[0].message
    monkeypatch.setenv("RLCLI_TEST_REWARD_TOKEN", f" {TOKEN}\n")  # surrounding whitespace (a file's newline) is dropped
    assert check_reward_url(RewardConfig(url="http://h/x", token_env="RLCLI_TEST_REWARD_TOKEN")) == []


def test_an_empty_batch_sends_nothing(service):
    svc = service(answer())
    assert HTTPReward(config(svc.url))([], [], []).shape == (0,)
    assert svc.requests == []
