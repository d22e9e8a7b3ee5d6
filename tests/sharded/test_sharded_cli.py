"""Sharded training on CPU: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 with 2 gloo processes (the CPU twins of the GPU
presets), for sft, rm and ppo: the same numbers as one process (or DDP), exact resume, models that reload, LoRA.

A separate step of CI (marker ``sharded``; ~10 minutes on 2 cores): ``bash scripts/test.sh -m sharded``. DeepSpeed
is an optional extra; its cases are skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from tests.helpers import accelerate_launch, plain, read_metrics, run_cli, run_drift_bound

pytestmark = pytest.mark.sharded

ENGINES = ["cpu_fsdp2", "cpu_deepspeed_zero2", "cpu_deepspeed_zero3"]
# a hang must fail in seconds, not after torch's 30-minute collective timeout
ENV = {"RLCLI_DIST_TIMEOUT_S": "120"}
GPT2_NO_DROPOUT = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0"]
PPO_FAST = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "ppo.batch_size=32",
            "ppo.mini_batch_size=16", "optim.learning_rate=1e-3", "logging.progress=false",
            "generation.max_new_tokens=24"]


def _launch(engine: str, *args: str):
    if "deepspeed" in engine and importlib.util.find_spec("deepspeed") is None:
        pytest.skip('DeepSpeed is not installed (pip install "rlcli[deepspeed]")')
    res = accelerate_launch("--config_file", f"configs/accelerate/{engine}.yaml", "-m", "rlcli", *args, env=ENV,
                            timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _close(a: list[dict], b: list[dict], key: str, *, width: int, layers: int, steps_per_row: int = 1) -> None:
    """``key`` of every row of two runs within the drift their reduction orders allow by that row
    (tests/helpers.run_drift_bound: ``steps_per_row`` optimizer steps per logged step)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        bound = run_drift_bound(x[key], width=width, layers=layers, steps=x["step"] * steps_per_row)
        assert abs(x[key] - y[key]) <= bound, (key, x["step"], x[key], y[key], bound)


@pytest.fixture(scope="module")
def sft_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "one"
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.max_steps=12", "logging.progress=false",
                  *GPT2_NO_DROPOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_sft_matches_one_process_resumes_exactly_and_reloads(engine, sft_one, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = ["sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.max_steps=12", "train.save_every=6",
            "logging.progress=false", *GPT2_NO_DROPOUT]
    res = _launch(engine, *args)
    assert "2 processes" in plain(res.stdout)
    two, one = read_metrics(out), read_metrics(sft_one)
    # GPT-2's widest reduction is its MLP's (4 × n_embd 128), 2 layers
    _close(one, two, "loss", width=512, layers=2)
    _close(one[-1:], two[-1:], "grad_norm", width=512, layers=2)
    # the final model is an ordinary HF dir with the same weights, as far as 12 steps' drift allows
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (sft_one, out))
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= run_drift_bound(a[k], width=512, layers=2, steps=12), k
    # --resume from the step-6 checkpoint (sharded optimizer state inside it) redoes steps 7-12 exactly
    ckpt = out / "checkpoints" / "step-00000006"
    assert ckpt.is_dir()
    again = tmp_path / "again"
    shutil.copytree(out, again)
    manifest = json.loads((again / ".rlcli-run.json").read_text())  # as a run killed after step 6 leaves it
    (again / ".rlcli-run.json").write_text(json.dumps({**manifest, "state": "running"}))
    shutil.rmtree(again / "checkpoints" / "step-00000012")
    _launch(engine, *[a.replace(str(out), str(again)) for a in args], "--resume")
    assert [m["loss"] for m in read_metrics(again)] == [m["loss"] for m in two]


@pytest.fixture(scope="module")
def rm_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "one"
    res = run_cli("rm", "configs/tiny/rm.yaml", f"output_dir={out}", "train.max_steps=8", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_rm_matches_one_process(engine, rm_one, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    _launch(engine, "rm", "configs/tiny/rm.yaml", f"output_dir={out}", "train.max_steps=8", "logging.progress=false")
    _close(read_metrics(rm_one), read_metrics(out), "loss", width=256, layers=2)  # the Llama's MLP, 2 layers
    assert read_metrics(out)[-1]["eval_accuracy"] == read_metrics(rm_one)[-1]["eval_accuracy"]
    assert AutoModelForSequenceClassification.from_pretrained(out) is not None
    assert (out / "reward_stats.json").exists()


@pytest.fixture(scope="module")
def ppo_ddp(tmp_path_factory):
    """The reference for the sharded PPO runs: plain DDP with the same 2 processes (each samples its own episodes,
    so one process would sample others)."""
    out = tmp_path_factory.mktemp("ppo") / "ddp"
    res = accelerate_launch("--config_file", "configs/accelerate/cpu_ddp.yaml", "-m", "rlcli", "ppo",
                            "configs/tiny/ppo.yaml", f"output_dir={out}", "ppo.steps=6", *PPO_FAST, env=ENV,
                            timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_ppo_matches_ddp(engine, ppo_ddp, tmp_path):
    """Generation makes different numbers of forward calls per process (rows finish at different steps): it runs on
    gathered weights, so nothing hangs; the numbers are DDP's."""
    from rlcli.models.value_head import load_value_head_model

    out = tmp_path / "run"
    _launch(engine, "ppo", "configs/tiny/ppo.yaml", f"output_dir={out}", "ppo.steps=6", *PPO_FAST)
    two, ddp = read_metrics(out), read_metrics(ppo_ddp)
    assert two[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert [m["reward_mean"] for m in two] == [m["reward_mean"] for m in ddp]
    # optimizer steps per PPO step: 4 epochs × 32 / 16 minibatches; GPT-2 n_embd 64 (MLP 256), 2 layers
    _close(ddp[1:], two[1:], "kl", width=256, layers=2, steps_per_row=8)
    policy = load_value_head_model(out)
    assert policy.critic is not None and policy.critic.value_head is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_ppo_lora_reference_is_the_base(engine, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    _launch(engine, "ppo", "configs/tiny/ppo.yaml", f"output_dir={out}", "ppo.steps=3", *PPO_FAST, "lora.r=8",
            "optim.learning_rate=5e-3")
    m = read_metrics(out)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-5) and m[-1]["kl"] > 0.01
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_" in n for n, _ in model.named_parameters())
    x = torch.tensor([[5, 6, 7]])
    assert model(input_ids=x).logits.shape[-1] > 0
