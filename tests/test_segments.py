"""Segment rollout (docs/algorithms.md §5.1-5.2): scheduler invariants, HF-engine consistency, save/restore.

The property tests drive the scheduler with ``ScriptedEngine``, a deterministic stand-in used
*only* for the pure scheduling logic (which sample goes to which pool when): each sample has a
scripted natural length and a scripted token sequence, so a finished sample can be checked
against the exact sequence it must have. The HF tests use the real ``rollout.hf.HFEngine`` on a
tiny random model.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.engine import Completion, RolloutRequest, SamplingParams
from rollout.segments import (
    SegmentConfig,
    SegmentSample,
    SegmentScheduler,
    apply_truncated_reward,
    learner_old_logprobs_mode,
    old_logprobs_BT,
    token_versions_BT,
)

EOS = 2
LEN_CODE = 10_000  # first token of a sample of natural length L >= 2 is LEN_CODE + L


class ScriptedEngine:
    """Deterministic engine for scheduling tests: sample j of prompt ``[pid, ...]`` has natural
    length ``lengths[(pid * G + j) % len(lengths)]`` (EOS included) and token p = f(pid, p).
    The natural length rides in the first token, so a resumed request knows where to stop."""

    def __init__(self, lengths: list[int], group_size: int) -> None:
        self.lengths, self.G = lengths, group_size
        self.policy_version = 0
        self.calls: list[list[RolloutRequest]] = []

    def natural_length(self, pid: int, j: int) -> int:
        return self.lengths[(pid * self.G + j) % len(self.lengths)]

    def token(self, pid: int, L: int, p: int) -> int:
        if p == L - 1:
            return EOS
        return LEN_CODE + L if p == 0 else 3 + (pid * 7 + p) % 97

    def full(self, pid: int, j: int) -> list[int]:
        L = self.natural_length(pid, j)
        return [self.token(pid, L, p) for p in range(L)]

    def generate(self, requests: list[RolloutRequest]) -> list[Completion]:
        self.calls.append(requests)
        out = []
        for r in requests:
            pid = r.prompt_ids[0]
            for j in range(r.params.n):
                if r.resume_ids:
                    L = r.resume_ids[0] - LEN_CODE
                    assert L >= 2, "a resumed sample has a length code"
                else:
                    L = self.natural_length(pid, j)
                start = len(r.resume_ids)
                n = min(r.params.max_new_tokens, L - start)
                toks = [self.token(pid, L, p) for p in range(start, start + n)]
                lps = [-(self.policy_version * 1000 + p) / 1e6 for p in range(start, start + n)]
                reason = "stop" if toks[-1] == EOS else "length"
                out.append(Completion(list(r.prompt_ids), toks, lps, reason, r.group_id,
                                      policy_version=self.policy_version, text=f"<{n}>"))
        return out


class PromptCounter:
    """``prompt_source``: prompt ``[pid, 5, 6]`` with payload ``{"pid": pid}``; state = next pid."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def __call__(self, k: int) -> list[tuple[list[int], dict]]:
        out = [([pid, 5, 6], {"pid": pid}) for pid in range(self.next, self.next + k)]
        self.next += k
        return out


def _make(lengths, G, N, seg_len, max_len, mode, n_engines=1, start=0, topup="constant"):
    eng = ScriptedEngine(lengths, G)
    engines = [eng] * n_engines  # same deterministic engine: sharding must not change anything
    cfg = SegmentConfig(seg_len=seg_len, global_max_len=max_len, group_size=G, train_groups=N,
                        group_mode=mode, seed=7, topup=topup)
    src = PromptCounter(start)
    return eng, src, SegmentScheduler(engines, SamplingParams(temperature=1.0), cfg, src)


def _all_uids(sched: SegmentScheduler) -> set[int]:
    return {s.uid for g in sched.groups.values() for s in g.samples if not s.handed_out}


