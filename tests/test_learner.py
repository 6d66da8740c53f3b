"""Torch learner: logprobs agree with the engine, micro-batching does not change gradients, LoRA sync."""

from __future__ import annotations

import pytest
import torch

from rlkit.config import load_config
from rlkit.learner.torch_learner import TorchLearner, lr_lambda
from rlkit.loop.batch import build_batch
from rollout.engine import RolloutRequest, SamplingParams
from rollout.hf import HFEngine


def _learner(model_dir: str, *overrides: str) -> TorchLearner:
    cfg = load_config(None, [f"model.name={model_dir}", *overrides])
    return TorchLearner(model_dir, cfg)


def _rollout(model_dir: str, n_prompts: int = 3, n: int = 2, **engine_kw):
    eng = HFEngine(model_dir, seed=0, **engine_kw)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]][:n_prompts]
    reqs = [RolloutRequest(prompt_ids=p, params=SamplingParams(max_new_tokens=7, n=n, seed=3)) for p in prompts]
    comps = eng.generate(reqs)
    batch = build_batch([c.prompt_ids for c in comps], [c.token_ids for c in comps], pad_id=0,
                        rollout_logprobs=[c.logprobs for c in comps])
    return eng, comps, batch


def test_learner_logprobs_match_engine_behaviour_logprobs(tiny_model_dir):
    _, comps, batch = _rollout(tiny_model_dir)
    learner = _learner(tiny_model_dir)
    lp = learner.compute_logprobs(batch)
    mask = batch.response_mask_BT.bool()
    assert torch.allclose(lp[mask], batch.rollout_logprobs_BT[mask], atol=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_gradient_does_not_depend_on_micro_batch_size(tiny_model_dir, agg):
    _, comps, batch = _rollout(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    batch.advantages_BT = torch.randn(batch.response_mask_BT.shape, generator=g) * batch.response_mask_BT
    grads = []
    for mbs in (1, 2, 6):
        learner = _learner(tiny_model_dir, f"learner.micro_batch_size={mbs}", f"algorithm.loss_agg={agg}",
                           "algorithm.old_logprobs=rollout")
        learner.optimizer.step = lambda: None  # keep the gradients, skip the update
        learner.train_step(batch)
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_token_budget_micro_batches_give_the_fixed_count_gradient(tiny_model_dir, share_prompt):
    """learner.max_tokens_per_micro_batch changes how rows are split, never the gradient."""
    _, comps, batch = _rollout(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    batch.advantages_BT = torch.randn(batch.response_mask_BT.shape, generator=g) * batch.response_mask_BT
    share = [] if share_prompt else ["learner.share_prompt=false"]
    grads, pads = [], []
    for ov in (["learner.micro_batch_size=6"], ["learner.max_tokens_per_micro_batch=1"],
               ["learner.max_tokens_per_micro_batch=30"], ["learner.max_tokens_per_micro_batch=10000"]):
        learner = _learner(tiny_model_dir, *ov, *share, "algorithm.old_logprobs=rollout")
        learner.optimizer.step = lambda: None  # keep the gradients, skip the update
        m = learner.train_step(batch)
        pads.append(m["perf/pad_frac"])
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, atol=1e-6, rtol=1e-4)
    assert all(0.0 <= p < 1.0 for p in pads)


def test_token_budget_plan_respects_the_budget_and_keeps_groups_together(tiny_model_dir):
    from rlkit.learner.torch_learner import plan_micro_batches

    _, comps, batch = _rollout(tiny_model_dir, n=3)
    rows = list(range(len(batch)))
    P = batch.prompt_width

    def cost(mb):
        return len(mb) * (int(batch.attention_mask_BS[mb, :P].sum(1).max()) + int(batch.response_mask_BT[mb].sum(1).max()))

    for budget in (1, 20, 40, 10_000):
        plan = plan_micro_batches(batch, rows, None, False, max_tokens=budget)
        assert sorted(r for mb in plan for r in mb) == rows  # every row once
        assert all(len(mb) == 1 or cost(mb) <= budget for mb in plan)
        assert plan == plan_micro_batches(batch, rows, None, False, max_tokens=budget)  # deterministic
    assert len(plan_micro_batches(batch, rows, None, False, max_tokens=1)) == len(rows)
    assert len(plan_micro_batches(batch, rows, None, False, max_tokens=10_000)) == 1
    assert len(plan_micro_batches(batch, rows, 4, False, max_tokens=10_000)) == 3  # the row cap still holds
    # share_prompt: a prompt's 3 samples never straddle two micro-batches, whatever the budget
    for budget in (1, 25, 10_000):
        for mb in plan_micro_batches(batch, rows, None, True, max_tokens=budget):
            prompts = {tuple(comps[r].prompt_ids) for r in mb}
            assert len(mb) == 3 * len(prompts)


def test_train_step_changes_weights_and_reports_metrics(tiny_model_dir):
    _, comps, batch = _rollout(tiny_model_dir)
    batch.advantages_BT = torch.ones_like(batch.response_mask_BT)
    learner = _learner(tiny_model_dir, "learner.lr=1e-2", "algorithm.kl.beta=0.1", "train.mini_batches=2",
                       "train.prompts_per_step=3", "train.samples_per_prompt=2")
    before = {k: v.clone() for k, v in learner.state_for_sync().items()}
    m = learner.train_step(batch)
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/clip_frac", "actor/kl", "actor/lr"):
        assert key in m, key
    after = learner.state_for_sync()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lora_learner_syncs_only_adapter_into_engine(tiny_model_dir):
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
    eng, comps, batch = _rollout(tiny_model_dir, lora=lora)
    batch.advantages_BT = torch.ones_like(batch.response_mask_BT)
    learner = _learner(tiny_model_dir, "model.lora.rank=4", "model.lora.alpha=8", "learner.lr=5e-2")
    learner.train_step(batch)
    state = learner.state_for_sync()
    assert state and all("lora_" in k for k in state)
    eng.load_weights(state, version=1)
    new = eng.score([c.prompt_ids for c in comps], [c.token_ids for c in comps])
    lp = learner.compute_logprobs(batch)
    for i, row in enumerate(new):
        assert torch.allclose(torch.tensor(row), lp[i, : len(row)], atol=1e-4)


def test_update_schedule_keeps_every_row_when_mini_batches_do_not_divide_the_batch():
    from rlkit.learner.torch_learner import update_schedule

    t = load_config(None, ["train.mini_batches=4", "train.ppo_epochs=2"]).train
    sched = update_schedule(10, t, step=1)  # BRPO: thinking rows + a varying number of summary rows
    assert [e for e, _ in sched] == [0] * 4 + [1] * 4 and [len(r) for _, r in sched] == [2, 3, 2, 3] * 2
    for epoch in (0, 1):
        assert sorted(i for e, rows in sched if e == epoch for i in rows) == list(range(10))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()  # divisible: equal slices
    assert [r for _, r in update_schedule(8, t, step=1)][:4] == [perm[2 * m : 2 * m + 2] for m in range(4)]


def test_lr_schedule():
    assert [lr_lambda(s, warmup=2, total=10, schedule="constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(6, warmup=2, total=10, schedule="linear") == pytest.approx(0.5)
    assert lr_lambda(6, warmup=2, total=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_lambda(10, warmup=2, total=10, schedule="cosine") == pytest.approx(0.0)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_is_exact_and_runs_each_prompt_once(tiny_model_dir, lora):
    _, comps, batch = _rollout(tiny_model_dir, n=3)
    g = torch.Generator().manual_seed(1)
    batch.advantages_BT = torch.randn(batch.response_mask_BT.shape, generator=g) * batch.response_mask_BT
    extra = ["model.lora.rank=4", "model.lora.alpha=8"] if lora else []
    results = {}
    for share in (False, True):
        learner = _learner(tiny_model_dir, f"learner.share_prompt={share}", "learner.micro_batch_size=9",
                           "algorithm.old_logprobs=rollout", *extra)
        seen = []
        emb = learner.model.get_input_embeddings()
        emb.register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0].numel()))
        lp = learner.compute_logprobs(batch)
        learner.optimizer.step = lambda: None
        m = learner.train_step(batch)
        grad = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
        results[share] = (lp, m["actor/entropy"], grad, sum(seen))
    (lp0, ent0, g0, n0), (lp1, ent1, g1, n1) = results[False], results[True]
    mask = batch.response_mask_BT.bool()
    assert torch.allclose(lp0[mask], lp1[mask], atol=1e-5)
    assert ent0 == pytest.approx(ent1, rel=1e-5)
    assert g0.abs().sum() > 0 and torch.allclose(g0, g1, atol=1e-6, rtol=1e-4)
    # 3 prompts x 3 samples: the shared path embeds each prompt once instead of three times
    P, T = batch.prompt_width, batch.response_mask_BT.shape[1]
    assert n1 < n0 and n0 == 2 * 9 * (P + T)


def test_micro_batches_keep_groups_together(tiny_model_dir):
    _, comps, batch = _rollout(tiny_model_dir, n=2)
    learner = _learner(tiny_model_dir, "learner.micro_batch_size=2")
    mbs = learner._micro_batches(batch, range(len(batch)))
    for mb in mbs:
        prompts = {tuple(comps[i].prompt_ids) for i in mb}
        assert len(prompts) == 1, mbs


def test_dmmpt_loss_mask_masks_mastered_positive_tokens_and_reports(tiny_model_dir):
    _, comps, batch = _rollout(tiny_model_dir)
    batch.advantages_BT = torch.ones_like(batch.response_mask_BT)  # every sample positive
    grads, metrics = [], []
    for mask in ({}, {"mask_mastered_positive": {"tau": 1e-9, "sigma": 1e9}}):
        learner = _learner(tiny_model_dir, "algorithm.old_logprobs=rollout")
        if mask:
            learner.algo = learner.algo.model_copy(update={"loss_mask": mask})
        learner.optimizer.step = lambda: None
        metrics.append(learner.train_step(batch))
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None]))
    # tau~0 and an always-open entropy gate mask every token of the positive samples: no gradient
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() == 0
    assert metrics[1]["actor/dmmpt/masked_frac"] == pytest.approx(1.0)


