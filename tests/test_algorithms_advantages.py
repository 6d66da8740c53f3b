"""GRPO / Dr.GRPO / RLOO advantages (docs/algorithms.md §0, §7.2): hand-computed cases and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import ADVANTAGES, AdvantageInputs, AdvantageOutput, GRPOParams, group_stats

# Interleaved, arbitrary group ids: group 7 = [1, 0, 0, 1], group 3 = [1, 1, 1], group -5 = [0.7].
GROUP_IDS = torch.tensor([7, 3, 7, -5, 7, 3, 3, 7])
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.7, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
LENGTHS = torch.tensor([1, 2, 3, 2, 3, 1, 3, 2])
T = 3
MASK = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(torch.float64)  # [8, 3]


def _adv(name: str, **kwargs: float) -> torch.Tensor:
    inp = AdvantageInputs(rewards_B=REWARDS, group_ids_B=GROUP_IDS, response_mask_BT=MASK)
    out = ADVANTAGES.get(name).fn(inp, ADVANTAGES.build_params(name, kwargs))
    return AdvantageOutput.of(out).advantages_BT


def _expect(per_response: list[float]) -> torch.Tensor:
    return torch.tensor(per_response, dtype=torch.float64)[:, None] * MASK


def test_grpo_worked_example() -> None:
    # group 7: mean 0.5, deviations ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #   A = ±0.5 / (0.5773503 + 1e-6) = ±0.8660239
    # group 3: all rewards equal -> R - mean = 0 -> A = 0
    # group -5 (size 1): mean := 0, std := 1 -> A = 0.7 / (1 + 1e-6) = 0.6999993
    a = 0.8660239037870368
    s = 0.6999993000007
    expected = _expect([a, 0.0, -a, s, -a, 0.0, 0.0, a])
    got = _adv("grpo")
    assert got.shape == (8, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert math.isclose(got[0, 0].item(), 0.866024, abs_tol=1e-5)
    # padding is exactly zero
    assert (got[MASK == 0] == 0).all()


def test_grpo_norm_by_std_false_equals_dr_grpo() -> None:
    torch.testing.assert_close(_adv("grpo", norm_by_std=False), _adv("dr_grpo"))


def test_dr_grpo_worked_example() -> None:
    # group 7: R - 0.5 = [0.5, -0.5, -0.5, 0.5]; group 3: 0; group -5 (size 1): mean := 0 -> 0.7
    expected = _expect([0.5, 0.0, -0.5, 0.7, -0.5, 0.0, 0.0, 0.5])
    torch.testing.assert_close(_adv("dr_grpo"), expected, atol=1e-5, rtol=0)


def test_rloo_worked_example() -> None:
    # group 7, R=1: 1 - mean(0, 0, 1) = 1 - 1/3 = 0.666667; R=0: 0 - mean(1, 0, 1) = -0.666667
    # group 3: 1 - mean(1, 1) = 0; group -5 (size 1): zero baseline -> A = R = 0.7
    t = 2.0 / 3.0
    expected = _expect([t, 0.0, -t, 0.7, -t, 0.0, 0.0, t])
    torch.testing.assert_close(_adv("rloo"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_no_grad_and_dtypes(name: str) -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    mask = torch.ones(3, 4)
    inp = AdvantageInputs(rewards_B=rewards, group_ids_B=torch.tensor([0, 0, 1]), response_mask_BT=mask)
    out = ADVANTAGES.get(name).fn(inp, ADVANTAGES.build_params(name, {}))
    assert not out.requires_grad and out.dtype == torch.float32 and out.shape == (3, 4)
    # integer rewards are promoted to float
    inp_int = AdvantageInputs(torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]), mask)
    out_int = ADVANTAGES.get(name).fn(inp_int, ADVANTAGES.build_params(name, {}))
    torch.testing.assert_close(out_int, out.detach())


def test_inputs_shape_validation() -> None:
    with pytest.raises(ValueError, match="group_ids_B"):
        AdvantageInputs(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError, match="response_mask_BT"):
        AdvantageInputs(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(2, 2))


def _reference(name: str, rewards: list[float], ids: list[int], eps: float = 1e-6) -> list[float]:
    """Per-response loop reference (the obvious, slow implementation)."""
    out = []
    for r, g in zip(rewards, ids, strict=True):
        members = [rewards[j] for j in range(len(ids)) if ids[j] == g]
        n = len(members)
        mean = sum(members) / n
        if name == "rloo":
            out.append(r if n == 1 else r - (sum(members) - r) / (n - 1))
            continue
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        out.append((r - mean) / (std + eps) if name == "grpo" else r - mean)
    return out


samples = st.lists(
    st.tuples(
        st.integers(min_value=-3, max_value=3),
        st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=-5.0, max_value=5.0)),
    ),
    min_size=1,
    max_size=24,
)


@settings(max_examples=150, deadline=None)
@given(samples)
def test_grpo_group_mean_zero_and_matches_loop(data: list[tuple[int, float]]) -> None:
    ids = [g for g, _ in data]
    rewards = [r for _, r in data]
    rewards_B = torch.tensor(rewards, dtype=torch.float64)
    ids_B = torch.tensor(ids)
    mask = torch.ones(len(data), 2, dtype=torch.float64)
    inp = AdvantageInputs(rewards_B, ids_B, mask)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv_B = ADVANTAGES.get(name).fn(inp, ADVANTAGES.build_params(name, {}))[:, 0]
        expected = torch.tensor(_reference(name, rewards, ids), dtype=torch.float64)
        torch.testing.assert_close(adv_B, expected, atol=1e-6, rtol=1e-6)
        # per group of size > 1 the advantages sum to ~0 (RLOO: mean_i(R_i - loo_i) = 0 too)
        stats = group_stats(adv_B, ids_B)
        multi = stats.count_G > 1
        assert torch.allclose(stats.mean_G[multi], torch.zeros_like(stats.mean_G[multi]), atol=1e-6)


def test_grpo_eps_param() -> None:
    # group [0, 2]: mean 1, unbiased std sqrt(2); eps = 0.5 -> A = ±1 / (1.4142136 + 0.5) = ±0.5224077
    inp = AdvantageInputs(
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        torch.tensor([1, 1]),
        torch.ones(2, 1, dtype=torch.float64),
    )
    got = ADVANTAGES.get("grpo").fn(inp, GRPOParams(eps=0.5))[:, 0]
    torch.testing.assert_close(
        got, torch.tensor([-0.5224077, 0.5224077], dtype=torch.float64), atol=1e-6, rtol=0
    )
