"""TEMPO / P2T (docs/algorithms.md §1): worked example, reference-loop equivalence, edge cases, errors."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import ADVANTAGES, AdvantageInputs, AdvantageOutput, TEMPOParams, build_prefix_tree

# ---------------------------------------------------------------------------------------------
# Straightforward references (test-only): §1.4 loop and §1.3 set formula, on Python lists.


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _group_mu_sd(R: list[float], g: list[int]) -> tuple[float, float]:
    if len(g) == 1:  # docs/algorithms.md §1.5 INFERRED: mean 0, std 1 as GRPO (the reference code gives NaN)
        return 0.0, 1.0
    mu = _mean([R[k] for k in g])
    sd = math.sqrt(sum((R[k] - mu) ** 2 for k in g) / (len(g) - 1))
    return mu, sd


def _token(ids, mask, k: int, t: int, pad_aware: bool):
    return (ids[k][t], mask[k][t] != 0) if pad_aware else ids[k][t]


def reference_loop(R, ids, mask, index, eps=1e-6, norm_std=True, pad_aware=True):
    """The pseudo-code of docs/algorithms.md §1.4, line by line (contiguous masks); rows without a valid token
    count in the group's mean and std but are not part of the tree."""
    B, L = len(ids), len(ids[0])
    A = [[0.0] * L for _ in range(B)]
    groups = defaultdict(list)
    for i in range(B):
        groups[index[i]].append(i)
    for i in range(B):
        g = groups[index[i]]
        mu, sd = _group_mu_sd(R, g)
        prev = [k for k in g if any(mask[k])]  # a row without tokens has no prefix (not in the tree)
        for t in range(L):
            if mask[i][t] == 0:
                break
            tok = _token(ids, mask, i, t, pad_aware)
            branch = [k for k in prev if _token(ids, mask, k, t, pad_aware) == tok]
            delta = _mean([R[k] for k in branch]) - _mean([R[k] for k in prev])
            A[i][t] = (R[i] - mu + delta) / (sd + eps) if norm_std else (R[i] - mu + delta)
            if len(prev) == 1:
                for u in range(t, L):
                    A[i][u] = A[i][t]
                break
            prev = branch
    return [[A[i][t] * mask[i][t] for t in range(L)] for i in range(B)]


def reference_formula(R, ids, mask, index, eps=1e-6, norm_std=True, pad_aware=True):
    """The set definitions of docs/algorithms.md §1.3 at every valid token (any mask, contiguous or not)."""
    B, L = len(ids), len(ids[0])
    A = [[0.0] * L for _ in range(B)]
    for i in range(B):
        g = [k for k in range(B) if index[k] == index[i]]
        mu, sd = _group_mu_sd(R, g)
        for t in range(L):
            if mask[i][t] == 0:
                continue
            key = [_token(ids, mask, i, u, pad_aware) for u in range(t + 1)]
            P = [k for k in g if any(mask[k]) and [_token(ids, mask, k, u, pad_aware) for u in range(t)] == key[:t]]
            C = [k for k in P if _token(ids, mask, k, t, pad_aware) == key[t]]
            delta = _mean([R[k] for k in C]) - _mean([R[k] for k in P])
            A[i][t] = (R[i] - mu + delta) / (sd + eps) if norm_std else (R[i] - mu + delta)
    return A


# ---------------------------------------------------------------------------------------------


def _inputs(ids, mask, rewards, gids, dtype=torch.float64) -> AdvantageInputs:
    return AdvantageInputs(
        rewards_B=torch.tensor(rewards, dtype=dtype),
        group_ids_B=torch.tensor(gids, dtype=torch.long),
        response_mask_BT=torch.tensor(mask, dtype=dtype),
        response_ids_BT=torch.tensor(ids, dtype=torch.long),
    )


def _tempo_out(inp: AdvantageInputs, **kwargs) -> AdvantageOutput:
    out = ADVANTAGES.get("tempo").fn(inp, ADVANTAGES.build_params("tempo", kwargs))
    assert isinstance(out, AdvantageOutput)
    return out


