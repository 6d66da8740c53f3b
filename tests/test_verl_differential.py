"""Differential tests against verl's own code (``verl.trainer.ppo.core_algos``, installed without
its dependencies, see tests/requirements-verl.txt): every advantage, aggregation, KL estimator and
policy loss that both libraries have, on random inputs that include fully masked rows (truncated
samples under an overlong filter), groups of one and groups whose rewards are all equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl reference not installed "
                           "(pip install --no-deps -r tests/requirements-verl.txt)")  # fmt: skip

from rlkit.algorithms import (  # noqa: E402
    ADVANTAGES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    AdvantageOutput,
    PolicyLossInputs,
    aggregate,  # noqa: E402
)

F32 = torch.float32
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
SEEDS = range(6)


def _batch(seed: int):
    """B = 24 responses in groups of sizes 1..6, T = 11; rewards in {0, 0.5, 1} (some groups all
    equal); two rows fully masked."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 4, 6, 8]
    gids = torch.cat([torch.full((n,), 100 + k) for k, n in enumerate(sizes)])
    B, T = len(gids), 11
    rewards = torch.randint(0, 3, (B,), generator=g).to(F32) / 2
    rewards[3:6] = 1.0  # the group of three: all equal
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[[5, 17]] = 0  # fully masked rows
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F32)
    perm = torch.randperm(B, generator=g)
    return rewards[perm], gids[perm], mask[perm], g


def _ours_adv(name: str, rewards, gids, mask, **params):
    inp = AdvantageInputs(rewards_B=rewards, group_ids_B=gids, response_mask_BT=mask)
    out = ADVANTAGES.get(name).fn(inp, ADVANTAGES.build_params(name, params))
    return AdvantageOutput.of(out).advantages_BT


def _token_rewards(rewards, mask):
    out = torch.zeros_like(mask)
    out[:, 0] = rewards  # verl sums the token rewards of a row, masked or not
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("ours", "norm"), [("grpo", True), ("dr_grpo", False)])
def test_grpo_and_dr_grpo_advantages(seed: int, ours: str, norm: bool) -> None:
    rewards, gids, mask, _ = _batch(seed)
    ref, _ = core.compute_grpo_outcome_advantage(_token_rewards(rewards, mask), mask, gids.numpy(),
                                                 epsilon=1e-6, norm_adv_by_std_in_grpo=norm)  # fmt: skip
    torch.testing.assert_close(_ours_adv(ours, rewards, gids, mask).float(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_advantage(seed: int) -> None:
    rewards, gids, mask, _ = _batch(seed)
    ref, _ = core.compute_rloo_outcome_advantage(_token_rewards(rewards, mask), mask, gids.numpy())
    torch.testing.assert_close(_ours_adv("rloo", rewards, gids, mask).float(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_aggregations(seed: int, mode: str) -> None:
    _, _, mask, g = _batch(seed)
    loss = torch.randn(mask.shape, generator=g)
    ref = core.agg_loss(loss, mask, mode)
    torch.testing.assert_close(aggregate(loss, mask, mode), ref, atol=1e-6, rtol=1e-6)
    # a constant horizon (the maximum response length) as verl's loss_scale_factor
    if mode == "seq-mean-token-sum-norm":
        ref = core.agg_loss(loss, mask, mode, loss_scale_factor=4096)
        torch.testing.assert_close(aggregate(loss, mask, mode, norm_length=4096), ref, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("ours", "theirs"), [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("abs", "abs")])
def test_kl_estimators(seed: int, ours: str, theirs: str) -> None:
    g = torch.Generator().manual_seed(seed)
    lp, ref_lp = -torch.rand(8, 9, generator=g) * 5, -torch.rand(8, 9, generator=g) * 5
    torch.testing.assert_close(KL_ESTIMATORS.get(ours).fn(lp, ref_lp), core.kl_penalty(lp, ref_lp, theirs),
                               atol=1e-6, rtol=1e-6)  # fmt: skip


def _actor_config(clip_low: float, clip_high: float, clip_c: float):
    return core.ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1,
                            use_dynamic_bsz=False, clip_ratio=clip_low, clip_ratio_low=clip_low,
                            clip_ratio_high=clip_high, clip_ratio_c=clip_c)  # fmt: skip


def _policy_inputs(seed: int):
    rewards, gids, mask, g = _batch(seed)
    old = -torch.rand(mask.shape, generator=g) * 4
    new = old + torch.randn(mask.shape, generator=g) * 0.3  # ratios well outside the clip range too
    adv = _ours_adv("grpo", rewards, gids, mask).float()
    return old, new, adv, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_ppo_clip_loss_with_clip_higher_and_dual_clip(seed: int, mode: str) -> None:
    old, new, adv, mask = _policy_inputs(seed)
    ref, ref_m = core.compute_policy_loss_vanilla(old, new, adv, mask, mode, _actor_config(0.2, 0.28, 3.0))
    params = POLICY_LOSSES.build_params("ppo_clip", {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 3.0})
    loss_BT, m = POLICY_LOSSES.get("ppo_clip").fn(PolicyLossInputs(new, old, adv, mask), params)
    torch.testing.assert_close(aggregate(loss_BT, mask, mode), ref, atol=1e-6, rtol=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(ref_m["actor/pg_clipfrac"], abs=1e-6)
    assert float(m["ppo_kl"]) == pytest.approx(ref_m["actor/ppo_kl"], abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_gspo_loss_value_and_gradient(seed: int, mode: str) -> None:
    old, new, adv, mask = _policy_inputs(seed)
    new_ref, new_ours = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ref, _ = core.compute_policy_loss_gspo(old, new_ref, adv, mask, mode, _actor_config(3e-4, 4e-4, 3.0))
    params = POLICY_LOSSES.build_params("gspo", {"clip_low": 3e-4, "clip_high": 4e-4})
    loss_BT, _ = POLICY_LOSSES.get("gspo").fn(PolicyLossInputs(new_ours, old, adv, mask), params)
    ours = aggregate(loss_BT, mask, mode)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(new_ours.grad, new_ref.grad, atol=1e-6, rtol=1e-5)


def test_reference_is_the_pinned_verl() -> None:
    import importlib.metadata

    assert importlib.metadata.version("verl") == "0.9.1"
    assert np.__name__ == "numpy"  # verl's grouping takes a numpy index
