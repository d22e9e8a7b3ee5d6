"""What only a CUDA GPU exercises: bf16 SFT and PPO through the real CLI, the TF32 switch, gradient checkpointing's
memory saving, the LoRA reference that holds no second copy of the weights, and sampler log-probs that match the
training forward pass with CUDA kernels (float32 and bf16 autocast).

Skipped without CUDA; run them with ``pytest tests/gpu`` (or ``bash bench/gpu.sh``) on a GPU machine.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from safetensors.torch import load_file

from rlcli.config.common import ModelConfig
from rlcli.config.loader import load_recipe
from rlcli.config.ppo import PPORecipe
from rlcli.padding import left_pad
from rlcli.models.generation import sample
from rlcli.models.loading import load_model, load_tokenizer
from rlcli.models.value_head import ValueHead, ValueHeadModel, disable_dropout, load_value_head_model
from rlcli.rl import logprobs_from_logits
from rlcli.parallel import set_tf32
from rlcli.ppo.build import build_policy
from tests.helpers import REPO, mean, read_metrics, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
# A GPT-2 big enough that weights and activations dwarf the allocator's rounding and CUDA's own buffers.
MEDIUM_GPT2 = {"n_layer": 8, "n_embd": 512, "n_head": 8, "n_positions": 512}


@pytest.fixture
def restore_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# --- the CLI on the GPU -----------------------------------------------------------------------------------------


def test_sft_bf16_learns_and_saves_float32_weights(tmp_path):
    out = tmp_path / "sft"
    res = run_cli("sft", "configs/tiny/sft.yaml", f"output_dir={out}", "train.mixed_precision=bf16",
                  "train.max_steps=60", "eval.every=null", "train.save_every=null", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    first, last = mean(m["loss"] for m in metrics[:5]), mean(m["loss"] for m in metrics[-5:])
    assert last < 0.5 * first, (first, last)  # on CPU (bf16 autocast): 5.5 -> 1.3
    assert math.isfinite(metrics[-1]["eval_loss"])

    # mixed precision keeps float32 master weights: that is what gets saved
    weights = load_file(str(out / "model.safetensors"))
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).to(DEVICE)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8]], device=DEVICE)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_ppo_bf16_runs_with_sane_kl(tmp_path):
    out = tmp_path / "ppo"
    res = run_cli("ppo", "configs/tiny/ppo.yaml", f"output_dir={out}", "ppo.steps=6", "train.mixed_precision=bf16",
                  "train.save_every=null", "logging.progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    kls = [round(m["kl"], 4) for m in metrics]
    assert all(m["kl"] >= -0.1 for m in metrics), kls  # a KL estimate clearly below 0 means mismatched log-probs
    # policy == reference before the first update; both passes run under the same autocast, so only rounding is left
    assert abs(metrics[0]["kl"]) <= 0.05, kls
    for m in metrics:
        for key in ("reward_mean", "loss_policy", "loss_value", "grad_norm", "entropy"):
            assert math.isfinite(m[key]), (m["step"], key, m[key])
        assert m["skipped_minibatches"] == 0, m["step"]
    policy = load_value_head_model(out)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


# --- TF32 -------------------------------------------------------------------------------------------------------


def test_tf32_switch_changes_float32_matmuls(restore_tf32):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs an Ampere or newer GPU")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(2048, 2048, device=DEVICE, generator=g)
    b = torch.randn(2048, 2048, device=DEVICE, generator=g)
    exact = a.double() @ b.double()

    def max_error() -> float:
        return ((a @ b).double() - exact).abs().max().item()

    set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the newer API reads the same switch
    err_tf32 = max_error()
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    err_ieee = max_error()
    # TF32 keeps 10 mantissa bits of the inputs, IEEE float32 23: expect ~1000x; 10x leaves room for any kernel choice
    assert err_tf32 > 10 * err_ieee, (err_tf32, err_ieee)


# --- memory -----------------------------------------------------------------------------------------------------


def _peak_forward_backward(gradient_checkpointing: bool) -> tuple[int, int]:
    """(peak bytes above the weights over one forward + backward, weight bytes) of a GPT-2 built by rlcli."""
    cfg = ModelConfig(architecture="gpt2", config=MEDIUM_GPT2, gradient_checkpointing=gradient_checkpointing)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tok).to(DEVICE).train()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, len(tok), (8, 512), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))
    _free_cuda()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters())
    del model, loss, ids
    _free_cuda()
    return peak, weight_bytes


def test_gradient_checkpointing_lowers_peak_memory():
    plain_peak, weight_bytes = _peak_forward_backward(False)
    ckpt_peak, _ = _peak_forward_backward(True)
    # without checkpointing every layer keeps its activations (~1 GiB here) next to the gradients (one weight copy)
    assert plain_peak > 2 * weight_bytes, (plain_peak, weight_bytes)
    assert ckpt_peak < 0.8 * plain_peak, (ckpt_peak, plain_peak)


def _policy_memory(lora: bool) -> tuple[int, object, int]:
    """CUDA bytes held by build_policy's policy (+ reference), the reference, and one LM's weight bytes."""
    overrides = [f"model.config.{k}={v}" for k, v in MEDIUM_GPT2.items()] + (["lora.r=8"] if lora else [])
    recipe = load_recipe(PPORecipe, REPO / "configs/tiny/ppo.yaml", overrides)
    tokenizer = load_tokenizer(recipe.model, padding_side="left")
    _free_cuda()
    before = torch.cuda.memory_allocated()
    policy, ref = build_policy(recipe, tokenizer, "causal")
    policy.to(DEVICE)  # the trainer moves it with accelerator.prepare, and the reference with .to
    if ref is not None:
        ref.to(DEVICE)
    used = torch.cuda.memory_allocated() - before
    lm = policy.pretrained.get_base_model() if lora else policy.pretrained
    base_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "lora_" not in n)
    del policy
    return used, ref, base_bytes


def test_lora_reference_holds_no_second_copy_of_the_weights():
    used_lora, ref_lora, weights = _policy_memory(lora=True)
    _free_cuda()
    used_full, ref_full, weights_full = _policy_memory(lora=False)
    assert weights == weights_full
    assert ref_lora is None  # the reference is the policy with its adapter disabled
    assert ref_full is not None and not any(p.requires_grad for p in ref_full.parameters())
    # LoRA: one LM (+ adapters, value head: ~2%); full: the policy and its frozen copy
    assert used_lora < 1.2 * weights, (used_lora, weights)
    assert used_full > 1.9 * weights, (used_full, weights)
    del ref_full
    _free_cuda()


# --- sampler vs training forward --------------------------------------------------------------------------------


# bf16 tolerance: both passes run bf16 matmuls (8 significant bits: relative rounding 2^-8 = 0.4%), but in a different
# order (the sampler one position at a time on a KV cache, the training pass all positions at once: other kernels,
# other reductions). Each logit then differs by rounding of order 0.4% of its size, and a log-prob by at most twice
# the largest logit difference; this random-init model's logits stay within about ±2, so ~0.02 nats at worst. On CPU
# with bf16 autocast the measured difference is 0.005 max, 0.0012 mean. 0.05 / 0.01 leave ~10x room for CUDA's
# kernels and stay far below what a real mismatch gives on the same model: the wrong temperature (0.7) 0.11 mean,
# positions not taken from the mask 0.20, logits off by one position 0.31.
@pytest.mark.parametrize("precision, max_tol, mean_tol", [("float32", 1e-4, 1e-4), ("bf16", 0.05, 0.01)])
def test_sampler_logprobs_match_training_forward(precision, max_tol, mean_tol, restore_tf32):
    set_tf32(False)  # IEEE float32 matmuls: the 1e-4 claim is about float32, not TF32
    cfg = ModelConfig(architecture="gpt2", config={"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256})
    tok = load_tokenizer(cfg, padding_side="left")
    torch.manual_seed(0)
    lm = load_model(cfg, "causal", tok)
    disable_dropout(lm)
    policy = ValueHeadModel(lm, ValueHead(256)).to(DEVICE).eval()
    prompts = ["hi", "a longer prompt, left-padded less", "mid size prompt", "x", "sort: 3 1 2", "7 7 7 seven"]
    q_ids, q_mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    q_ids, q_mask = q_ids.to(DEVICE), q_mask.to(DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        out = sample(lm, q_ids, q_mask, 32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, values = policy(q_ids, q_mask, out.response_ids.to(DEVICE), out.response_mask.to(DEVICE))
    assert logits.device.type == DEVICE and values.shape == out.response_ids.shape
    mask = out.response_mask.bool()
    trained = logprobs_from_logits(logits, out.response_ids.to(DEVICE)).cpu()
    diff = (trained - out.logprobs)[mask].abs()
    assert mask.sum() > 50 and torch.isfinite(trained[mask]).all()
    assert diff.max().item() < max_tol and diff.mean().item() < mean_tol, (diff.max().item(), diff.mean().item())