def _tempo(inp: AdvantageInputs, **kwargs) -> torch.Tensor:
    return _tempo_out(inp, **kwargs).advantages_BT


def _assert_extras_untouched(inp: AdvantageInputs) -> None:
    """Diagnostics come back in the AdvantageOutput; the estimator never writes ``inp.extras``."""
    assert "metrics" not in inp.extras and "token_maps" not in inp.extras


# docs/algorithms.md §1.7: G = 3, PAD = 0, L = 5.
EX_IDS = [[5, 7, 9, 2, 0], [5, 7, 8, 3, 2], [5, 6, 4, 2, 0]]
EX_MASK = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
EX_R = [1.0, 0.0, 1.0]


def test_worked_example_spec_1_7() -> None:
    # mu = 2/3, sigma = sqrt(1/3) = 0.577350; raw TD: resp0 [0, -1/6, +1/2, 0], resp1 [0, -1/6, -1/2,
    # 0, 0], resp2 [0, +1/3, 0, 0]; e.g. resp0 t=2: (1 - 2/3 + 1/2) / (0.577350 + 1e-6) = 1.443373.
    inp = _inputs(EX_IDS, EX_MASK, EX_R, [0, 0, 0])
    out = _tempo_out(inp)
    got = out.advantages_BT
    expected = torch.tensor(
        [
            [0.577349, 0.288675, 1.443373, 0.577349, 0.000000],
            [-1.154699, -1.443373, -2.020722, -1.154699, -1.154699],
            [0.577349, 1.154699, 0.577349, 0.577349, 0.000000],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.dtype == torch.float64

    sigma = math.sqrt(1 / 3) + 1e-6
    td = torch.tensor([[0, -1 / 6, 1 / 2, 0, 0], [0, -1 / 6, -1 / 2, 0, 0], [0, 1 / 3, 0, 0, 0]]) / sigma
    _assert_extras_untouched(inp)
    maps = out.token_maps
    torch.testing.assert_close(maps["tempo/td"], td.float(), atol=1e-5, rtol=0)
    branch = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(maps["tempo/branch"], branch)
    # V(s_{t+1}): V([5]) = 2/3, V([5,7]) = 0.5, V([5,6]) = 1, V([5,7,9]) = 1, V([5,7,8]) = 0.
    value = torch.tensor([[2 / 3, 0.5, 1, 1], [2 / 3, 0.5, 0, 0], [2 / 3, 1, 1, 1]], dtype=torch.float64)
    tree = build_prefix_tree(inp.response_ids_BT, inp.response_mask_BT, inp.group_ids_B)
    torch.testing.assert_close(tree.prefix_values(inp.rewards_B)[:, :4], value, atol=1e-12, rtol=0)
    m = out.metrics
    assert m["tempo/branch_frac"] == pytest.approx(5 / 13)  # 5 branch tokens of 13 valid
    # |td| at branch tokens: (1/6 + 1/2 + 1/6 + 1/2 + 1/3) / 5 / sigma
    assert m["tempo/mean_abs_td_branch"] == pytest.approx((5 / 3) / 5 / sigma, abs=1e-6)
    assert m["tempo/branch_per_response"] == pytest.approx(5 / 3)


def test_worked_example_without_std() -> None:
    # A = R - mu + delta: resp1 t=2: 0 - 2/3 - 1/2 = -7/6
    got = _tempo(_inputs(EX_IDS, EX_MASK, EX_R, [4, 4, 4]), norm_by_std=False)
    a, b = 1 / 3, -2 / 3
    expected = torch.tensor(
        [[a, a - 1 / 6, a + 1 / 2, a, 0], [b, b - 1 / 6, b - 1 / 2, b, b], [a, a + 1 / 3, a, a, 0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_grpo_plain_off_branches_and_float32() -> None:
    inp = _inputs(EX_IDS, EX_MASK, EX_R, [0, 0, 0], dtype=torch.float32)
    out = _tempo_out(inp)
    got = out.advantages_BT
    grpo = ADVANTAGES.get("grpo").fn(inp, ADVANTAGES.build_params("grpo"))
    assert got.dtype == torch.float32
    _assert_extras_untouched(inp)
    off = out.token_maps["tempo/branch"] == 0
    torch.testing.assert_close(got[off], grpo[off])  # non-branching tokens: TEMPO == GRPO
    torch.testing.assert_close(grpo[0], torch.tensor([0.577349, 0.577349, 0.577349, 0.577349, 0.0]),
                               atol=1e-5, rtol=0)


def test_padding_never_matches_real_token_unless_quirk() -> None:
    # PAD id == EOS id == 2. resp0 = [5, 7, EOS] R=1, resp1 = [5, 7] + PAD R=0; mu = 0.5.
    ids, mask, R = [[5, 7, 2], [5, 7, 2]], [[1, 1, 1], [1, 1, 0]], [1.0, 0.0]
    # pad-aware: at t=2 resp0 leaves resp1: delta = 1 - 0.5 = 0.5 -> A = 0.5 + 0.5 = 1.0
    got = _tempo(_inputs(ids, mask, R, [0, 0]), norm_by_std=False)
    torch.testing.assert_close(got[0], torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))
    # reference quirk (raw ids): PAD matches EOS, same child, delta = 0
    quirk = _tempo(_inputs(ids, mask, R, [0, 0]), norm_by_std=False, pad_aware=False)
    torch.testing.assert_close(quirk[0], torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    for pad_aware, out in ((True, got), (False, quirk)):
        ref = reference_loop(R, ids, mask, [0, 0], norm_std=False, pad_aware=pad_aware)
        torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_group_size_one_no_nan() -> None:
    # group 9 = {1} alone: mean 0, std 1 -> A = R / (1 + 1e-6); group 3 = rows 0, 2.
    ids = [[1, 2, 3], [1, 2, 3], [1, 4, 0]]
    mask = [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    inp = _inputs(ids, mask, [1.0, 0.7, 0.0], [3, 9, 3])
    got = _tempo(inp)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], torch.full((3,), 0.7 / (1 + 1e-6), dtype=torch.float64))
    zero = _tempo(_inputs(ids, mask, [1.0, 0.7, 0.0], [3, 9, 3]), singleton="zero")
    assert (zero[1] == 0).all()
    torch.testing.assert_close(zero[[0, 2]], got[[0, 2]])


def test_identical_responses_and_equal_rewards() -> None:
    ids = [[3, 1, 4, 1], [3, 1, 4, 1], [3, 1, 4, 1]]
    mask = [[1, 1, 1, 1]] * 3
    inp = _inputs(ids, mask, [1.0, 0.0, 0.0], [0, 0, 0])
    out = _tempo_out(inp)
    got = out.advantages_BT
    grpo = ADVANTAGES.get("grpo").fn(inp, ADVANTAGES.build_params("grpo"))
    torch.testing.assert_close(got, grpo, atol=0, rtol=0)  # TD = 0 all the way
    assert out.metrics["tempo/branch_frac"] == 0.0
    _assert_extras_untouched(inp)
    # all rewards equal: sigma = 0, every V equal -> A = 0 even at branch tokens
    eq = _tempo(_inputs(EX_IDS, EX_MASK, [1.0, 1.0, 1.0], [0, 0, 0]))
    torch.testing.assert_close(eq, torch.zeros(3, 5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_combines_with_other_outcome_advantages() -> None:
    inp = _inputs(EX_IDS, EX_MASK, EX_R, [0, 0, 0])
    raw_td = torch.tensor([[0, -1 / 6, 1 / 2, 0, 0], [0, -1 / 6, -1 / 2, 0, 0], [0, 1 / 3, 0, 0, 0]],
                          dtype=torch.float64)
    rloo = ADVANTAGES.get("rloo").fn(inp, ADVANTAGES.build_params("rloo"))
    got = _tempo(inp, outcome="rloo", norm_by_std=False)
    torch.testing.assert_close(got - rloo, raw_td, atol=1e-9, rtol=0)
    dr = _tempo(inp, outcome="dr_grpo", norm_by_std=False)
    torch.testing.assert_close(dr, _tempo(inp, norm_by_std=False), atol=1e-12, rtol=0)


def test_long_shared_prefixes_cross_chunks() -> None:
    # LCPs far beyond the first comparison chunk (64) and several doublings.
    g = torch.Generator().manual_seed(0)
    T = 1500
    base = torch.randint(1, 50, (T,), generator=g)
    rows, lcps = [], [0, 63, 64, 65, 700, 1499, 1500]
    for c in lcps:
        r = base.clone()
        if c < T:
            r[c] = 50 + len(rows)  # differs from base (and every other row) exactly at c
        rows.append(r)
    ids = torch.stack(rows)
    tree = build_prefix_tree(ids, torch.ones_like(ids), torch.zeros(len(rows), dtype=torch.long))
    for i in range(len(rows)):
        for j in range(len(rows)):
            k = int(tree.members_GM[0, j])
            want = T if i == k else min(lcps[i], lcps[k])
            assert int(tree.lcp_BM[i, j]) == want, (i, k)


@st.composite
def batches(draw):
    """Several groups with arbitrary ids, ragged lengths, shared prefixes, duplicates, size-1 groups."""
    T = draw(st.integers(1, 9))
    vocab = draw(st.integers(1, 3))
    pad = draw(st.integers(0, 1))  # 1 is also a real token: exercises the PAD == token quirk
    n_groups = draw(st.integers(1, 4))
    gid_values = draw(st.lists(st.integers(-1000, 1000), min_size=n_groups, max_size=n_groups, unique=True))
    ids, mask, R, gids = [], [], [], []
    for gid in gid_values:
        size = draw(st.integers(1, 5))
        group_rows = []
        for _ in range(size):
            if group_rows and draw(st.booleans()):  # copy a sibling's prefix, then branch
                parent = draw(st.sampled_from(group_rows))
                cut = draw(st.integers(0, T))
                tail = draw(st.lists(st.integers(1, vocab), min_size=T - cut, max_size=T - cut))
                toks = parent[0][:cut] + tail
            else:
                toks = draw(st.lists(st.integers(1, vocab), min_size=T, max_size=T))
            length = draw(st.integers(0, T))
            group_rows.append((toks, length))
        for toks, length in group_rows:
            ids.append([x if t < length else pad for t, x in enumerate(toks)])
            mask.append([1.0 if t < length else 0.0 for t in range(T)])
            R.append(float(draw(st.sampled_from([0.0, 1.0, 0.5, -0.25]))))
            gids.append(gid)
    perm = draw(st.permutations(range(len(ids))))
    return [ids[p] for p in perm], [mask[p] for p in perm], [R[p] for p in perm], [gids[p] for p in perm]


@settings(max_examples=200, deadline=None)
@given(batch=batches(), norm_std=st.booleans(), pad_aware=st.booleans())
def test_matches_reference_loop(batch, norm_std: bool, pad_aware: bool) -> None:
    ids, mask, R, gids = batch
    got = _tempo(_inputs(ids, mask, R, gids), norm_by_std=norm_std, pad_aware=pad_aware)
    ref = torch.tensor(reference_loop(R, ids, mask, gids, norm_std=norm_std, pad_aware=pad_aware),
                       dtype=torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(batch=batches(), holes=st.lists(st.integers(0, 8), max_size=4), pad_aware=st.booleans())
def test_matches_set_formula_with_noncontiguous_mask(batch, holes, pad_aware: bool) -> None:
    ids, mask, R, gids = batch
    T = len(ids[0])
    for h in holes:  # punch holes (multi-turn loss_mask)
        mask[h % len(ids)][h % T] = 0.0
    got = _tempo(_inputs(ids, mask, R, gids), pad_aware=pad_aware)
    ref = torch.tensor(reference_formula(R, ids, mask, gids, pad_aware=pad_aware), dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)


def test_registry_and_params_errors() -> None:
    assert "tempo" in ADVANTAGES
    p = ADVANTAGES.build_params("tempo")
    assert p == TEMPOParams() and p.eps == 1e-6 and p.norm_by_std and p.pad_aware
    assert p.singleton == "grpo" and p.outcome == "grpo"
    with pytest.raises(ValueError, match="norm_by_std"):
        ADVANTAGES.build_params("tempo", {"norm_by_sd": False})
    with pytest.raises(ValueError, match="eps"):
        TEMPOParams(eps=-1.0)
    with pytest.raises(ValueError, match="singleton"):
        TEMPOParams(singleton="nan")
    with pytest.raises(ValueError, match="unknown advantage estimator 'grp'"):
        TEMPOParams(outcome="grp")
    with pytest.raises(ValueError, match="cannot be 'tempo'"):
        TEMPOParams(outcome="tempo")
    with pytest.raises(ValueError, match="must not set"):
        TEMPOParams(outcome_params={"eps": 1e-8})
    with pytest.raises(ValueError, match="unknown parameter 'bogus'"):
        TEMPOParams(outcome_params={"bogus": 1})


def test_input_errors() -> None:
    inp = _inputs(EX_IDS, EX_MASK, EX_R, [0, 0, 0])
    inp.response_ids_BT = None
    with pytest.raises(ValueError, match="response_ids_BT"):
        _tempo(inp)
    inp.response_ids_BT = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        _tempo(inp)
    with pytest.raises(TypeError, match="integer token ids"):
        build_prefix_tree(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, dtype=torch.long))


def test_outcome_tensor_aliasing_an_input_is_not_modified() -> None:
    from rlkit.algorithms.prefix_tree import _is_fresh

    inp = _inputs(EX_IDS, EX_MASK, EX_R, [0, 0, 0])
    assert not _is_fresh(inp.response_mask_BT, inp)
    assert not _is_fresh(inp.response_mask_BT[1:], inp)  # a view of an input
    inp.extras["cached"] = torch.zeros(3, 5)
    assert not _is_fresh(inp.extras["cached"], inp)
    assert _is_fresh(inp.response_mask_BT * 2, inp)
    before = inp.response_mask_BT.clone()
    _tempo(inp)
    torch.testing.assert_close(inp.response_mask_BT, before, atol=0, rtol=0)


def test_row_without_tokens_is_not_a_branch_at_token_zero() -> None:
    """A row with no valid token (a truncated sample masked by ``overlong_filter``, a sibling context
    row of segments) has no prefix: it must not "diverge" at token 0 from every real response.
    G = 8, one such row, 4 of the other 7 correct. Before the fix every real response, wrong ones
    included, got (4/7 - 4/8) / std = +0.134 on its first token, although all 7 start with token 5."""
    ids = [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 3, 1], [5, 6, 3, 2], [5, 2, 2, 2], [5, 2, 1, 1], [5, 4, 4, 4],
           [5, 6, 7, 8]]  # fmt: skip
    mask = [[1] * 4] * 7 + [[0] * 4]
    R = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    got = _tempo(_inputs(ids, mask, R, [0] * 8))
    grpo = ADVANTAGES.get("grpo").fn(_inputs(ids, mask, R, [0] * 8), ADVANTAGES.build_params("grpo"))
    torch.testing.assert_close(got[:7, 0], grpo[:7, 0], atol=1e-12, rtol=0)  # no TD at token 0
    # Exactly: GRPO over all 8 rewards, plus the TD of the tree of the 7 real responses, over the 8-row std.
    real = _inputs(ids[:7], mask[:7], R[:7], [0] * 7)
    td7 = _tempo(real, norm_by_std=False) - (torch.tensor(R[:7], dtype=torch.float64) - 4 / 7)[:, None]
    sd8 = torch.tensor(R, dtype=torch.float64).std()
    torch.testing.assert_close(got[:7], grpo[:7] + td7 / (sd8 + 1e-6), atol=1e-9, rtol=0)
    assert (got[7] == 0).all()
    # singleton handling follows the real group: a real response alone with context rows is no singleton
    alone = _tempo(_inputs([[5, 6], [0, 0]], [[1, 1], [0, 0]], [1.0, 0.0], [0, 0]), singleton="zero")
    assert alone[0, 0] != 0
