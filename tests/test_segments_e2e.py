"""Segment rollout (UloRL, docs/algorithms.md §5) in the trainer: config, collect, sibling context, kill -9 + resume.

The in-process tests drive :class:`rlkit.methods.segments.SegmentRollout` with the real
``rollout.hf.HFEngine`` on the tiny random model (no Ray). The slow test runs
``recipes/ulorl_segments.yaml`` through the real CLI and Ray: an uninterrupted run against one
SIGKILLed in the middle of step 3 and resumed; the samples handed to training
(``RUN_DIR/segments.jsonl``), the final pools in the checkpoint and the metrics must be equal.

A random tiny model almost never emits EOS, so the runs use a stop string ("e") to get
geometric natural lengths: with ``seg_len=4`` and a 16-token maximum, samples take 1-4 segments.
"""

from __future__ import annotations

import pytest
import torch
from test_train_e2e import DETERMINISTIC, KILL_STEP, ROOT, _run_cli, assert_same_metrics, tiny_overrides

from rlkit.config import ConfigError, load_config
from rlkit.loop.experience import Group, make_batch

RECIPE = ROOT / "recipes/ulorl_segments.yaml"
SEG_OVERRIDES = ["engine.max_new_tokens=16", "segments.seg_len=4", "engine.stop=[e]"]


def _cfg(model: str, tmp_path, *extra: str):
    return load_config(RECIPE, [f"model.name={model}", f"output_dir={tmp_path}", "name=seg", "reward.mode=inline",
                                "train.prompts_per_step=2", "train.samples_per_prompt=4",
                                "reward.verifiers=[{name: math}, {name: tests/e2e_rewards.py:digit_fraction}]",
                                *SEG_OVERRIDES, *extra])


def test_config_validation(tiny_model_dir):
    cfg = load_config(RECIPE)
    assert cfg.segments.enabled and cfg.segments.resolved_seg_len(cfg.engine.max_new_tokens) == 32
    assert load_config(RECIPE, ["segments.seg_len=null", "engine.max_new_tokens=100"]).segments.resolved_seg_len(100) == 13
    bad = {
        "segments.importance=sais": "algorithm.old_logprobs=rollout",
        "algorithm.old_logprobs=rollout": "segments.importance=pois",
        "segments.seg_len=129": "engine.max_new_tokens=128",
        "segments.max_inflight_groups=3": "train.prompts_per_step=4",
        "segments.group_mode=siblings": "algorithm.dynamic_sampling",
        "engine.adaptive_temperature.enabled=true": "adaptive_temperature",
    }
    for ov, msg in bad.items():
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            load_config(RECIPE, [ov])
    sais = load_config(RECIPE, ["segments.importance=sais", "algorithm.old_logprobs=rollout"])
    assert sais.segments.importance == "sais"
    assert not load_config(None).segments.enabled  # off by default, nothing else checked


def test_make_batch_sibling_context_rewards():
    """Sibling mode: already-trained siblings' rewards enter the group statistics, not the batch.

    Group 0 trains R=[1] now; its sibling trained earlier with R=0. GRPO over {1, 0}: mean 0.5,
    unbiased std 0.70711, so A = 0.5 / (0.70711 + 1e-6) = 0.70711. Group 1 trains [0, 1] with no
    context: A = [-0.70711, +0.70711].
    """
    from rollout.engine import Completion

    def comp(n):
        return Completion(prompt_ids=[5], token_ids=[7] * n, logprobs=[-0.5] * n, finish_reason="stop")

    cfg = load_config(None, ["algorithm.advantage=grpo"])
    groups = [Group(row={}, prompt_ids=[5], completions=[comp(2)], rewards=[1.0], context_rewards=[0.0]),
              Group(row={}, prompt_ids=[5], completions=[comp(3), comp(1)], rewards=[0.0, 1.0])]
    batch, rewards_B, _ = make_batch(groups, cfg, pad_id=0)
    assert batch.advantages_BT.shape == (3, 3) and rewards_B.tolist() == [1.0, 0.0, 1.0]
    a = 0.5 / (0.5**0.5 + 1e-6)
    want = torch.tensor([[a, a, 0.0], [-a, -a, -a], [a, 0.0, 0.0]])
    assert torch.allclose(batch.advantages_BT, want, atol=1e-5)
    groups[0].context_rewards = []  # without context the singleton group uses mean 0, std 1
    batch, _, _ = make_batch(groups, cfg, pad_id=0)
    assert batch.advantages_BT[0, 0].item() == pytest.approx(1 / (1 + 1e-6), abs=1e-6)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from rollout.hf import HFEngine

    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


def _rollout(cfg, engine, run_dir=None):
    from rlkit.infra.data import PromptCursor, format_prompt, load_rows
    from rlkit.infra.models import apply_chat_template
    from rlkit.methods.segments import SegmentRollout

    rows, _ = load_rows("arithmetic", generator_kwargs={"n": 40, "max_value": 9}, seed=0)
    cursor = PromptCursor(len(rows), 0)

    def encode(r):
        return apply_chat_template(engine.tokenizer, format_prompt(r, None, cfg.data.prompt_template))

    def decode(ids):
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    return SegmentRollout(cfg, engine.generate, cursor, rows, encode, decode, run_dir), cursor


