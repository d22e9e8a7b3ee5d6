"""``rlcli rm`` end to end: the Bradley–Terry loss, a tiny reward model that learns the shipped preference, reloads
and scores new text, resumes exactly, runs under accelerate with 2 processes, and refuses bad input cleanly.

Training runs go through the real entry point in a subprocess (``run_cli``). Runs that stop before training (bad
input, dry runs) or train three steps call the same Typer app in this process (``cli``): each subprocess pays
several seconds of imports, which would double this module's time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import socket
import time

import pytest
import torch

from rlcli.plugins import resolve_object
from rlcli.rewards.reward_model import RewardModelScorer
from rlcli.trainers.rm import pairwise_loss
from tests.helpers import REPO, accelerate_launch, kill_when, plain, read_metrics, run_cli, run_drift_bound
from tests.helpers import invoke_cli as cli

TINY = "configs/tiny/rm.yaml"
WORKSTATION = "configs/rm_qwen_ultrafeedback.yaml"
# a short run of the tiny recipe: the reference for resume and for 2 processes
SHORT = ["logging.progress=false", "train.max_steps=24", "train.save_every=8", "eval.every=12"]


def test_bradley_terry_loss_on_a_hand_computed_example():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # -log σ(d) = log(1 + e^-d); d = r_c - r_r = [1, -1]
    expected = torch.tensor([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))])  # [0.31326, 1.31326]
    assert torch.allclose(pairwise_loss(chosen, rejected), expected, atol=1e-6)
    assert pairwise_loss(chosen, rejected).mean().item() == pytest.approx(0.81326, abs=1e-5)
    # a margin m asks for r_c - r_r > m: d - m = [1 - 0.5, -1 - 0] -> log(1 + e^-0.5) = 0.47408
    margin = torch.tensor([0.5, 0.0])
    assert pairwise_loss(chosen, rejected, margin).tolist() == pytest.approx([0.47408, 1.31326], abs=1e-5)
    # centre penalty c·(r_c + r_r)²: 0.1 · [3², 2²] = [0.9, 0.4]
    assert pairwise_loss(chosen, rejected, center_penalty=0.1).tolist() == pytest.approx([1.21326, 1.71326], abs=1e-5)
    # a huge gap stays finite
    assert torch.isfinite(pairwise_loss(torch.tensor([-1e4]), torch.tensor([1e4]))).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    start = time.perf_counter()
    res = run_cli("rm", TINY, f"output_dir={out}", "logging.progress=false")
    assert res.returncode == 0, res.stderr
    print(f"tiny rm recipe: {time.perf_counter() - start:.1f} s")
    return out, res


def test_tiny_recipe_learns_the_preference_and_the_model_scores_new_text(trained):
    out, res = trained
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 201))
    assert {"loss", "accuracy", "lr", "epoch", "pairs_per_s", "grad_norm"} <= set(metrics[0])
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [50, 100, 150, 200]
    assert evals[-1]["eval_accuracy"] >= 0.95, evals
    assert evals[-1]["eval_margin"] > 0 and evals[-1]["eval_loss"] < 0.3 < metrics[0]["loss"]
    assert "eval_accuracy" in plain(res.stdout) and "model saved to" in plain(res.stdout)
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["count"] == 2 * 1800 and stats["std"] > 0 and stats["max_length"] == 48

    # the saved model reloads through the scoring API and prefers right answers to prompts it never saw
    scorer = RewardModelScorer.from_pretrained(str(out), batch_size=64)
    sort_pair = resolve_object(f"{REPO / 'recipes/preferences.py'}:sort_pair")
    seen = {json.loads(line)["prompt"] for line in (REPO / "data/tiny/rm.jsonl").read_text().splitlines()}
    rng = random.Random(20240601)
    fresh = [row for row in (sort_pair(rng) for _ in range(300)) if row["prompt"] not in seen][:200]
    assert len(fresh) == 200
    chosen = scorer([r["prompt"] + r["chosen"] for r in fresh])
    rejected = scorer([r["prompt"] + r["rejected"] for r in fresh])
    assert (chosen > rejected).float().mean() >= 0.9
    normalised = RewardModelScorer.from_pretrained(str(out), normalize=True, batch_size=64)
    text = [fresh[0]["prompt"] + fresh[0]["chosen"]]
    assert torch.allclose(normalised(text), (scorer(text) - stats["mean"]) / stats["std"], atol=1e-5)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "short"
    res = run_cli("rm", TINY, f"output_dir={out}", *SHORT)
    assert res.returncode == 0, res.stderr
    return out


def test_resume_after_kill_matches_uninterrupted(short_run, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step-00000008"
    kill_when(["rm", TINY, f"output_dir={out}", *SHORT], ckpt.exists)
    assert ckpt.exists()
    res = run_cli("rm", TINY, f"output_dir={out}", *SHORT, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming at step" in res.stdout
    expected, got = read_metrics(short_run), read_metrics(out)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == list(range(1, 25))
    assert [m["loss"] for m in got] == [m["loss"] for m in expected]  # bit for bit on CPU
    assert [m["accuracy"] for m in got] == [m["accuracy"] for m in expected]
    assert got[-1]["eval_accuracy"] == expected[-1]["eval_accuracy"]
    assert json.loads((out / "reward_stats.json").read_text()) == pytest.approx(
        json.loads((short_run / "reward_stats.json").read_text()), rel=1e-6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_two_processes_match_one(short_run, tmp_path):
    # `accelerate launch --multi_gpu` on a machine without GPUs: two gloo processes (the --cpu form is in the SFT
    # and PPO tests)
    out = tmp_path / "ddp"
    res = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
                            str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlcli", "rm",
                            TINY, f"output_dir={out}", *SHORT, env={"ACCELERATE_USE_CPU": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in plain(res.stdout)
    one, two = [m for m in read_metrics(short_run) if "loss" in m], [m for m in read_metrics(out) if "loss" in m]
    assert len(one) == len(two) == 24
    # 1 process × 2 micro-batches against 2 processes × 1: the same sums in another order, drifting apart step by
    # step; the Llama's widest reduction is its MLP's (intermediate_size 256), 2 layers (tests/helpers.run_drift_bound)
    for a, b in zip(one, two):
        assert abs(b["loss"] - a["loss"]) <= run_drift_bound(a["loss"], width=256, layers=2, steps=a["step"]), a["step"]
        # a pair's prediction flips only when its margin is within that drift of 0: one pair of 32 at most
        assert abs(b["accuracy"] - a["accuracy"]) <= 1 / 32 + 1e-9
    assert one[0]["loss"] - one[-1]["loss"] > 10 * run_drift_bound(1.0, width=256, layers=2, steps=24)  # it learned
    assert two[-1]["eval_accuracy"] == pytest.approx(one[-1]["eval_accuracy"], abs=0.01)
    assert (out / "model.safetensors").exists() and (out / "reward_stats.json").exists()


@pytest.mark.parametrize("recipe, fragment", [(TINY, "architecture: llama"),
                                              (WORKSTATION, "Qwen/Qwen2.5-0.5B-Instruct")])
def test_dry_run_validates_without_weights_or_network(tmp_path, monkeypatch, recipe, fragment):
    out = tmp_path / "dry"
    # the workstation recipe reports to TensorBoard, which the test environment does not install (the dry run would
    # say so: tests/trainers/test_preflight_cli.py)
    no_tracker = ["logging.report_to=[]"] if importlib.util.find_spec("tensorboard") is None else []
    code, stdout, stderr = cli("rm", recipe, f"output_dir={out}", *no_tracker, "--dry-run", monkeypatch=monkeypatch)
    assert code == 0, stderr
    text = plain(stdout)
    assert "dry run OK" in text and fragment in text and "pairs = micro-batch" in text
    assert not out.exists()


def test_lora_on_chat_pairs_with_margins_identical_and_long_texts(tmp_path, monkeypatch):
    user = [{"role": "user", "content": "sort: 3 1 2"}]
    rows = [{"chosen": user + [{"role": "assistant", "content": "1 2 3"}],
             "rejected": user + [{"role": "assistant", "content": "2 1 3" if i % 4 else "1 2 3"}],  # 1 in 4 identical
             "gap": 0.5 * (i % 3)} for i in range(32)]
    rows[5]["chosen"] = user + [{"role": "assistant", "content": "1 2 3 " + "and some rambling " * 10}]  # too long
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lora"
    code, stdout, stderr = cli("rm", TINY, f"output_dir={out}", f"data.path={data}", "data.margin_field=gap",
                               "data.eval_fraction=0", "lora.r=4", "train.max_steps=3", "train.batch_size=8",
                               "train.micro_batch_size=4", "train.save_every=null", "eval.every=null",
                               "logging.progress=false", monkeypatch=monkeypatch)
    assert code == 0, stderr
    text = plain(stdout)
    assert "8 of 32 pairs" in text and "identical" in text and "dropped" in text
    assert "1 of 32 pairs" in text and "max_length=48" in text and "its start was cut" in text
    assert "24 train pairs" in text
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "reward_stats.json").exists()
    scorer = RewardModelScorer.from_pretrained(str(out))  # a LoRA reward model loads the same way
    assert scorer(["<|user|>\nsort: 3 1 2\n<|assistant|>\n1 2 3"]).shape == (1,)


# --- bad input: clear message, non-zero exit, no traceback, no final model -----------------------------------

ROWS = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'


@pytest.mark.parametrize(
    "case, overrides, data_text, code, fragments",
    [
        ("missing field", ["data.path=DATA"], ROWS * 3 + '{"prompt": "p", "chosen": "a"}\n', 1,
         ["pairs.jsonl:4: no value for 'rejected'"]),
        ("missing column", ["data.path=DATA"], '{"prompt": "p", "chosen": "a"}\n', 1, ["needs column(s) 'rejected'"]),
        ("missing margin column", ["data.path=DATA", "data.margin_field=gap"], ROWS, 1, ["needs column(s) 'gap'"]),
        ("empty dataset", ["data.path=DATA"], "", 2, ["command line: data.path", "empty", "no rows"]),
        ("empty eval file", ["data.path=data/tiny/rm.jsonl", "data.eval_path=DATA"], "", 2,
         ["command line: data.eval_path", "empty", "no rows"]),
        ("only identical pairs", ["data.path=DATA", "data.eval_fraction=0"],
         '{"prompt": "p", "chosen": "a", "rejected": "a"}\n' * 3, 1, ["none of its 3 pairs is usable", "identical"]),
        ("same column twice", ["data.rejected_field=chosen"], None, 2, ["data", "different columns"]),
        ("unknown architecture", ["model.architecture=gtp2"], None, 2, ["unknown architecture 'gtp2'"]),
        ("batch does not divide", ["train.batch_size=30", "train.micro_batch_size=16"], None, 2,
         ["batch_size=30", "micro_batch_size", "divisor of 30"]),
    ],
)
def test_bad_input(tmp_path, monkeypatch, case, overrides, data_text, code, fragments):
    data = tmp_path / "pairs.jsonl"
    if data_text is not None:
        data.write_text(data_text)
    out = tmp_path / "out"
    got, stdout, stderr = cli("rm", TINY, f"output_dir={out}", *[o.replace("DATA", str(data)) for o in overrides],
                              monkeypatch=monkeypatch)
    err = plain(stderr)
    assert got == code, (case, got, stderr[-2000:])
    for fragment in fragments:
        assert fragment in err, (case, fragment, err)
    assert "Traceback" not in stderr + stdout
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()