def _check_sample(eng: ScriptedEngine, s: SegmentSample, pid: int, cfg: SegmentConfig) -> None:
    want = eng.full(pid, s.sample_index)[: cfg.global_max_len]
    assert s.token_ids == want  # prefix continuity across segments
    assert s.truncated == (eng.natural_length(pid, s.sample_index) > cfg.global_max_len)
    assert sum(s.seg_lens) == len(s.token_ids) == len(s.logprobs) == len(s.token_versions())
    assert all(1 <= n <= cfg.seg_len for n in s.seg_lens)
    assert s.seg_versions == sorted(s.seg_versions)
    assert s.num_segments == -(-len(s.token_ids) // cfg.seg_len)  # every round but the last is full
    # logprob of position p encodes the version that generated it
    for p, (lp, v) in enumerate(zip(s.logprobs, s.token_versions())):
        assert lp == pytest.approx(-(v * 1000 + p) / 1e6)


@settings(max_examples=60, deadline=None)
@given(
    G=st.integers(1, 4),
    N=st.integers(1, 3),
    seg_len=st.integers(1, 6),
    max_len=st.integers(1, 24),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    steps=st.integers(1, 6),
    mode=st.sampled_from(["complete", "siblings"]),
    n_engines=st.integers(1, 3),
    topup=st.sampled_from(["constant", "deficit"]),
)
def test_invariants_hypothesis(G, N, seg_len, max_len, lengths, steps, mode, n_engines, topup) -> None:
    eng, src, sched = _make(lengths, G, N, seg_len, max_len, mode, n_engines, topup=topup)
    cfg = sched.cfg
    handed: list[int] = []
    for _ in range(steps):
        rounds_before, calls_before = sched.round, len(eng.calls)
        batch = sched.step()
        eng.policy_version += 1  # "training" after every step
        rounds = sched.round - rounds_before
        assert rounds <= (cfg.max_segments if mode == "complete" else 2 * cfg.max_segments + 1)
        assert batch.metrics.get("segments/rounds", 0.0) == rounds
        # budgets: exactly train_groups groups (complete) or train_groups * G samples (siblings)
        assert len(batch.samples) == N * G
        if mode == "complete":
            assert len(batch.groups) == N
            for g in batch.groups:
                assert sorted(s.sample_index for s in g.samples) == list(range(G))
                assert [s for s in batch.samples if s.group_uid == g.group_uid] == g.samples
        for s in batch.samples:
            assert s.finished and s.handed_out
            _check_sample(eng, s, s.group_uid, cfg)  # PromptCounter gives pid == group uid
        comps = batch.completions()
        assert [c.token_ids for c in comps] == [s.token_ids for s in batch.samples]
        assert [c.truncated for c in comps] == [s.truncated for s in batch.samples]
        assert [c.meta["segment_versions"] for c in comps] == [s.seg_versions for s in batch.samples]
        handed += [s.uid for s in batch.samples]
        # no sample lost or duplicated: every sample ever created is handed out once or pooled
        pooled = _all_uids(sched)
        assert len(handed) == len(set(handed))
        assert not pooled & set(handed)
        assert pooled | set(handed) == set(range(sched._next_uid))
        assert sched.totals["handed_out"] == len(handed)
        # every round sent each unfinished sample exactly once, within its budgets
        for reqs in eng.calls[calls_before:]:
            for r in reqs:
                assert 1 <= r.params.max_new_tokens <= seg_len
                assert len(r.resume_ids) + r.params.max_new_tokens <= max_len
        unfinished = sched.unfinished_samples()
        assert batch.metrics["segments/unfinished_pool"] == len(unfinished)
        assert all(0 < len(s.token_ids) < max_len for s in unfinished)
        assert batch.metrics["segments/unfinished_groups"] <= cfg.inflight_cap
        # the experience pool is exactly the FIFO of what will train next (nothing stranded)
        waiting = sched.experience_samples()
        if mode == "complete":
            complete = [g.group_uid for g in sched.groups.values() if g.complete]
            assert sorted(sched.ready_queue()) == sorted(complete)
            # finished samples of incomplete groups wait in the experience pool for their siblings
            assert {s.group_uid for s in waiting if sched.groups[s.group_uid].complete} == set(complete)
        else:
            assert sorted(sched.ready_queue()) == sorted(s.uid for s in waiting)
    assert src.next * G == sched._next_uid


@settings(max_examples=40, deadline=None)
@given(
    G=st.integers(1, 3),
    N=st.integers(1, 3),
    seg_len=st.integers(1, 5),
    max_len=st.integers(2, 20),
    lengths=st.lists(st.integers(1, 25), min_size=1, max_size=10),
    steps=st.integers(2, 6),
    mode=st.sampled_from(["complete", "siblings"]),
    data=st.data(),
)
def test_save_restore_hypothesis(G, N, seg_len, max_len, lengths, steps, mode, data) -> None:
    """Stop after ``k`` steps, JSON round-trip the state, continue: identical to no interruption."""
    k = data.draw(st.integers(1, steps - 1))

    def trace(batches):
        return [(s.uid, s.group_uid, s.token_ids, s.logprobs, s.seg_versions, s.status)
                for b in batches for s in b.samples]

    eng, _, sched = _make(lengths, G, N, seg_len, max_len, mode)
    ref = []
    for _ in range(steps):
        ref.append(sched.step())
        eng.policy_version += 1

    eng2, src2, sched2 = _make(lengths, G, N, seg_len, max_len, mode)
    got = []
    for _ in range(k):
        got.append(sched2.step())
        eng2.policy_version += 1
    state = json.loads(json.dumps({"sched": sched2.state_dict(), "cursor": src2.next}))
    eng3, _, sched3 = _make(lengths, G, N, seg_len, max_len, mode, start=state["cursor"])
    eng3.policy_version = eng2.policy_version
    sched3.load_state_dict(state["sched"])
    for _ in range(steps - k):
        got.append(sched3.step())
        eng3.policy_version += 1
    assert trace(got) == trace(ref)


def test_worked_schedule_two_segments() -> None:
    """G=2, one group per step, seg_len 4, max 10; natural lengths [3, 6] then [12, 2]."""
    eng, _, sched = _make([3, 6, 12, 2], G=2, N=1, seg_len=4, max_len=10, mode="complete")
    b1 = sched.step()
    # round 1: group 0 -> s0 stops at 3, s1 has 4/6; group 0 incomplete -> top-up group 1:
    # round 2: s1 stops (6), group 1 -> s2 at 4/12, s3 stops at 2.  Ready: group 0.
    assert [s.uid for s in b1.samples] == [0, 1]
    assert [s.seg_lens for s in b1.samples] == [[3], [4, 2]]
    assert b1.metrics["segments/rounds"] == 2 and b1.metrics["segments/new_groups"] == 2
    assert b1.metrics["segments/unfinished_pool"] == 1
    eng.policy_version = 1
    b2 = sched.step()
    # round 3: s2 8/12 + group 2 (lengths [3, 6]); round 4: s2 truncated at 10 -> group 1 ready
    assert [s.uid for s in b2.samples] == [2, 3]
    s2 = b2.samples[0]
    assert s2.truncated and s2.seg_lens == [4, 4, 2] and s2.seg_versions == [0, 1, 1]
    assert b2.metrics["segments/version_lag_max"] == 1.0
    assert b2.metrics["segments/seg_count_frac_3"] == 0.5
    assert apply_truncated_reward([1.0, 1.0], b2.samples, 0.0) == [0.0, 1.0]
    assert apply_truncated_reward([1.0, 1.0], b2.samples, None) == [1.0, 1.0]
    assert [c.finish_reason for c in b2.completions()] == ["length", "stop"]
    v = token_versions_BT(b2.samples)  # s3 stopped in round 2, still under version 0
    assert v[0].tolist() == [0] * 4 + [1] * 6 and v[1].tolist() == [0, 0] + [-1] * 8


def test_siblings_mode_context_rewards() -> None:
    """Sample j of every prompt has length [2, 9][j]; train 2 finished samples per step."""
    eng, _, sched = _make([2, 9], G=2, N=1, seg_len=4, max_len=20, mode="siblings")
    # round 1: group 0 -> uid 0 stops, uid 1 4/9; round 2: group 1 -> uid 2 stops, uid 1 8/9
    b1 = sched.step()
    assert [s.uid for s in b1.samples] == [0, 2] and b1.context == []
    assert [g.group_uid for g in b1.groups] == [0, 1]
    sched.record_rewards(b1.samples, [1.0, 0.0])
    eng.policy_version = 1
    # round 3: uid 1 stops (9), uid 3 8/9, group 2 -> uid 4 stops: train uids 1 and 4
    b2 = sched.step()
    assert [s.uid for s in b2.samples] == [1, 4]
    assert b2.context == [(0, 1.0)]  # uid 1's sibling uid 0 trained earlier with reward 1
    assert 0 not in sched.groups and 1 in sched.groups  # group 0 fully handed out -> dropped
    state = json.loads(json.dumps(sched.state_dict()))
    assert any(s["reward"] == 0.0 for g in state["groups"] for s in g["samples"])  # uid 2's reward kept


def test_importance_sampling_builders() -> None:
    s = SegmentSample(0, 0, 0, token_ids=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], seg_lens=[2, 1],
                      seg_versions=[0, 1], status="stop")
    t = SegmentSample(1, 0, 1, token_ids=[5], logprobs=[-0.5], seg_lens=[1], seg_versions=[1], status="stop")
    sais = old_logprobs_BT([s, t], "sais")
    assert torch.allclose(sais, torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0.0, 0.0]]))
    assert s.segment_logprobs() == [[-0.1, -0.2], [-0.3]]
    pois = torch.full((2, 3), -1.0)
    assert old_logprobs_BT([s, t], "pois", recompute=lambda: pois) is pois
    with pytest.raises(ValueError, match="recompute"):
        old_logprobs_BT([s, t], "pois")
    with pytest.raises(ValueError, match="shape"):
        old_logprobs_BT([s, t], "pois", recompute=lambda: torch.zeros(2, 5))
    with pytest.raises(ValueError, match="importance"):
        old_logprobs_BT([s, t], "tis")  # type: ignore[arg-type]
    assert learner_old_logprobs_mode("sais", 1) == "rollout"
    assert learner_old_logprobs_mode("pois", 1) == "auto"
    assert learner_old_logprobs_mode("pois", 4) == "recompute"