@pytest.mark.parametrize("mode", ["complete", "siblings"])
def test_collect_groups_rewards_and_restore(tiny_model_dir, hf, tmp_path, mode):
    """Groups carry whole multi-segment responses; truncated -> reward 0; a restored rollout
    (scheduler + cursor state) continues with exactly the samples the original would produce."""
    from rewards import RewardManager
    from rlkit.methods.segments import read_segment_log

    extra = ["algorithm.dynamic_sampling.enabled=false"] + (["segments.group_mode=siblings"] if mode == "siblings" else [])
    cfg = _cfg(tiny_model_dir, tmp_path, *extra)
    man = RewardManager.from_config(cfg.reward)
    hf.load_weights({}, version=0)
    sr, cursor = _rollout(cfg, hf, tmp_path / "a")
    seen, n_seg, n_ctx = set(), [], 0
    for step in (1, 2):
        kept, groups, m = sr.collect(step, man)
        assert kept == groups and m["rollout/kept_groups"] == len(groups)
        assert {"segments/unfinished_pool", "segments/seg_count_mean", "segments/version_lag_mean",
                "time/gen_s", "rollout/tokens_generated"} <= set(m)
        for g in groups:
            for c, r in zip(g.completions, g.rewards):
                uid = c.meta["segment_uid"]
                assert uid not in seen and len(c.token_ids) == sum(c.meta["segment_lengths"]) <= 16
                seen.add(uid)
                n_seg.append(len(c.meta["segment_lengths"]))
                if c.finish_reason == "length":
                    assert len(c.token_ids) == 16 and r == 0.0
                else:
                    assert "e" in c.text or c.token_ids[-1] == hf.tokenizer.eos_token_id, (c.token_ids, c.text)
            n_ctx += len(g.context_rewards)
            if mode == "complete":
                assert len(g.completions) == 4 and not g.context_rewards
        hf.load_weights({}, version=step)
    assert max(n_seg) >= 2 and any(len(set(x["versions"])) > 1 for r in read_segment_log(tmp_path / "a")
                                   for x in r["samples"])
    if mode == "siblings":
        assert n_ctx > 0  # some sample trained with the rewards of earlier-trained siblings
    # checkpoint after step 2, restore into a fresh rollout, both run step 3
    state, cur_state = sr.state_dict(), cursor.state_dict()
    sr2, cursor2 = _rollout(cfg, hf, tmp_path / "b")
    sr2.load_state_dict(state)
    cursor2.load_state_dict(cur_state)
    _, g_a, _ = sr.collect(3, man)
    _, g_b, _ = sr2.collect(3, man)
    assert [[c.token_ids for c in g.completions] for g in g_a] == [[c.token_ids for c in g.completions] for g in g_b]
    assert [g.rewards for g in g_a] == [g.rewards for g in g_b]
    assert [g.context_rewards for g in g_a] == [g.context_rewards for g in g_b]
    assert sr.state_dict() == sr2.state_dict()
    assert [r["step"] for r in read_segment_log(tmp_path / "a")] == [1, 2, 3]
    man.close()


def _final_pools(run_dir):
    from rlkit.infra.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))["trainer_state"]["stages"]["segments"]


@pytest.mark.slow
def test_segments_train_kill9_resume_loses_and_repeats_nothing(tiny_model_dir, tmp_path):
    from rlkit.infra.tracking import read_metrics
    from rlkit.methods.segments import read_segment_log

    def args(name):
        return ["train", str(RECIPE), *tiny_overrides(tiny_model_dir, tmp_path, name), *SEG_OVERRIDES,
                "eval.before=false", "eval.after=false", "checkpoint.export_final=false"]

    ref = _run_cli(args("ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    m_ref, log_ref = read_metrics(tmp_path / "ref"), read_segment_log(tmp_path / "ref")
    assert [m["step"] for m in m_ref] == [r["step"] for r in log_ref] == [1, 2, 3, 4]
    # several segments per response, samples spanning policy versions, pools carried over
    assert max(m["segments/seg_count_max"] for m in m_ref) >= 2
    assert any(m["segments/resumed_samples"] > 0 for m in m_ref)
    assert any(m["segments/version_lag_max"] >= 1 for m in m_ref)
    assert all(m["segments/trained_samples"] == 8 for m in m_ref)
    assert all("actor/pg_loss" in m or m["rollout/kept_groups"] == 0 for m in m_ref)

    crash_dir = tmp_path / "crash"
    crashed = _run_cli(args("crash"), {"RLKIT_KILL_AT_STEP": str(KILL_STEP)})
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert [r["step"] for r in read_segment_log(crash_dir)] == [1, 2, 3]  # step 3 handed out, then killed
    resumed = _run_cli(args("crash"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_res, log_res = read_metrics(crash_dir), read_segment_log(crash_dir)

    # the same samples (ids, tokens, policy versions) reach training at the same steps, once each
    assert log_res == log_ref
    uids = [s["uid"] for r in log_ref for s in r["samples"]]
    assert len(uids) == len(set(uids))
    # and what is still in flight at the end is the same: nothing lost
    pools_ref, pools_res = _final_pools(tmp_path / "ref"), _final_pools(crash_dir)
    assert pools_res == pools_ref
    pooled = [s["uid"] for g in pools_ref["groups"] for s in g["samples"] if not s["handed_out"]]
    assert sorted(uids + pooled) == list(range(pools_ref["next_uid"]))  # every sample accounted for once

    assert [m["step"] for m in m_res] == [1, 2, 3, 4]
    seg_keys = [k for k in m_ref[0] if k.startswith("segments/") and "time" not in k]
    assert_same_metrics(m_ref, m_res, (*DETERMINISTIC, *seg_keys))
