"""Policy losses: docs/algorithms.md §7.4 worked example (DAPO, Dr.GRPO, GSPO), dual clip, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.algorithms import (
    POLICY_LOSSES,
    GSPOParams,
    PolicyLossInputs,
    PPOClipParams,
    aggregate,
    gspo_loss,
    ppo_clip_loss,
)

F64 = torch.float64
PAD = 5.0  # garbage log-prob on padding: must never leak into any result

# docs/algorithms.md §7.4: resp0 A=+1, log-ratios [0.1, 0.3]; resp1 A=-1, log-ratios [-0.05, 0.2, -0.4].
LOG_RATIOS = [[0.1, 0.3, PAD], [-0.05, 0.2, -0.4]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
ADV = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]], dtype=F64)


def _inputs(log_ratios: list[list[float]] = LOG_RATIOS, adv: torch.Tensor = ADV) -> PolicyLossInputs:
    old = torch.full((2, 3), -1.0, dtype=F64)
    logprobs = (old + torch.tensor(log_ratios, dtype=F64)).requires_grad_(True)
    return PolicyLossInputs(
        logprobs_BT=logprobs, old_logprobs_BT=old, advantages_BT=adv, response_mask_BT=MASK,
        entropy_BT=torch.linspace(0.1, 2.0, 6, dtype=F64).reshape(2, 3),
    )


def test_dapo_worked_example() -> None:
    # ε_low 0.2, ε_high 0.28, c = 10.
    # resp0 (A=+1): r = [e^0.1, e^0.3] = [1.105171, 1.349859] -> max(-r, -clip(r, 0.8, 1.28))
    #   = [-1.105171, -1.28]          (second token clipped at 1.28)
    # resp1 (A=-1): r = [0.951229, 1.221403, 0.670320] -> max(r, clip(r)) = [0.951229, 1.221403, 0.8]
    #   dual clip min(l, 10) changes nothing.
    loss, m = ppo_clip_loss(_inputs(), PPOClipParams(clip_low=0.2, clip_high=0.28, clip_c=10.0))
    expected = torch.tensor([[-math.exp(0.1), -1.28, 0.0], [math.exp(-0.05), math.exp(0.2), 0.8]], dtype=F64)
    torch.testing.assert_close(loss * MASK, expected, atol=1e-5, rtol=0)
    spec_rounded = torch.tensor([[-1.1052, -1.2800, 0.0], [0.9512, 1.2214, 0.8000]], dtype=F64)
    torch.testing.assert_close(loss * MASK, spec_rounded, atol=1e-4, rtol=0)
    # token-mean: (-1.105171 - 1.28 + 0.951229 + 1.221403 + 0.8) / 5 = 0.587461 / 5 = 0.117492
    assert aggregate(loss, MASK, "token-mean").item() == pytest.approx(0.117492, abs=1e-5)
    # seq-mean-token-mean: (-2.385171 / 2 + 2.972632 / 3) / 2 = (-1.192585 + 0.990877) / 2 = -0.100854
    assert aggregate(loss, MASK, "seq-mean-token-mean").item() == pytest.approx(-0.100854, abs=1e-5)
    # clipped branch active on resp0 t1 (1.3499 > 1.28, A>0) and resp1 t2 (0.6703 < 0.8, A<0): 2 / 5
    assert m["clip_frac"].item() == pytest.approx(0.4, abs=1e-12)
    # ppo_kl = mean(old - new) = -(0.1 + 0.3 - 0.05 + 0.2 - 0.4) / 5 = -0.15 / 5 = -0.03
    assert m["ppo_kl"].item() == pytest.approx(-0.03, abs=1e-12)
    assert m["dual_clip_frac"].item() == 0.0


def test_symmetric_clip_dr_grpo_worked_example() -> None:
    # ε = 0.2: resp0 second token now clipped at 1.2 -> resp0 [-1.105171, -1.2]; resp1 unchanged.
    loss, _ = POLICY_LOSSES.get("ppo_clip").fn(_inputs(), PPOClipParams(clip_low=0.2, clip_high=0.2))
    expected = torch.tensor([[-math.exp(0.1), -1.2, 0.0], [math.exp(-0.05), math.exp(0.2), 0.8]], dtype=F64)
    torch.testing.assert_close(loss * MASK, expected, atol=1e-5, rtol=0)
    # Σ_i Σ_t l = (-1.105171 - 1.2) + (0.951229 + 1.221403 + 0.8) = -2.305171 + 2.972632 = 0.667461
    # Dr.GRPO paper form (1/G) ΣΣ with G = 2: 0.333731
    assert aggregate(loss, MASK, "seq-mean-token-sum", num_seqs=2).item() == pytest.approx(0.333731, abs=1e-5)
    assert aggregate(loss, MASK, "seq-mean-token-sum").item() == pytest.approx(0.333731, abs=1e-5)
    # verl seq-mean-token-sum-norm, horizon 3: 0.667461 / G / 3 = 0.333731 / 3 = 0.111244
    assert aggregate(loss, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(0.111244, abs=1e-5)
    assert aggregate(loss, MASK, "seq-mean-token-sum-norm", norm_length=3).item() == pytest.approx(
        0.111244, abs=1e-5
    )


def test_gspo_worked_example_clipped_zero_grad() -> None:
    # resp0: log s_0 = (0.1 + 0.3) / 2 = 0.2, s_0 = 1.221403 -> clip to 1 + 4e-4 -> loss -1.000400
    # resp1: log s_1 = (-0.05 + 0.2 - 0.4) / 3 = -0.083333, s_1 = 0.920044 -> clip to 1 - 3e-4
    #   -> loss = -(-1) * 0.9997 = 0.999700.   (The PAD log-prob of resp0 must not enter s_0.)
    inp = _inputs()
    loss, m = gspo_loss(inp, GSPOParams())
    torch.testing.assert_close(loss[0, :2], torch.full((2,), -1.0004, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss[1], torch.full((3,), 0.9997, dtype=F64), atol=1e-6, rtol=0)
    # J-loss = seq-mean-token-mean = (-1.000400 + 0.999700) / 2 = -0.000350
    total = aggregate(loss, MASK, "seq-mean-token-mean")
    assert total.item() == pytest.approx(-0.000350, abs=1e-6)
    assert m["clip_frac"].item() == 1.0
    # both sequences are clipped -> zero gradient everywhere
    total.backward()
    assert inp.logprobs_BT.grad is not None
    torch.testing.assert_close(inp.logprobs_BT.grad, torch.zeros(2, 3, dtype=F64))


def test_gspo_unclipped_gradient_matches_sequence_level_gspo() -> None:
    # Token log-ratios average to 0 in each sequence -> s_i = 1, inside [1 - 3e-4, 1 + 4e-4].
    # loss_{i,t} = -A_i s_i; seq-mean-token-mean over G = 2:
    #   d/d logp_{0,t} = -A_0 / (|y_0| * 2) = -1 / 4 = -0.25
    #   d/d logp_{1,t} = -A_1 / (|y_1| * 2) = +1 / 6 = 0.166667
    log_ratios = [[1e-4, -1e-4, PAD], [2e-4, -1e-4, -1e-4]]
    inp = _inputs(log_ratios)
    loss, m = gspo_loss(inp, GSPOParams())
    total = aggregate(loss, MASK, "seq-mean-token-mean")
    assert total.item() == pytest.approx((-1.0 + 1.0) / 2, abs=1e-9)
    assert m["clip_frac"].item() == 0.0
    total.backward()
    expected_grad = torch.tensor([[-0.25, -0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]], dtype=F64)
    torch.testing.assert_close(inp.logprobs_BT.grad, expected_grad, atol=1e-6, rtol=0)

    # Same gradient as sequence-level GSPO: J = (1/G) Σ_i -A_i exp(mean_t log r_{i,t}).
    logprobs = inp.logprobs_BT.detach().clone().requires_grad_(True)
    log_s = ((logprobs - inp.old_logprobs_BT) * MASK).sum(-1) / MASK.sum(-1)
    seq_loss = (-ADV[:, 0] * torch.exp(log_s)).mean()
    seq_loss.backward()
    torch.testing.assert_close(inp.logprobs_BT.grad, logprobs.grad, atol=1e-9, rtol=0)


def test_dual_clip_caps_negative_advantage() -> None:
    # tokens: (A=-1, r=5), (A=-1, r=2), (A=+1, r=5); ε = 0.2, c = 3
    #   t0: max(5, 1.2) = 5 -> min(5, 3) = 3   (dual clip active, zero grad)
    #   t1: max(2, 1.2) = 2 -> min(2, 3) = 2   (unclipped, grad = -A r = 2)
    #   t2: max(-5, -1.2) = -1.2               (A>0: standard clip only, zero grad)
    old = torch.zeros(1, 3, dtype=F64)
    logprobs = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=F64)
    inp = PolicyLossInputs(logprobs, old, adv, mask)
    loss, m = ppo_clip_loss(inp, PPOClipParams(clip_c=3.0))
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]], dtype=F64), atol=1e-9, rtol=0)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    assert m["clip_frac"].item() == pytest.approx(1 / 3)
    # ppo_kl = mean(old - new) = -(ln5 + ln2 + ln5) / 3 = -ln(50) / 3 = -1.304007
    assert m["ppo_kl"].item() == pytest.approx(-math.log(50.0) / 3, abs=1e-9)
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=F64))

    # clip_c=None disables the cap: t0 loss is 5
    loss_nc, m_nc = ppo_clip_loss(inp, PPOClipParams(clip_c=None))
    torch.testing.assert_close(loss_nc, torch.tensor([[5.0, 2.0, -1.2]], dtype=F64), atol=1e-9, rtol=0)
    assert m_nc["dual_clip_frac"].item() == 0.0


def test_ppo_clip_extreme_log_ratios_stay_finite() -> None:
    # log-ratio 100 is clamped to 20 before exp -> no inf/NaN in loss or gradient
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[100.0, -100.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]])
    loss, m = ppo_clip_loss(PolicyLossInputs(logprobs, old, adv, torch.ones(1, 2)), PPOClipParams())
    # t0: A<0, r = e^20 -> dual clip cap 3; t1: A>0, r = e^-20 -> max(-e^-20, -0.8) = -2.06e-9
    torch.testing.assert_close(loss, torch.tensor([[3.0, -math.exp(-20.0)]]), atol=1e-6, rtol=0)
    loss.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_unclipped_gradient_is_minus_advantage_times_ratio() -> None:
    # inside the trust region: d(-A r)/d logp = -A r
    old = torch.zeros(1, 2, dtype=F64)
    logprobs = torch.tensor([[0.05, -0.1]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[2.0, -0.5]], dtype=F64)
    loss, m = ppo_clip_loss(
        PolicyLossInputs(logprobs, old, adv, torch.ones(1, 2, dtype=F64)), PPOClipParams()
    )
    loss.sum().backward()
    expected = torch.tensor([[-2.0 * math.exp(0.05), 0.5 * math.exp(-0.1)]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected)
    assert m["clip_frac"].item() == 0.0


def test_metrics_are_detached_scalars_and_padding_ignored() -> None:
    for name in POLICY_LOSSES.names():
        inp = _inputs()
        loss, metrics = POLICY_LOSSES.get(name).fn(inp, POLICY_LOSSES.build_params(name, {}))
        assert loss.shape == (2, 3) and loss.requires_grad
        assert {"clip_frac", "ppo_kl"} <= set(metrics)
        for v in metrics.values():
            assert v.dim() == 0 and not v.requires_grad
        # ppo_kl ignores the PAD token: -0.15 / 5
        assert metrics["ppo_kl"].item() == pytest.approx(-0.03, abs=1e-12)


def test_policy_loss_inputs_shape_validation() -> None:
    with pytest.raises(ValueError, match="advantages_BT"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))