def test_config_and_engine_errors() -> None:
    with pytest.raises(ValueError, match="seg_len"):
        SegmentConfig(seg_len=0, global_max_len=8, group_size=2, train_groups=1)
    with pytest.raises(ValueError, match="max_inflight_groups"):
        SegmentConfig(seg_len=2, global_max_len=8, group_size=2, train_groups=4, max_inflight_groups=2)
    with pytest.raises(ValueError, match="group_mode"):
        SegmentConfig(seg_len=2, global_max_len=8, group_size=2, train_groups=1, group_mode="any")  # type: ignore[arg-type]

    def empty_engine(reqs):
        return [Completion(r.prompt_ids, [], [], "length", r.group_id) for r in reqs for _ in range(r.params.n)]

    cfg = SegmentConfig(seg_len=2, global_max_len=8, group_size=2, train_groups=1)
    sched = SegmentScheduler(empty_engine, SamplingParams(), cfg, PromptCounter())
    with pytest.raises(RuntimeError, match="no token"):
        sched.step()
    sched = SegmentScheduler(ScriptedEngine([5], 2), SamplingParams(), cfg, lambda k: [])
    with pytest.raises(RuntimeError, match="nothing to generate"):
        sched.step()
    with pytest.raises(ValueError, match="format"):
        sched.load_state_dict({"format": 99})


