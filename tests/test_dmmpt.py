"""DMMPT (docs/algorithms.md §5.3): worked example §5.5, entropy scopes, denominator, registry, errors."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algorithms import (
    ADVANTAGES,
    AdvantageInputs,
    PolicyLossInputs,
    PPOClipParams,
    aggregate,
    ppo_clip_loss,
)
from rlkit.algorithms.dmmpt import (
    LOSS_MASKS,
    DMMPTParams,
    apply_loss_masks,
    dmmpt_loss_mask,
    entropy_gate_B,
    mask_mastered_positive,
    positive_from_advantages,
)

# §5.5: G = 2, R = [1, 0]; resp0 has 5 tokens, resp1 has 4 (padded to T = 5)
P0 = [0.995, 0.6, 0.999, 0.3, 0.992]
P1 = [0.999, 0.5, 0.995, 0.7]
ENT0_HIGH = [0.03, 0.9, 0.01, 1.2, 0.05]  # mean 0.438 >= sigma
ENT0_LOW = [0.03, 0.3, 0.01, 0.3, 0.05]  # mean 0.138 < sigma
ENT1 = [0.2, 0.5, 0.45, 0.5]  # mean 0.4125
MASK = torch.tensor([[1.0] * 5, [1.0] * 4 + [0.0]])


def _pad(row: list[float], value: float = 0.0) -> list[float]:
    return row + [value] * (5 - len(row))


def _example(ent0: list[float]) -> PolicyLossInputs:
    logp = torch.log(torch.tensor([_pad(P0, 1.0), _pad(P1, 1.0)], dtype=torch.float64))
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    adv = ADVANTAGES.get("grpo").fn(
        AdvantageInputs(rewards_B=rewards, group_ids_B=torch.tensor([0, 0]), response_mask_BT=MASK.double()),
        ADVANTAGES.build_params("grpo", {}),
    )
    return PolicyLossInputs(
        logprobs_BT=logp.clone(), old_logprobs_BT=logp.clone(),  # ratio = 1 (POIS)
        advantages_BT=adv, response_mask_BT=MASK.double(),
        entropy_BT=torch.tensor([_pad(ent0), _pad(ENT1)], dtype=torch.float64),
    )


def test_worked_example_masks() -> None:
    p = DMMPTParams(tau=0.99, sigma=0.2)
    positive = torch.tensor([True, False])
    for ent0, want0 in ((ENT0_HIGH, [0.0] * 5), (ENT0_LOW, [1.0, 0.0, 1.0, 0.0, 1.0])):
        inp = _example(ent0)
        m = mask_mastered_positive(inp.old_logprobs_BT, inp.entropy_BT, positive, inp.response_mask_BT, p)
        assert m[0].tolist() == want0
        assert m[1].tolist() == [0.0] * 5  # negative sample (r = 0): never masked, p = 0.999 or not
    assert sum(ENT0_HIGH) / 5 == pytest.approx(0.438) and sum(ENT0_LOW) / 5 == pytest.approx(0.138)
    assert sum(ENT1) / 4 == pytest.approx(0.4125)


def test_worked_example_loss() -> None:
    """Masked case: [2 * (-0.7071) + 4 * (+0.7071)] / 9 = 0.157135 (masked tokens in the denominator)."""
    inp = _example(ENT0_LOW)
    A = inp.advantages_BT[0, 0].item()
    assert A == pytest.approx(0.7071, abs=1e-4) and inp.advantages_BT[1, 0].item() == pytest.approx(-A)
    loss_BT, _ = ppo_clip_loss(inp, PPOClipParams(clip_low=0.2, clip_high=0.28))
    keep_BT, metrics = dmmpt_loss_mask(inp, DMMPTParams())
    loss = aggregate(loss_BT * keep_BT, inp.response_mask_BT, "token-mean")
    assert loss.item() == pytest.approx(0.157135, abs=1e-5)
    assert loss.item() == pytest.approx(2 * A / 9, abs=1e-9)
    assert metrics["dmmpt/masked_frac"].item() == pytest.approx(3 / 9)
    assert metrics["dmmpt/mpt_frac"].item() == pytest.approx(3 / 9)  # 0.995, 0.999, 0.992 of resp0
    assert metrics["dmmpt/gate_open_frac"].item() == 1.0
    assert metrics["dmmpt/mean_entropy"].item() == pytest.approx((sum(ENT0_LOW) + sum(ENT1)) / 9)
    # dropping masked tokens from the denominator instead would give 2A/6: not the spec
    wrong = aggregate(loss_BT, inp.response_mask_BT * keep_BT, "token-mean")
    assert wrong.item() == pytest.approx(2 * A / 6)
    # high-entropy case: nothing masked, [5 * (-A) + 4 * A] / 9
    inp = _example(ENT0_HIGH)
    loss_BT, _ = ppo_clip_loss(inp, PPOClipParams())
    keep_BT, metrics = dmmpt_loss_mask(inp, DMMPTParams())
    assert torch.equal(keep_BT, torch.ones_like(keep_BT))
    assert aggregate(loss_BT * keep_BT, inp.response_mask_BT, "token-mean").item() == pytest.approx(-A / 9, abs=1e-9)
    assert metrics["dmmpt/gate_open_frac"].item() == 0.0 and metrics["dmmpt/mpt_frac"].item() == pytest.approx(3 / 9)


def test_masked_tokens_get_no_gradient_but_others_do() -> None:
    inp = _example(ENT0_LOW)
    inp.logprobs_BT.requires_grad_(True)
    loss_BT, _ = ppo_clip_loss(inp, PPOClipParams())
    keep_BT, _ = dmmpt_loss_mask(inp, DMMPTParams())
    aggregate(loss_BT * keep_BT, inp.response_mask_BT, "token-mean").backward()
    g = inp.logprobs_BT.grad
    assert g[0, [0, 2, 4]].abs().max().item() == 0.0
    assert g[0, 1].item() == pytest.approx(-inp.advantages_BT[0, 1].item() / 9)
    assert g[1, :4].abs().min().item() > 0


def test_batch_scope_and_explicit_batch_entropy() -> None:
    inp = _example(ENT0_LOW)  # resp0 alone is below sigma; the batch token mean is not
    batch_mean = (sum(ENT0_LOW) + sum(ENT1)) / 9
    assert batch_mean > 0.2
    pos = torch.tensor([True, False])
    p = DMMPTParams(entropy_scope="batch")
    m = mask_mastered_positive(inp.old_logprobs_BT, inp.entropy_BT, pos, inp.response_mask_BT, p)
    assert m.sum().item() == 0
    # with a (global) batch entropy below sigma, the gate opens for every positive sample
    m = mask_mastered_positive(inp.old_logprobs_BT, inp.entropy_BT, pos, inp.response_mask_BT, p,
                               batch_mean_entropy=0.1)
    assert m[0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0] and m[1].sum().item() == 0
    # sample scope ignores other samples: resp0's gate is the same when resp1 changes
    hot = inp.entropy_BT.clone()
    hot[1] = 5.0
    a = entropy_gate_B(inp.entropy_BT, inp.response_mask_BT, pos, DMMPTParams())
    b = entropy_gate_B(hot, inp.response_mask_BT, pos, DMMPTParams())
    assert a.tolist() == b.tolist() == [True, False]


def test_padding_does_not_enter_the_sample_entropy() -> None:
    # resp1 made positive: its padded slot carries a huge entropy that must be ignored
    ent = torch.tensor([_pad(ENT0_LOW), _pad([0.1, 0.1, 0.1, 0.1], 9.0)])
    logp = torch.log(torch.tensor([_pad(P0, 1.0), _pad(P1, 1.0)]))
    m = mask_mastered_positive(logp, ent, torch.tensor([True, True]), MASK, DMMPTParams())
    assert m[1].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]  # 0.999 and 0.995 masked, padding never


def test_micro_batch_invariance_with_global_counts() -> None:
    """Sample scope is per sample: masking per micro-batch + global token count == full batch."""
    torch.manual_seed(0)
    B, T = 6, 7
    mask = (torch.rand(B, T) > 0.2).float()
    mask[:, 0] = 1
    logp = torch.log(torch.rand(B, T) * 0.2 + 0.8)
    adv = torch.randn(B)[:, None].expand(B, T) * mask
    inp = PolicyLossInputs(logp, logp.clone(), adv, mask, entropy_BT=torch.rand(B, T) * 0.3)
    p = DMMPTParams(tau=0.9, sigma=0.2)
    loss_BT, _ = ppo_clip_loss(inp, PPOClipParams())
    keep, _ = dmmpt_loss_mask(inp, p)
    assert 0 < (1 - keep).mul(mask).sum() < mask.sum()
    full = aggregate(loss_BT * keep, mask, "token-mean")
    parts = 0.0
    for idx in ([0, 1], [2, 3, 4], [5]):
        sub = PolicyLossInputs(logp[idx], logp[idx], adv[idx], mask[idx], entropy_BT=inp.entropy_BT[idx])
        lb, _ = ppo_clip_loss(sub, PPOClipParams())
        k, _ = dmmpt_loss_mask(sub, p)
        parts = parts + aggregate(lb * k, mask[idx], "token-mean", num_tokens=mask.sum())
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_positive_from_advantages_matches_binary_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    gids = torch.tensor([0, 0, 0, 1, 1, 2])  # group 1: all correct (A = 0), group 2: singleton
    mask = torch.ones(6, 3)
    adv = ADVANTAGES.get("grpo").fn(AdvantageInputs(rewards, gids, mask), ADVANTAGES.build_params("grpo", {}))
    pos = positive_from_advantages(adv, mask)
    # where A != 0 the proxy equals r = 1; all-correct groups have A = 0, where masking is moot
    assert pos.tolist() == [True, False, False, False, False, True]


def test_registry_apply_and_errors() -> None:
    assert LOSS_MASKS.get("dmmpt").fn is dmmpt_loss_mask
    inp = _example(ENT0_LOW)
    loss_BT, _ = ppo_clip_loss(inp, PPOClipParams())
    masked, metrics = apply_loss_masks(loss_BT, inp, {"mask_mastered_positive": {"tau": 0.99, "sigma": 0.2}})
    assert masked[0].tolist()[1] == loss_BT[0, 1].item() and masked[0, 0].item() == 0.0
    assert "dmmpt/masked_frac" in metrics
    same, m2 = apply_loss_masks(loss_BT, inp, None)
    assert same is loss_BT and m2 == {}
    # explicit positive_B overrides the advantage proxy
    none, _ = apply_loss_masks(loss_BT, inp, {"dmmpt": {}}, positive_B=torch.tensor([False, False]))
    assert torch.equal(none, loss_BT)
    with pytest.raises(ValueError, match="sigmaa"):
        apply_loss_masks(loss_BT, inp, {"dmmpt": {"sigmaa": 0.1}})
    with pytest.raises(KeyError, match="mask_mastered_positive"):
        LOSS_MASKS.get("mask_mastered")
    with pytest.raises(ValueError, match="tau"):
        DMMPTParams(tau=1.5)
    with pytest.raises(ValueError, match="entropy_scope"):
        DMMPTParams(entropy_scope="token")  # type: ignore[arg-type]
    no_ent = PolicyLossInputs(inp.logprobs_BT, inp.old_logprobs_BT, inp.advantages_BT, inp.response_mask_BT)
    with pytest.raises(ValueError, match="entropy_BT"):
        dmmpt_loss_mask(no_ent, DMMPTParams())
    with pytest.raises(ValueError, match="positive_B"):
        mask_mastered_positive(inp.old_logprobs_BT, inp.entropy_BT, torch.tensor([True]), MASK, DMMPTParams())
    with pytest.raises(ValueError, match="shapes"):
        mask_mastered_positive(inp.old_logprobs_BT, inp.entropy_BT[:, :3], torch.tensor([True, False]), MASK,
                               DMMPTParams())
    assert math.isfinite(float(metrics["dmmpt/mean_entropy"]))
