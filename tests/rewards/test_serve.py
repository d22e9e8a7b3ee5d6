"""``rlcli serve-reward`` (rlcli/rewards/serve.py), served from a thread of the test on loopback and called with
rlcli's own client: it scores like the reward in-process (a function, a reward model), merges concurrent requests,
checks the token, the limits and the requests, fails one bad request alone, serves https; its recipe's problems
name their keys."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
import torch

from rlcli.config.errors import UserError
from rlcli.config.reward import RewardConfig
from rlcli.config.serve import ServeRewardRecipe
from rlcli.rewards.remote import HTTPReward
from rlcli.rewards.serve import make_server
from rlcli.rewards.sources import FunctionReward, build_reward
from tests.helpers import float32_rounding_bound, invoke_cli, plain, serving

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

TOKEN = "served-token-value"
PLUGIN = '''
import os


def score(responses, rows, answers):
    """len(response) + 10 * row["k"] (+100 when the answer is "yes"); logs each call's size; "boom" raises."""
    if os.environ.get("RLCLI_TEST_CALLS"):
        with open(os.environ["RLCLI_TEST_CALLS"], "a") as f:
            f.write(f"{len(responses)}\\n")
    if any("boom" in r for r in responses):
        raise ValueError("boom is not a response")
    return [len(r) + 10 * row.get("k", 0) + (100 if a == "yes" else 0) for r, row, a in zip(responses, rows, answers)]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    path = tmp_path / "plugin.py"
    path.write_text(PLUGIN)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("RLCLI_TEST_CALLS", str(calls))
    return f"{path}:score", calls


def client(url, **keys) -> HTTPReward:
    return HTTPReward(RewardConfig(url=url, **{"retry_backoff_s": 0.01, "timeout_s": 10.0, **keys}))


