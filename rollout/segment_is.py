"""UloRL importance sampling (spec §5.2) and reward helpers over finished segment samples.

Kept apart from the scheduler in :mod:`rollout.segments`, which re-exports these names.
This module must not import ``rlkit`` (engines are usable on their own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from rollout.segments import SegmentSample

def pad_lists_BT(rows: Sequence[Sequence[float]], T: int | None = None, value: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Right-padded [B, T] tensor of ragged rows (the TrainBatch response layout)."""
    T = max([1, *map(len, rows)]) if T is None else T
    out = torch.full((len(rows), T), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r) > T:
            raise ValueError(f"row {i} has {len(r)} tokens > T={T}")
        if r:
            out[i, : len(r)] = torch.tensor(list(r), dtype=dtype)
    return out


def old_logprobs_BT(samples: Sequence[SegmentSample], importance: Literal["pois", "sais"], *,
                    T: int | None = None, recompute: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Denominator log-probs ``old_logprobs_BT`` [B, T] of the PPO ratio for finished samples.

    - ``"sais"`` (segment-aware): token j is divided by the behaviour policy of its own segment,
      ``π_{θ_old^{f(j)}}``; these are the log-probs each engine recorded when it generated the
      segment, concatenated (zeros on padding).
    - ``"pois"`` (pseudo on-policy, UloRL's choice): every token uses the current pre-update
      policy: ``recompute()`` must return the whole sequences' log-probs under it, i.e. the
      learner's ``compute_logprobs(batch)`` before the update. With one update per step the
      torch learner's ``old_logprobs="auto"`` shortcut (``old = logprobs.detach()``) is the same
      thing, so the ratio starts at exactly 1 (spec §5.2).
    """
    if importance == "sais":
        return pad_lists_BT([s.logprobs for s in samples], T)
    if importance == "pois":
        if recompute is None:
            raise ValueError("POIS recomputes old log-probs with the current policy: pass recompute=")
        out = recompute()
        want = (len(samples), T if T is not None else max([1, *(len(s.token_ids) for s in samples)]))
        if tuple(out.shape) != want:
            raise ValueError(f"recompute() returned shape {tuple(out.shape)}, expected {want}")
        return out
    raise ValueError(f"importance must be 'pois' or 'sais', got {importance!r}")


def learner_old_logprobs_mode(importance: Literal["pois", "sais"], updates_per_step: int) -> str:
    """The ``algorithm.old_logprobs`` setting implementing ``importance`` in the torch learner."""
    if importance == "sais":
        return "rollout"  # TrainBatch.rollout_logprobs_BT = concatenated segment behaviour logprobs
    if importance == "pois":
        return "auto" if updates_per_step == 1 else "recompute"
    raise ValueError(f"importance must be 'pois' or 'sais', got {importance!r}")


def token_versions_BT(samples: Sequence[SegmentSample], T: int | None = None) -> torch.Tensor:
    """long [B, T]: policy version of every token, -1 on padding (a token map for the inspector)."""
    return pad_lists_BT([s.token_versions() for s in samples], T, value=-1, dtype=torch.long)


def apply_truncated_reward(rewards: Sequence[float], samples: Sequence[SegmentSample],
                           truncated_reward: float | None) -> list[float]:
    """Rewards with truncated samples set to ``truncated_reward`` (spec §5.4: 0; None = keep)."""
    if len(rewards) != len(samples):
        raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
    if truncated_reward is None:
        return [float(r) for r in rewards]
    return [float(truncated_reward) if s.truncated else float(r) for r, s in zip(rewards, samples)]