def test_loss_mask_config_errors():
    from rlkit.config import ConfigError

    with pytest.raises(ConfigError, match="dmmpt|mask_mastered_positive"):
        load_config(None, ["algorithm.loss_mask={mask_mastered_positiv: {}}"])
    with pytest.raises(ConfigError, match="tua"):
        load_config(None, ["algorithm.loss_mask={mask_mastered_positive: {tua: 0.5}}"])


@pytest.mark.parametrize("old_logprobs", ["auto", "rollout"])
def test_hapo_sampling_statistics_come_from_the_pre_update_policy(tiny_model_dir, old_logprobs):
    """With several updates per step, the adaptive-temperature statistics must describe the policy
    that sampled the batch (before any update), not a mix of passes taken between updates."""
    from rlkit.algorithms import hapo_sampling_stats
    from rlkit.learner.torch_learner import response_logprobs

    _, comps, batch = _rollout(tiny_model_dir)
    batch.advantages_BT = torch.randn(batch.response_mask_BT.shape, generator=torch.Generator().manual_seed(1))
    learner = _learner(tiny_model_dir, "learner.lr=5e-2", "learner.micro_batch_size=2", "train.mini_batches=3",
                       "train.prompts_per_step=3", "train.samples_per_prompt=2",
                       f"algorithm.old_logprobs={old_logprobs}")
    with torch.no_grad():
        _, ent = response_logprobs(learner.model, batch, with_entropy=True)
    rows = list(range(len(batch)))
    if old_logprobs == "rollout":  # no pre-update pass: the first update's rows, before any step
        from rlkit.learner.torch_learner import update_schedule

        rows = update_schedule(len(batch), learner.train_cfg, 0)[0][1]
    expected = [float(x) for x in hapo_sampling_stats(ent[rows][batch.response_mask_BT[rows] > 0], pivot=0.8)]
    learner.train_step(batch)
    assert learner.entropy_stats(0.8) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # how a sampler using `applied` moved these tokens' temperature: the same entropies, summarised
    from rollout.adaptive_temperature import temperature_factor_summary

    applied = expected  # the step's own statistics: tokens on both sides of the median entropy
    want = temperature_factor_summary(ent[rows][batch.response_mask_BT[rows] > 0], applied, 0.05)
    assert learner.temperature_stats(applied, 0.05) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert 0.95 - 1e-6 <= want["factor_min"] < 1 < want["factor_max"] <= 1.05 + 1e-6