def post(url, body: bytes, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_served_function_scores_as_it_does_in_process(plugin):
    spec, _ = plugin
    responses = [f"{'r' * i}" for i in range(23)]
    prompts, rows = [f"p{i}" for i in range(23)], [{"k": i % 3, "extra": [i, None]} for i in range(23)]
    answers = ["yes" if i % 4 else "no" for i in range(23)]
    local = FunctionReward(spec)
    with serving({"function": spec}, max_batch_size=16) as url:
        remote = client(url, batch_size=5, max_concurrency=3)
        assert torch.equal(remote(prompts, responses, rows), local(prompts, responses, rows))
        assert torch.equal(remote(prompts, responses, rows, answers=answers),
                           local(prompts, responses, rows, answers=answers))
        assert remote.last_info is None


def test_concurrent_requests_are_merged_up_to_max_batch_size(plugin):
    spec, calls = plugin
    with serving({"function": spec}, max_batch_size=8, batch_wait_ms=300) as url:
        scores = client(url, batch_size=2, max_concurrency=8)([""] * 16, ["ab"] * 16, [{}] * 16)
    assert scores.tolist() == [2.0] * 16
    sizes = [int(n) for n in calls.read_text().split()]
    assert sum(sizes) == 16 and max(sizes) <= 8
    assert max(sizes) > 2, sizes  # eight requests of 2, sent together, were not scored one by one


def test_a_request_the_reward_rejects_fails_alone(plugin):
    spec, calls = plugin
    results = {}
    with serving({"function": spec}, batch_wait_ms=300) as url:
        def send(name, response):
            body = json.dumps({"prompts": ["p"], "responses": [response], "rows": [{"k": 1}]}).encode()
            results[name] = post(url, body)

        threads = [threading.Thread(target=send, args=a) for a in (("bad", "boom"), ("good", "fine"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        with pytest.raises(UserError) as caught:  # what a run sees: the reason, at once (422 is not retried)
            client(url, retries=3)(["p"], ["boom"], [{}])
    assert [int(n) for n in calls.read_text().split()][:3] == [2, 1, 1]  # merged, failed, then one by one
    assert results["good"] == (200, {"scores": [14.0]})
    assert results["bad"][0] == 422 and "boom is not a response" in results["bad"][1]["error"]
    assert "HTTP 422" in str(caught.value) and "boom is not a response" in str(caught.value)


def test_token_limits_and_bad_requests(plugin, monkeypatch, capfd):
    spec, _ = plugin
    monkeypatch.setenv("RLCLI_TEST_SERVE_TOKEN", TOKEN)
    monkeypatch.setenv("RLCLI_TEST_CLIENT_TOKEN", "not-the-token")
    with serving({"function": spec}, token_env="RLCLI_TEST_SERVE_TOKEN", max_batch_size=4,
                 max_request_mb=0.001) as url:
        health = url.rsplit("/score", 1)[0] + "/health"
        with urllib.request.urlopen(health, timeout=10) as response:  # no token needed
            assert json.loads(response.read()) == {"status": "ok"}
        with pytest.raises(UserError, match="HTTP 401.*no token"):
            client(url)(["p"], ["r"], [{}])
        with pytest.raises(UserError, match=r"HTTP 401.*\$RLCLI_TEST_CLIENT_TOKEN"):
            client(url, token_env="RLCLI_TEST_CLIENT_TOKEN")(["p"], ["r"], [{}])
        monkeypatch.setenv("RLCLI_TEST_CLIENT_TOKEN", TOKEN)
        right = client(url, token_env="RLCLI_TEST_CLIENT_TOKEN", batch_size=4)
        assert right(["p"] * 6, ["r"] * 6, [{}] * 6).tolist() == [1.0] * 6
        with pytest.raises(UserError, match="HTTP 413.*max_batch_size=4.*reward.batch_size"):
            client(url, token_env="RLCLI_TEST_CLIENT_TOKEN", batch_size=5)(["p"] * 5, ["r"] * 5, [{}] * 5)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert post(url, b"[1, 2", auth)[0] == 400
        status, said = post(url, json.dumps({"prompts": ["p"], "responses": ["r"], "rowz": []}).encode(), auth)
        assert status == 400 and "unknown keys ['rowz']" in said["error"]
        status, said = post(url, json.dumps({"prompts": ["p"], "responses": ["x" * 2000]}).encode(), auth)
        assert status == 413 and "max_request_mb" in said["error"]
        assert post(url, json.dumps({"prompts": [], "responses": []}).encode(), auth) == (200, {"scores": []})
    out, err = capfd.readouterr()
    assert TOKEN not in out + err


def test_a_served_reward_model_scores_as_it_does_in_process(tmp_path):
    from rlcli.config.common import ModelConfig
    from rlcli.models.loading import load_model, load_tokenizer

    cfg = ModelConfig(architecture="gpt2", config={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64})
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    load_model(cfg, "classifier", tok, num_labels=1).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts, responses = ["say: ", "q: ", "x"] * 3, ["hello there", "2+2=4", "a longer response here"] * 3
    local_reward = build_reward(RewardConfig(model=str(tmp_path / "rm"), batch_size=4), device="cpu")
    local = local_reward(prompts, responses, [{}] * 9)
    with serving({"model": str(tmp_path / "rm"), "batch_size": 4}, device="cpu") as url:
        remote = client(url, batch_size=2)(prompts, responses, [{}] * 9)
    assert local.std() > 1e-3  # spread out: equal scores would not tell a wrong reading from a right one
    # other requests make other padded batches: equal up to float32 rounding
    assert torch.allclose(remote, local, rtol=0, atol=float32_rounding_bound(local, width=128, layers=2))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed (makes the test certificate)")
def test_https_is_verified_by_default(plugin, tmp_path):
    spec, _ = plugin
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with serving({"function": spec}, tls_certfile=str(cert), tls_keyfile=str(key)) as url:
        assert url.startswith("https://127.0.0.1:")
        with pytest.raises(UserError, match="TLS certificate failed the check.*reward.ca_file"):
            client(url, retries=3)(["p"], ["r"], [{}])  # a self-signed certificate: refused, not retried
        assert client(url, ca_file=str(cert))(["p"], ["rr"], [{}]).tolist() == [2.0]
        assert client(url, verify_tls=False)(["p"], ["rr"], [{}]).tolist() == [2.0]


def test_a_port_in_use_is_one_error_naming_the_key(plugin):
    spec, _ = plugin
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        recipe = ServeRewardRecipe(reward={"function": spec}, port=taken.getsockname()[1])
        with pytest.raises(UserError, match="port: cannot listen on 127.0.0.1 port"):
            make_server(recipe, None, None)


def test_the_recipe_names_its_bad_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("RLCLI_TEST_SERVE_TOKEN", raising=False)
    code, _, err = invoke_cli("serve-reward", "configs/serve_reward.yaml", "prot=9000", "--dry-run",
                              monkeypatch=monkeypatch)
    assert code == 2 and "prot: unknown key; did you mean 'port'?" in plain(err)
    code, _, err = invoke_cli("serve-reward", "configs/serve_reward.yaml", "reward.function=null",
                              "reward.url=http://127.0.0.1:1/score", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "reward.url: serve-reward serves a reward function or model, not another" in plain(err)
    code, _, err = invoke_cli("serve-reward", "configs/serve_reward.yaml", "token_env=RLCLI_TEST_SERVE_TOKEN",
                              "reward.function=recipes/nothing.py:f", "--dry-run", monkeypatch=monkeypatch)
    text = plain(err)
    assert code == 2 and "token_env: the environment variable RLCLI_TEST_SERVE_TOKEN is not set" in text
    assert "reward.function" in text and "Traceback" not in err
    code, out, _ = invoke_cli("serve-reward", "configs/serve_reward.yaml", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0 and "dry run OK" in out
    code, out, _ = invoke_cli("explain", "serve-reward.max_batch_size", monkeypatch=monkeypatch)
    assert code == 0 and "requests that arrive together" in plain(out)


def test_missing_server_libraries_are_said_plainly(monkeypatch):
    import importlib.util

    from rlcli.rewards import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, _, err = invoke_cli("serve-reward", "configs/serve_reward.yaml", "--dry-run", monkeypatch=monkeypatch)
    assert code == 2 and "needs uvicorn" in plain(err) and "pip install 'rlcli[serve]'" in plain(err)
    assert serve.missing_libraries() is not None
