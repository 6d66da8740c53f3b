"""The padded training batch that flows from rollouts to learners.

Layout: every row is ``[left-padded prompt | right-padded response]`` so all responses start at
column ``P`` (the prompt width). The learner then needs logits only for the last ``T + 1``
positions (``logits_to_keep``), and micro-batches can be trimmed of all-padding columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    input_ids_BS: Tensor  # long [B, P+T]
    attention_mask_BS: Tensor  # long [B, P+T]
    response_mask_BT: Tensor  # float [B, T]; 1 on generated tokens (EOS included)
    prompt_width: int  # P
    advantages_BT: Tensor | None = None  # float [B, T]
    old_logprobs_BT: Tensor | None = None  # pre-update policy (PPO ratio denominator)
    ref_logprobs_BT: Tensor | None = None  # frozen reference (KL)
    rollout_logprobs_BT: Tensor | None = None  # behaviour logprobs reported by the engine
    temperature: float = 1.0
    correct_B: Tensor | None = None  # bool [B]: the accuracy verifier scored the sample correct (>= 1)
    old_entropy_BT: Tensor | None = None  # token entropies under the pre-update policy (learner-filled)

    @property
    def response_ids_BT(self) -> Tensor:
        return self.input_ids_BS[:, self.prompt_width :]

    def __len__(self) -> int:
        return self.input_ids_BS.shape[0]

    def select(self, idx: Tensor | list[int]) -> TrainBatch:
        """Rows ``idx`` with all-padding columns trimmed (left of prompts, right of responses)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        attn = self.attention_mask_BS[idx]
        P = self.prompt_width
        left = int((attn[:, :P].sum(0) == 0).long().cumprod(0).sum().item())  # shared left padding
        resp = self.response_mask_BT[idx]
        used = resp.sum(0) > 0
        T = int(used.nonzero().max().item()) + 1 if used.any() else 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[idx]
                if v.dim() == 2:
                    v = v[:, left : P + T] if f.name.endswith("_BS") else v[:, :T]
            out[f.name] = v
        out["prompt_width"] = P - left
        return TrainBatch(**out)


def pad_to(x_BT: Tensor, T: int, value: float = 0.0) -> Tensor:
    """Right-pad (or crop) the last dim to ``T``."""
    if x_BT.shape[1] >= T:
        return x_BT[:, :T]
    pad = x_BT.new_full((x_BT.shape[0], T - x_BT.shape[1]), value)
    return torch.cat([x_BT, pad], dim=1)


def build_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    rollout_logprobs: list[list[float]] | None = None,
    temperature: float = 1.0,
) -> TrainBatch:
    """Pack token lists into the [left-padded prompt | right-padded response] layout."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    rlp = torch.zeros((B, T), dtype=torch.float32) if rollout_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if r:
            ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P : P + len(r)] = 1
            rmask[i, : len(r)] = 1.0
            if rlp is not None:
                rlp[i, : len(r)] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    return TrainBatch(ids, attn, rmask, P, rollout_logprobs_BT=rlp, temperature=temperature)
