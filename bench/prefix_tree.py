"""TEMPO advantage: rlkit's P2T prefix tree vs the reference loop of docs/algorithms.md §1.4 (CPU).

Data: ``--groups`` prompt groups x ``--group-size`` responses x ``--length`` tokens. In each group
response 0 is random; every later response copies the prefix of a random earlier response up to a
random branch point (uniform over that response's length), then continues with random tokens, so
the group forms a realistic trie with shared prefixes of random length. Lengths are uniform in
``[length/4, length]`` (padded with id 0), rewards are 0/1.

Timed on the same data:
- ``rlkit``: ``tempo_advantage`` (the registered ``tempo`` estimator) on the whole batch;
- ``ref-torch``: the docs/algorithms.md §1.4 loop as the authors' verl code runs it (torch element indexing and
  ``torch.mean(torch.tensor(list))`` per token);
- ``ref-lists``: the same loop on Python lists (the fastest form of the loop).
The references are O(B * L * G) Python and too slow at full size, so each runs on the first
``--ref-groups`` groups and its time is extrapolated linearly in the number of groups (the loop's
cost is a sum over groups); the output says so. Outputs are checked to agree on that subset.

    .venv/bin/python bench/prefix_tree.py                                 # 64 x 8 x 8192, ~1 min
    .venv/bin/python bench/prefix_tree.py --groups 16 --length 2048 --ref-groups 16 --ref-torch-groups 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlkit.algorithms import AdvantageInputs, TEMPOParams, tempo_advantage  # noqa: E402

PAD = 0


def make_batch(groups: int, size: int, length: int, vocab: int, seed: int) -> AdvantageInputs:
    """Groups of responses forming tries with random-length shared prefixes (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    B = groups * size
    ids = torch.full((B, length), PAD, dtype=torch.long)
    lengths = torch.randint(max(1, length // 4), length + 1, (B,), generator=g)
    for gi in range(groups):
        for j in range(size):
            row = gi * size + j
            n = int(lengths[row])
            toks = torch.randint(1, vocab, (n,), generator=g)
            if j > 0:
                parent = gi * size + int(torch.randint(0, j, (1,), generator=g))
                cut = min(n, int(torch.randint(0, int(lengths[parent]) + 1, (1,), generator=g)))
                toks[:cut] = ids[parent, :cut]
            ids[row, :n] = toks
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    gids = torch.arange(groups).repeat_interleave(size) * 7 + 3  # arbitrary ids
    return AdvantageInputs(rewards_B=rewards, group_ids_B=gids, response_mask_BT=mask, response_ids_BT=ids)


def subset(inp: AdvantageInputs, n_rows: int) -> AdvantageInputs:
    return AdvantageInputs(
        rewards_B=inp.rewards_B[:n_rows], group_ids_B=inp.group_ids_B[:n_rows],
        response_mask_BT=inp.response_mask_BT[:n_rows], response_ids_BT=inp.response_ids_BT[:n_rows],
    )


def reference_torch(R, responses, mask, index, eps=1e-6):
    """docs/algorithms.md §1.4 on tensors, element by element, as the authors' verl code does."""
    B, L = responses.shape
    A = torch.zeros(B, L)
    groups = defaultdict(list)
    for i in range(B):
        groups[int(index[i])].append(i)
    for i in range(B):
        g = groups[int(index[i])]
        scores = [R[k] for k in g]
        mu, sd = torch.mean(torch.tensor(scores)), torch.std(torch.tensor(scores))
        prev = list(g)
        for t in range(L):
            if mask[i, t].item() == 0:
                break
            branch = [k for k in prev if responses[i, t] == responses[k, t]]
            delta = torch.mean(torch.tensor([R[k] for k in branch])) - torch.mean(torch.tensor([R[k] for k in prev]))
            A[i, t] = (R[i] - mu + delta) / (sd + eps)
            if len(prev) == 1:
                A[i, t:] = A[i, t]
                break
            prev = branch
    return A * mask


def reference_lists(R, responses, mask, index, eps=1e-6):
    """docs/algorithms.md §1.4 on Python lists."""
    R, ids, m, index = R.tolist(), responses.tolist(), mask.tolist(), index.tolist()
    B, L = len(ids), len(ids[0])
    A = [[0.0] * L for _ in range(B)]
    groups = defaultdict(list)
    for i in range(B):
        groups[index[i]].append(i)
    for i in range(B):
        g = groups[index[i]]
        mu = sum(R[k] for k in g) / len(g)
        sd = (sum((R[k] - mu) ** 2 for k in g) / (len(g) - 1)) ** 0.5
        prev, row, out = list(g), ids[i], A[i]
        for t in range(L):
            if m[i][t] == 0:
                break
            tok = row[t]
            branch = [k for k in prev if ids[k][t] == tok]
            delta = sum(R[k] for k in branch) / len(branch) - sum(R[k] for k in prev) / len(prev)
            out[t] = (R[i] - mu + delta) / (sd + eps)
            if len(prev) == 1:
                out[t:] = [out[t]] * (L - t)
                break
            prev = branch
    return torch.tensor(A) * mask


def time_it(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ref-groups", type=int, default=64, help="groups the list reference runs on")
    p.add_argument("--ref-torch-groups", type=int, default=1, help="groups the torch reference runs on")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of rlkit (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the references use one core)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    inp = make_batch(a.groups, a.group_size, a.length, a.vocab, a.seed)
    B = a.groups * a.group_size
    params = TEMPOParams()  # pad-aware; id 0 is never a real token, so the raw-id reference agrees
    tempo_advantage(subset(inp, min(B, 2 * a.group_size)), params)  # warm-up
    t_rlkit = time_it(lambda: tempo_advantage(inp, params), a.repeats)
    out = tempo_advantage(inp, params)
    full, branch_frac = out.advantages_BT, out.metrics["tempo/branch_frac"]
    print(f"batch: {a.groups} groups x {a.group_size} responses x {a.length} tokens "
          f"({int(inp.response_mask_BT.sum())} valid tokens, branch tokens {branch_frac:.2e} of them), "
          f"torch threads {a.threads}")
    print(f"rlkit tempo_advantage (P2T, vectorised): {t_rlkit * 1e3:.1f} ms (median of {a.repeats})")
    result = {"groups": a.groups, "group_size": a.group_size, "length": a.length, "threads": a.threads,
              "rlkit_s": t_rlkit}

    for name, fn, n_groups in (("ref-lists", reference_lists, a.ref_groups),
                               ("ref-torch", reference_torch, a.ref_torch_groups)):
        n_groups = min(n_groups, a.groups)
        if n_groups <= 0:
            continue
        sub = subset(inp, n_groups * a.group_size)
        t0 = time.perf_counter()
        ref = fn(sub.rewards_B, sub.response_ids_BT, sub.response_mask_BT, sub.group_ids_B)
        t_sub = time.perf_counter() - t0
        ours = full[: n_groups * a.group_size]
        max_err = float((ours - ref).abs().max())
        agree = torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
        t_full = t_sub * a.groups / n_groups
        how = "measured" if n_groups == a.groups else (
            f"{t_sub:.2f} s measured on {n_groups}/{a.groups} groups, extrapolated linearly")
        print(f"{name} (docs/algorithms.md §1.4 loop): {t_full:.2f} s for the full batch ({how}); "
              f"speed-up x{t_full / t_rlkit:.0f}; outputs agree on the subset: {agree} (max |diff| {max_err:.1e})")
        result[f"{name}_s"] = t_full
        result[f"{name}_measured_groups"] = n_groups
        result[f"{name}_speedup"] = t_full / t_rlkit
        result[f"{name}_agree"] = agree
        if not agree:
            raise SystemExit(f"{name}: outputs differ from rlkit (max |diff| {max_err})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
