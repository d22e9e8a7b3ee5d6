"""rlcli.parallel: one optimizer step under a real fp16 loss scaler (on the CPU: torch's GradScaler runs there)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from rlcli.parallel import Parallel


@pytest.fixture
def fp16_parallel(monkeypatch):
    """A single-process Parallel whose Accelerator scales losses with a real GradScaler, as under fp16 on a GPU."""
    acc = Accelerator(cpu=True)
    # Accelerate only makes a scaler for fp16 on an accelerator; the same object, given here, takes the same paths
    # (backward scales the loss, clip_grad_norm_ unscales, the wrapped optimizer steps through it)
    monkeypatch.setattr(acc, "scaler", torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000))
    monkeypatch.setattr(acc, "native_amp", True)
    monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")  # restored after the test: the state is shared
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer = acc.prepare(model, optimizer)
    return Parallel.around(acc, max_grad_norm=1.0), model, optimizer, scheduler


def test_a_non_finite_gradient_under_fp16_is_skipped_and_the_next_step_runs(fp16_parallel):
    par, model, optimizer, scheduler = fp16_parallel
    x = torch.randn(8, 4)
    par.backward(model, model(x).pow(2).mean())
    model.weight.grad[0, 0] = float("inf")  # an overflow inside the backward pass
    before = model.weight.detach().clone()
    norm = par.clip_and_step(model, optimizer, scheduler, skip_nonfinite=True)
    assert norm == float("inf")
    assert torch.equal(model.weight, before)  # not stepped
    assert scheduler.last_epoch == 0  # nor the schedule
    assert par.accelerator.scaler.get_scale() == 512.0  # the scaler saw the inf and halved its scale
    assert all(p.grad is None for p in model.parameters())

    # the next step unscales again (not "unscale_() has already been called"), clips the true
    # gradient norm (not the scaled one: 512 × larger) and steps
    loss = model(x).pow(2).mean()
    par.backward(model, loss)
    scaled = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    norm = par.clip_and_step(model, optimizer, scheduler, skip_nonfinite=True)
    assert norm == pytest.approx(scaled / 512.0, rel=1e-5)
    assert not torch.equal(model.weight, before)
    assert scheduler.last_epoch == 1


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_plain_step_clips_to_max_grad_norm_and_reports_the_norm_before(max_grad_norm):
    """The supervised loop's step (no skip_nonfinite): the update is the gradient clipped to ``max_grad_norm`` (SGD,
    lr 1: Δθ = -g·min(1, c/‖g‖)) and the norm returned is the one before clipping; without a limit nothing is clipped
    and no norm is measured."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(model, optimizer)
    par = Parallel.around(acc, max_grad_norm=max_grad_norm)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    par.backward(model, 100.0 * model(torch.randn(8, 4)).pow(2).mean())
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    assert grad.norm() > 10  # far over the limit
    norm = par.clip_and_step(model, optimizer, scheduler)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    if max_grad_norm is None:
        assert norm is None
        torch.testing.assert_close(moved, -grad)
    else:
        assert norm == pytest.approx(grad.norm().item(), rel=1e-5)
        torch.testing.assert_close(moved.norm(), torch.tensor(max_grad_norm), rtol=1e-4, atol=0)


class _DeepSpeedEngineStandIn:
    """What ``clip_and_step`` uses of a DeepSpeedEngine: ``step()`` (clips, steps, zeroes the gradients) and
    ``get_global_grad_norm()`` (the norm before clipping; None until it measured one). The real engine's methods are
    checked below when DeepSpeed is installed; the sharded tests run the real one."""

    def __init__(self, norm):
        self.norm, self.steps, self.norm_asked = norm, 0, 0

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        self.norm_asked += 1
        return self.norm


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the stand-in steps nothing
@pytest.mark.parametrize(("max_grad_norm", "engine_norm", "expected"),
                         [(1.0, torch.tensor(3.5), 3.5), (1.0, None, None), (None, torch.tensor(3.5), None)])
def test_under_deepspeed_the_engine_steps_and_its_norm_is_reported(max_grad_norm, engine_norm, expected):
    """DeepSpeed clips and steps inside ``engine.step()``; rlcli reads the norm it measured (a tensor, or None before
    it measured one) only when clipping is on, and advances the schedule once."""
    par = Parallel.around(Accelerator(cpu=True), max_grad_norm=max_grad_norm)
    par.engine = "deepspeed"
    engine = _DeepSpeedEngineStandIn(engine_norm)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    norm = par.clip_and_step(engine, optimizer, scheduler)
    assert norm == expected and (norm is None or isinstance(norm, float))
    assert engine.steps == 1 and scheduler.last_epoch == 1
    assert engine.norm_asked == (max_grad_norm is not None)


@pytest.mark.sharded  # the second CI step, where DeepSpeed is installed
def test_the_deepspeed_stand_in_matches_the_real_engine():
    deepspeed = pytest.importorskip("deepspeed")
    for name in ("backward", "step", "get_global_grad_norm"):
        assert callable(getattr(deepspeed.DeepSpeedEngine, name)), name