def test_dmmpt_positives_are_correct_samples_not_positive_advantages(tiny_model_dir):
    """A wrong sample can carry a positive advantage (a format bonus or a length shaper lifted it
    above its group's mean); DMMPT must not mask it: positives are the samples the accuracy
    verifier scored correct (``correct_B``, set by make_batch)."""
    from rlkit.config import load_config as load
    from rlkit.loop.experience import Group, make_batch
    from rollout.engine import Completion

    _, comps, _ = _rollout(tiny_model_dir)
    # one prompt group of 6: only sample 0 correct; samples 1-2 wrong but formatted (0.1), 3-5 wrong,
    # unformatted and long (a length penalty: -0.5)
    groups = [Group(row={}, prompt_ids=comps[0].prompt_ids,
                    completions=[Completion(comps[0].prompt_ids, c.token_ids, c.logprobs, "stop") for c in comps],
                    rewards=[1.1, 0.1, 0.1, -0.5, -0.5, -0.5],
                    per_verifier={"math": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]})]  # fmt: skip
    cfg = load(None, [f"model.name={tiny_model_dir}", "train.samples_per_prompt=6", "train.prompts_per_step=1"])
    batch, _, _ = make_batch(groups, cfg, pad_id=0, acc_key="math")
    assert batch.correct_B.tolist() == [True, False, False, False, False, False]
    adv_mean = (batch.advantages_BT * batch.response_mask_BT).sum(1) / batch.response_mask_BT.sum(1)
    assert (adv_mean[:3] > 0).all()  # the two wrong-but-formatted samples have positive advantages
    learner = _learner(tiny_model_dir, "algorithm.old_logprobs=rollout")
    learner.algo = learner.algo.model_copy(update={"loss_mask": {"mask_mastered_positive": {"tau": 1e-9,
                                                                                           "sigma": 1e9}}})
    learner.optimizer.step = lambda: None
    m = learner.train_step(batch)
    # tau ~ 0 and an open gate mask every token of the positives: exactly sample 0's tokens
    share0 = float(batch.response_mask_BT[0].sum() / batch.response_mask_BT.sum())
    assert m["actor/dmmpt/masked_frac"] == pytest.approx(share0)


