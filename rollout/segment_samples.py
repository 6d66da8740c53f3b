"""Segment samples (the versioned sample store of a segment rollout), UloRL importance sampling
(docs/algorithms.md §5.2) and reward helpers over finished samples.

Every segment of a sample records the policy version that sampled it and its behaviour log-probs.
Kept apart from the scheduler in :mod:`rollout.segments`, which re-exports these names.
This module must not import ``rlkit`` (engines are usable on their own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rollout.engine import Completion


@dataclass
class SegmentSample:
    """One response, possibly spanning several segments (each from one policy version).

    ``token_ids``, ``logprobs`` (behaviour, per token) and ``entropies`` are the concatenation of
    the segments; ``seg_lens[k]``/``seg_versions[k]``/``seg_texts[k]`` describe segment k.
    ``status``: ``"running"`` | ``"stop"`` | ``"truncated"``.
    """

    uid: int
    group_uid: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] | None = None
    seg_lens: list[int] = field(default_factory=list)
    seg_versions: list[int] = field(default_factory=list)
    seg_texts: list[str] = field(default_factory=list)
    status: str = "running"
    finished_round: int = -1
    handed_out: bool = False
    reward: float | None = None

    @property
    def finished(self) -> bool:
        return self.status != "running"

    @property
    def truncated(self) -> bool:
        return self.status == "truncated"

    @property
    def num_segments(self) -> int:
        return len(self.seg_lens)

    def token_versions(self) -> list[int]:
        """Policy version that produced each token (len == len(token_ids))."""
        return [v for n, v in zip(self.seg_lens, self.seg_versions) for _ in range(n)]

    def segment_logprobs(self) -> list[list[float]]:
        """Behaviour log-probs split by segment (SAIS denominators, docs/algorithms.md §5.2)."""
        out, start = [], 0
        for n in self.seg_lens:
            out.append(self.logprobs[start : start + n])
            start += n
        return out

    def append(self, c: Completion, round_idx: int, max_len: int) -> None:
        """Add one generated segment and update ``status``."""
        if self.finished:
            raise RuntimeError(f"sample {self.uid} is finished; it cannot take another segment")
        if not c.token_ids:
            raise RuntimeError(f"engine returned no token for sample {self.uid} (finish_reason "
                               f"{c.finish_reason!r}); a segment must make progress")
        if len(c.logprobs) != len(c.token_ids):
            raise ValueError(f"sample {self.uid}: {len(c.logprobs)} logprobs for {len(c.token_ids)} tokens")
        # entropies are kept only while every segment came with them
        first = not self.token_ids
        if c.entropies is None or (self.entropies is None and not first):
            self.entropies = None
        else:
            self.entropies = (self.entropies or []) + [float(x) for x in c.entropies]
        self.token_ids += list(c.token_ids)
        self.logprobs += [float(x) for x in c.logprobs]
        self.seg_lens.append(len(c.token_ids))
        self.seg_versions.append(int(c.policy_version))
        self.seg_texts.append(c.text)
        if len(self.token_ids) > max_len:
            raise RuntimeError(f"sample {self.uid} has {len(self.token_ids)} tokens > global_max_len {max_len}")
        if c.finish_reason == "stop":
            self.status, self.finished_round = "stop", round_idx
        elif len(self.token_ids) == max_len:
            self.status, self.finished_round = "truncated", round_idx

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SAMPLE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentSample:
        return cls(**{k: d[k] for k in _SAMPLE_FIELDS})


_SAMPLE_FIELDS = ("uid", "group_uid", "sample_index", "token_ids", "logprobs", "entropies", "seg_lens",
                  "seg_versions", "seg_texts", "status", "finished_round", "handed_out", "reward")


@dataclass
class SegmentGroup:
    """The G samples of one prompt. ``payload`` is the caller's (JSON-serialisable) row handle."""

    group_uid: int
    prompt_ids: list[int]
    payload: Any
    samples: list[SegmentSample]
    created_round: int

    @property
    def complete(self) -> bool:
        return all(s.finished for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"group_uid": self.group_uid, "prompt_ids": self.prompt_ids, "payload": self.payload,
                "created_round": self.created_round, "samples": [s.to_dict() for s in self.samples]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentGroup:
        return cls(d["group_uid"], list(d["prompt_ids"]), d["payload"],
                   [SegmentSample.from_dict(s) for s in d["samples"]], d["created_round"])


@dataclass
class SegmentBatch:
    """What one step hands to training.

    Attributes:
        samples: finished samples to train on, grouped by prompt group (group order = FIFO).
        groups: their groups (complete mode: every sample of each group is in ``samples``).
        context: siblings mode only: ``(group_uid, reward)`` of siblings trained in earlier steps,
            to include in the group statistics (not in the loss).
        metrics: ``segments/*`` scalars of this step.
    """

    samples: list[SegmentSample]
    groups: list[SegmentGroup]
    context: list[tuple[int, float]]
    metrics: dict[str, float]

    def completions(self, decode: Callable[[list[int]], str] | None = None) -> list[Completion]:
        """One :class:`Completion` per sample (full token/logprob lists), ``samples`` order.

        ``finish_reason`` is ``"stop"`` or ``"length"`` (truncated at ``global_max_len``);
        ``policy_version`` is the version of the last segment; ``meta`` carries ``sample_index``,
        ``segment_uid``, ``segment_lengths``, ``segment_versions``. ``text`` is
        ``decode(token_ids)`` if given, else the segment texts joined.
        """
        by_gid = {g.group_uid: g for g in self.groups}
        return [to_completion(s, by_gid[s.group_uid].prompt_ids, decode) for s in self.samples]


def to_completion(s: SegmentSample, prompt_ids: list[int],
                  decode: Callable[[list[int]], str] | None = None) -> Completion:
    """A finished :class:`SegmentSample` as an engine-style :class:`Completion`."""
    return Completion(
        prompt_ids=list(prompt_ids), token_ids=list(s.token_ids), logprobs=list(s.logprobs),
        finish_reason="length" if s.truncated else "stop", group_id=s.group_uid,
        entropies=None if s.entropies is None else list(s.entropies),
        text=decode(s.token_ids) if decode else "".join(s.seg_texts),
        policy_version=s.seg_versions[-1] if s.seg_versions else 0,
        meta={"sample_index": s.sample_index, "segment_uid": s.uid, "segment_lengths": list(s.seg_lens),
              "segment_versions": list(s.seg_versions)},
    )


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
      thing, so the ratio starts at exactly 1 (docs/algorithms.md §5.2).
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
    """Rewards with truncated samples set to ``truncated_reward`` (docs/algorithms.md §5.4: 0; None = keep)."""
    if len(rewards) != len(samples):
        raise ValueError(f"{len(rewards)} rewards for {len(samples)} samples")
    if truncated_reward is None:
        return [float(r) for r in rewards]
    return [float(truncated_reward) if s.truncated else float(r) for r, s in zip(rewards, samples)]