# ---------------------------------------------------------------------- real HF engine

PROMPTS = ["What is 2+3?", "Tom has 5 apples and gets 7 more. How many?", "Hi", "Ann has 12 pens."]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str):
    from rollout.hf import HFEngine

    return HFEngine(tiny_model_dir, max_batch_size=64, seed=0)


def _hf_sched(engine, cfg: SegmentConfig, sampling: SamplingParams, *, bump_every_round: bool):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    cursor = {"next": 0}

    def source(k):
        out = [(ids[i % len(ids)], i) for i in range(cursor["next"], cursor["next"] + k)]
        cursor["next"] += k
        return out

    def generate(reqs):
        if bump_every_round:  # a new policy version per round (weights unchanged)
            engine.load_weights({}, version=engine.policy_version + 1)
        return engine.generate(reqs)

    return SegmentScheduler(generate, sampling, cfg, source), ids, cursor


def test_hf_greedy_segments_equal_full_length(engine) -> None:
    """Greedy: resuming from the prefix every seg_len tokens reproduces one full-length decode."""
    engine.load_weights({}, version=0)
    cfg = SegmentConfig(seg_len=5, global_max_len=23, group_size=2, train_groups=2)
    sched, ids, _ = _hf_sched(engine, cfg, SamplingParams(temperature=0.0), bump_every_round=True)
    samples = []
    for _ in range(3):
        samples += sched.step().samples
    assert max(s.num_segments for s in samples) == cfg.max_segments  # several segments happened
    full = engine.generate([RolloutRequest(p, SamplingParams(max_new_tokens=23, temperature=0.0)) for p in ids])
    by_prompt = {tuple(p): c for p, c in zip(ids, full)}
    groups = {}
    for g_samples in samples:
        groups.setdefault(g_samples.group_uid, []).append(g_samples)
    for gid, ss in groups.items():
        ref = by_prompt[tuple(ids[gid % len(ids)])]
        for s in ss:
            assert s.token_ids == ref.token_ids
            assert s.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
            assert s.truncated == (ref.finish_reason == "length")
            assert engine.tokenizer.decode(s.token_ids, skip_special_tokens=True) == ref.text
            # one segment per consecutive round from the group's first round
            first = s.seg_versions[0]
            assert s.seg_versions == list(range(first, first + s.num_segments))


