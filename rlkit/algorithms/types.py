"""Input dataclasses: one signature per registry.

Every advantage estimator is called as ``fn(AdvantageInputs, params) -> advantages_BT`` and every
policy loss as ``fn(PolicyLossInputs, params) -> (loss_BT, metrics)``, so the trainer never
branches on a method's name. Method-specific tensors (step potentials, tree ids, ...) travel in
``AdvantageInputs.extras``. Shape notation follows docs/algorithms.md §0: ``B`` responses, ``T`` padded length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class AdvantageInputs:
    """Inputs of every advantage estimator.

    Attributes:
        rewards_B: float [B], scalar outcome reward per response (docs/algorithms.md §0 ``R_i``).
        group_ids_B: long [B], prompt-group index (``uid``); arbitrary integers.
        response_mask_BT: float [B, T], 1 for valid response tokens (EOS included), 0 on padding.
        response_ids_BT: long [B, T], response token ids, for token-aware estimators.
        entropy_BT: float [B, T], per-token policy entropy, for entropy-aware estimators.
        extras: method-specific tensors, keyed by name.
    """

    rewards_B: Tensor
    group_ids_B: Tensor
    response_mask_BT: Tensor
    response_ids_BT: Tensor | None = None
    entropy_BT: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rewards_B.dim() != 1:
            raise ValueError(f"rewards_B must be 1-D [B], got shape {tuple(self.rewards_B.shape)}")
        B = self.rewards_B.shape[0]
        if tuple(self.group_ids_B.shape) != (B,):
            raise ValueError(f"group_ids_B must have shape ({B},), got {tuple(self.group_ids_B.shape)}")
        if self.response_mask_BT.dim() != 2 or self.response_mask_BT.shape[0] != B:
            raise ValueError(
                f"response_mask_BT must have shape ({B}, T), got {tuple(self.response_mask_BT.shape)}"
            )


@dataclass
class AdvantageOutput:
    """What an estimator with diagnostics returns (a plain estimator may return the tensor alone).

    Attributes:
        advantages_BT: float [B, T], per-token advantages, zero on padding.
        metrics: scalars logged each step under their names (e.g. ``tempo/branch_frac``).
        token_maps: float [B, T] per-token maps shown by ``rlkit inspect`` (e.g. ``tempo/td``).
    """

    advantages_BT: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    token_maps: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def of(result: Tensor | AdvantageOutput) -> AdvantageOutput:
        """Any estimator's return value as an :class:`AdvantageOutput`."""
        return result if isinstance(result, AdvantageOutput) else AdvantageOutput(result)


@dataclass
class PolicyLossInputs:
    """Inputs of every policy loss; all tensors are [B, T].

    Attributes:
        logprobs_BT: log-probs of the sampled tokens under the current policy (requires grad).
        old_logprobs_BT: log-probs under the behaviour / pre-update policy.
        advantages_BT: per-token advantages (zeros on padding).
        response_mask_BT: 1 for valid response tokens, 0 on padding.
        entropy_BT: per-token entropy, for entropy-aware losses.
    """

    logprobs_BT: Tensor
    old_logprobs_BT: Tensor
    advantages_BT: Tensor
    response_mask_BT: Tensor
    entropy_BT: Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.logprobs_BT.shape)
        if len(shape) != 2:
            raise ValueError(f"logprobs_BT must be 2-D [B, T], got shape {shape}")
        for name in ("old_logprobs_BT", "advantages_BT", "response_mask_BT"):
            other = tuple(getattr(self, name).shape)
            if other != shape:
                raise ValueError(f"{name} must have shape {shape} like logprobs_BT, got {other}")