def test_dmmpt_batch_entropy_gate_does_not_depend_on_micro_batching(tiny_model_dir):
    """``entropy_scope: batch`` gates on the mini-batch's mean entropy (from the pre-update pass),
    not each micro-batch's: with sigma just above the batch mean, micro-batches of single rows used
    to close the gate for rows above it, so the update changed with learner.micro_batch_size."""
    from rlkit.learner.torch_learner import response_logprobs

    _, comps, batch = _rollout(tiny_model_dir)
    mask = batch.response_mask_BT
    batch.advantages_BT = torch.ones_like(mask)
    batch.correct_B = torch.ones(len(batch), dtype=torch.bool)
    learner = _learner(tiny_model_dir)
    with torch.no_grad():
        _, ent = response_logprobs(learner.model, batch, with_entropy=True)
    row_mean = (ent * mask).sum(1) / mask.sum(1)
    batch_mean = float((ent * mask).sum() / mask.sum())
    sigma = batch_mean + 1e-4
    assert (row_mean > sigma).any() and (row_mean < sigma).any()  # micro-batch gates would disagree
    tau = float(batch.rollout_logprobs_BT[mask > 0].exp().median())  # mask about half the tokens
    grads, fracs = [], []
    for mbs in (1, 2, 6):
        learner = _learner(tiny_model_dir, f"learner.micro_batch_size={mbs}", "algorithm.old_logprobs=rollout",
                           f"algorithm.loss_mask={{dmmpt: {{tau: {tau}, sigma: {sigma}, entropy_scope: batch}}}}")
        learner.optimizer.step = lambda: None
        fracs.append(learner.train_step(batch)["actor/dmmpt/masked_frac"])
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None]))
    assert 0.3 < fracs[0] < 0.7 and fracs == pytest.approx([fracs[0]] * 3)
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], atol=1e-6, rtol=1e-4)


def test_forward_only_passes_run_in_eval_mode(tiny_model_dir):
    """Old/ref log-probs are recomputed without dropout: with LoRA dropout 0.5 two recomputes of the
    same batch used to differ (train mode), and the learner is back in train mode afterwards."""
    _, comps, batch = _rollout(tiny_model_dir)
    learner = _learner(tiny_model_dir, "model.lora={rank: 4, alpha: 8, dropout: 0.5, target_modules: all-linear}")
    with torch.no_grad():  # a trained adapter (B starts at 0, which would hide the dropout)
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    learner.model.train()
    a, b = learner.compute_logprobs(batch), learner.compute_logprobs(batch)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert learner.model.training


def test_kl_k1_as_a_loss_and_dapo_overlong_twice_are_config_errors():
    from rlkit.config import ConfigError

    with pytest.raises(ConfigError, match="k1 as a loss has zero expected gradient"):
        load_config(None, ["algorithm.kl.beta=0.1", "algorithm.kl.estimator=k1"])
    load_config(None, ["algorithm.kl.beta=0.1", "algorithm.kl.estimator=k3"])
    with pytest.raises(ConfigError, match="overlong punishment is on twice"):
        load_config(None, ["algorithm.overlong_shaping.enabled=true", "reward.length_shapers=[{name: dapo_overlong}]"])