def test_hf_sais_and_pois_under_changing_weights(engine) -> None:
    """Weights change every round: SAIS log-probs of segment k equal the scores under version k;
    POIS (whole sequence under the current weights, the learner's forward) agrees with SAIS on
    the last segment only."""
    from rlkit.learner.torch_learner import response_logprobs
    from rlkit.loop.batch import build_batch

    base = {k: v.clone() for k, v in engine.model.state_dict().items()}
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    cfg = SegmentConfig(seg_len=4, global_max_len=12, group_size=2, train_groups=2, seed=3)
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    counter = [0]

    def source(k):
        counter[0] += k
        return [(ids[i % 4], i) for i in range(counter[0] - k, counter[0])]

    def generate(reqs):
        v = engine.policy_version + 1
        state = {k: b + 0.05 * torch.randn(b.shape, generator=gen) for k, b in base.items()}
        engine.load_weights(state, version=v)
        snapshots[v] = state
        return engine.generate(reqs)

    try:
        sched = SegmentScheduler(generate, SamplingParams(temperature=1.0, return_entropy=True), cfg, source)
        batch = sched.step()
        cur = engine.policy_version
        multi = [s for s in batch.samples if s.num_segments > 1]
        assert multi, "expected samples spanning several segments"
        for s in batch.samples:
            assert s.entropies is not None and len(s.entropies) == len(s.token_ids)
        # SAIS: each segment scored under the weights of the version that generated it
        for s in multi:
            prompt = next(g.prompt_ids for g in batch.groups if g.group_uid == s.group_uid)
            start = 0
            for n, v in zip(s.seg_lens, s.seg_versions):
                engine.load_weights(snapshots[v], version=v)
                lp = engine.score([prompt + s.token_ids[:start]], [s.token_ids[start : start + n]])[0]
                assert lp == pytest.approx(s.logprobs[start : start + n], abs=1e-4)
                start += n
        # POIS: recompute every token under the current (pre-update) weights with the learner forward
        engine.load_weights(snapshots[cur], version=cur)
        last = [s for s in multi if s.seg_versions[-1] == cur]
        assert last
        prompts = [next(g.prompt_ids for g in batch.groups if g.group_uid == s.group_uid) for s in last]
        tb = build_batch(prompts, [s.token_ids for s in last], pad_id=engine.pad_id)

        def recompute():
            with torch.no_grad():
                return response_logprobs(engine.model, tb, with_entropy=False)[0] * tb.response_mask_BT

        pois = old_logprobs_BT(last, "pois", recompute=recompute)
        sais = old_logprobs_BT(last, "sais")
        for i, s in enumerate(last):
            n_last = s.seg_lens[-1]
            L = len(s.token_ids)
            assert torch.allclose(pois[i, L - n_last : L], sais[i, L - n_last : L], atol=1e-4)
            assert (pois[i, : L - n_last] - sais[i, : L - n_last]).abs().max() > 1e-3
    finally:
        engine.load_weights(base, version=0)


def test_hf_save_restore_mid_run(engine) -> None:
    """Sampling at T=1: 2 steps + JSON checkpoint + fresh scheduler + 2 steps == 4 steps."""
    engine.load_weights({}, version=0)
    cfg = SegmentConfig(seg_len=4, global_max_len=16, group_size=3, train_groups=2, seed=11)
    sampling = SamplingParams(temperature=1.0, top_k=50)

    def run(split: int | None):
        engine.load_weights({}, version=0)
        sched, _, cursor = _hf_sched(engine, cfg, sampling, bump_every_round=False)
        out = []
        for i in range(4):
            if split is not None and i == split:
                state = json.loads(json.dumps({"s": sched.state_dict(), "c": cursor["next"]}))
                pooled = _all_uids(sched)
                sched, _, cursor = _hf_sched(engine, cfg, sampling, bump_every_round=False)
                sched.load_state_dict(state["s"])
                cursor["next"] = state["c"]
                assert _all_uids(sched) == pooled and sched.unfinished_samples()
            out.append(sched.step())
            engine.load_weights({}, version=engine.policy_version + 1)
        return out

    ref, got = run(None), run(2)
    ref_s = [s for b in ref for s in b.samples]
    got_s = [s for b in got for s in b.samples]
    assert [s.uid for s in got_s] == [s.uid for s in ref_s]
    assert len({s.uid for s in got_s}) == len(got_s)  # nothing duplicated
    for a, b in zip(got_s, ref_s):
        assert a.token_ids == b.token_ids and a.seg_versions == b.seg_versions
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
