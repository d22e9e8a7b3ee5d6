import pytest
import torch

from rlcli.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

# Selected values are 1, 2, 3, 4: mean 2.5, biased var 1.25, unbiased var 5/3. The masked-out 100 / -50 / nan
# must not leak into anything.
X = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, float("nan")]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])


def test_sum_and_mean_ignore_masked_values():
    assert masked_sum(X, MASK).item() == 10.0
    assert masked_mean(X, MASK).item() == 2.5
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 3.5]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=0), torch.tensor([2.0, 3.0, 0.0]))


def test_mask_dtypes_are_interchangeable():
    for mask in (MASK, MASK.float(), MASK.bool()):
        assert masked_mean(X, mask).item() == 2.5


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(MASK)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    assert torch.equal(masked_whiten(X, empty), torch.zeros_like(X))
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert masked_var(X, one).item() == 0.0


def test_var_by_hand():
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(1.25))
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor(5.0 / 3.0))


def test_whiten_by_hand():
    # (x - 2.5) / sqrt(5/3): 1.5 / 1.2909944 = 1.1618950, 0.5 / 1.2909944 = 0.3872983
    expected = torch.tensor([[-1.1618950, -0.3872983, 0.0], [0.3872983, 1.1618950, 0.0]])
    torch.testing.assert_close(masked_whiten(X, MASK), expected)


def test_whiten_has_mean_zero_std_one_over_mask_and_zero_elsewhere():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 3 + 5
    mask = (torch.rand(4, 7, generator=g) > 0.3).long()
    out = masked_whiten(x, mask)
    selected = out[mask.bool()]
    torch.testing.assert_close(selected.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(selected.std(), torch.tensor(1.0))
    assert torch.all(out[~mask.bool()] == 0)
    x_changed = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(masked_whiten(x_changed, mask), out)
    # no floor unless asked for: values of spread 0.03 are scaled up (by ~33) to std 1 too
    torch.testing.assert_close(masked_whiten(x * 0.01, mask)[mask.bool()].std(), torch.tensor(1.0), rtol=1e-4, atol=0)


def test_restore_mean_scales_without_recentring():
    expected = torch.tensor([[1.3381050, 2.1127017, 0.0], [2.8872983, 3.6618950, 0.0]])
    out = masked_whiten(X, MASK, restore_mean=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(masked_mean(out, MASK), torch.tensor(2.5))
    torch.testing.assert_close(masked_var(out, MASK), torch.tensor(1.0))


@pytest.mark.parametrize("reduce", [None, lambda t: t], ids=["one process", "sum over one process"])
def test_whitening_a_constant_or_a_single_value_gives_zero_not_nan(reduce):
    # variance 0: (x - mean) = 0 is multiplied by rsqrt(0 + eps), finite only because eps > 0
    x, mask = torch.full((2, 3), 4.0), torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(masked_whiten(x, mask, sum_over_processes=reduce), torch.zeros(2, 3))
    # one selected value: the unbiased variance divides by max(n - 1, 1), not by 0
    one = torch.tensor([[3.0, 9.0]])
    torch.testing.assert_close(masked_whiten(one, torch.tensor([[1, 0]]), sum_over_processes=reduce),
                               torch.zeros(1, 2))


@pytest.mark.parametrize("reduce", [None, lambda t: t], ids=["one process", "sum over one process"])
def test_whitening_floor_caps_the_scale_of_near_constant_values(reduce):
    # selected 1.000, 1.002, 1.004, 1.006: mean 1.003, unbiased std sqrt(2e-6 * 10/3 ... ) = 0.0025820: below the floor
    # 0.01, so the deviations are divided by 0.01, not by their own std (which would make them ±1.16 / ±0.39)
    x = torch.tensor([[1.000, 1.002, 7.0], [1.004, 1.006, 7.0]], dtype=torch.float64)
    out = masked_whiten(x, MASK, sum_over_processes=reduce, min_std=0.01)
    torch.testing.assert_close(out, torch.tensor([[-0.3, -0.1, 0.0], [0.1, 0.3, 0.0]], dtype=torch.float64))
    # a spread above the floor is whitened as without it (the same numbers as test_whiten_by_hand)
    torch.testing.assert_close(masked_whiten(X, MASK, sum_over_processes=reduce, min_std=0.01),
                               masked_whiten(X, MASK, sum_over_processes=reduce))
    # with restore_mean the floor scales the deviations alike and adds the mean back
    kept = masked_whiten(x, MASK, restore_mean=True, sum_over_processes=reduce, min_std=0.01)
    torch.testing.assert_close(kept[MASK.bool()], torch.tensor([0.703, 0.903, 1.103, 1.303], dtype=torch.float64))
