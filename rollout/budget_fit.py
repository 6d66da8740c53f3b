"""Training the budget-guidance predictor (docs/algorithms.md §4.3): features from the frozen LM, the Gamma NLL
loss, the fit loop and its metrics. The model and the guided sampling live in :mod:`rollout.budget`;
the data-generating command in ``rlkit.tools.budget_train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rollout.budget import GammaPredictor, encode_length, gamma_mode_length, gamma_nll


@dataclass
class BudgetData:
    """Training positions: hidden states, label token and remaining length L (§4.3).

    ``features_MLD`` (M, N+1, d_model), ``tokens_M`` (M,) the actual next token,
    ``lengths_M`` (M,) float L >= 1, ``seq_M`` (M,) which sequence a position came from.
    """

    features_MLD: torch.Tensor
    tokens_M: torch.Tensor
    lengths_M: torch.Tensor
    seq_M: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens_M.numel())

    def subset(self, seqs: Sequence[int]) -> BudgetData:
        keep = torch.isin(self.seq_M, torch.as_tensor(list(seqs), dtype=torch.long))
        return BudgetData(self.features_MLD[keep], self.tokens_M[keep], self.lengths_M[keep], self.seq_M[keep])


@torch.no_grad()
def extract_features(
    model: nn.Module, sequences: Sequence[Sequence[int]], regions: Sequence[tuple[int, int]], *,
    batch_size: int = 8, feature_dtype: torch.dtype = torch.bfloat16, pad_id: int = 0,
) -> BudgetData:
    """Run the frozen LM over ``sequences`` and keep the thinking positions (§4.3).

    ``regions[i] = (first, last)``: token indices of sequence ``i`` delimiting the thinking
    region (from the ``<think>`` token, or the first response token, through ``</think>``, or
    EOS). Position ``p`` (predicting token ``p + 1``) is kept for ``p + 1`` in ``[first, last]``
    with target ``L_p = last - (p + 1) + 1``: 1 at the position whose next token ends the region.
    """
    if len(sequences) != len(regions):
        raise ValueError(f"{len(sequences)} sequences but {len(regions)} regions")
    for i, (seq, (first, last)) in enumerate(zip(sequences, regions)):
        if not 1 <= first <= last < len(seq):
            raise ValueError(f"sequence {i}: region ({first}, {last}) must satisfy 1 <= first <= last < {len(seq)}")
    dev = next(model.parameters()).device
    feats, toks, lens, seq_ids = [], [], [], []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        S = max(regions[i][1] for i in chunk)  # positions past the region end are not needed
        ids = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), S), dtype=torch.long)
        for r, i in enumerate(chunk):
            n = min(len(sequences[i]), S)
            ids[r, :n] = torch.tensor(list(sequences[i][:n]), dtype=torch.long)
            attn[r, :n] = 1
        out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True, use_cache=False)
        hs_BSLD = torch.stack(out.hidden_states, dim=2)
        for r, i in enumerate(chunk):
            first, last = regions[i]
            pos = torch.arange(first - 1, last)
            feats.append(hs_BSLD[r, pos.to(dev)].to("cpu", feature_dtype))
            toks.append(torch.tensor(list(sequences[i][first : last + 1]), dtype=torch.long))
            lens.append((last - pos).float())
            seq_ids.append(torch.full((pos.numel(),), i, dtype=torch.long))
    if not feats:
        raise ValueError("no sequences to extract features from")
    return BudgetData(torch.cat(feats), torch.cat(toks), torch.cat(lens), torch.cat(seq_ids))


def predictor_loss(predictor: GammaPredictor, data: BudgetData, index: torch.Tensor | None = None) -> torch.Tensor:
    """``nanmean_p NLL_p`` of §4.3 over ``data`` (or the positions ``index``)."""
    feats, toks, lens = data.features_MLD, data.tokens_M, data.lengths_M
    if index is not None:
        feats, toks, lens = feats[index], toks[index], lens[index]
    dev = predictor.alpha_head.weight.device
    alpha, lam = predictor.params_at(feats.to(dev), toks.to(dev))
    return torch.nanmean(gamma_nll(alpha, lam, encode_length(lens.to(dev))))


@torch.no_grad()
def evaluate_predictor(predictor: GammaPredictor, data: BudgetData, batch_positions: int = 2048) -> dict[str, float]:
    """``{"nll", "mode_mae_tokens"}``: mean NLL and mean |decoded mode - L| over ``data``."""
    was_training = predictor.training
    predictor.eval()
    nll_sum, mae_sum, count = 0.0, 0.0, 0
    dev = predictor.alpha_head.weight.device
    for s in range(0, len(data), batch_positions):
        idx = torch.arange(s, min(s + batch_positions, len(data)))
        alpha, lam = predictor.params_at(data.features_MLD[idx].to(dev), data.tokens_M[idx].to(dev))
        lens = data.lengths_M[idx].to(dev)
        nll = gamma_nll(alpha, lam, encode_length(lens))
        ok = ~torch.isnan(nll)
        nll_sum += float(nll[ok].sum())
        mae_sum += float((gamma_mode_length(alpha, lam) - lens).abs()[ok].sum())
        count += int(ok.sum())
    predictor.train(was_training)
    return {"nll": nll_sum / max(count, 1), "mode_mae_tokens": mae_sum / max(count, 1)}


@dataclass(frozen=True)
class FitParams:
    """Optimiser/schedule of §4.3 (DS-7B.yaml): AdamW, lr 1e-4, constant with 5% warm-up.

    One step = ``batch_sequences`` sequences (the reference: 1 per device). ``epochs`` default
    is larger than the reference's 1 because self-generated data sets are small.
    """

    epochs: int = 3
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    batch_sequences: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42


def fit_predictor(
    predictor: GammaPredictor, data: BudgetData, params: FitParams = FitParams(),
    log: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train ``predictor`` in place on ``data``; returns the per-step losses.

    ``log(step, total_steps, loss)`` is called every step (progress bars, metrics).
    """
    if len(data) == 0:
        raise ValueError("no training positions")
    seqs = torch.unique(data.seq_M)
    steps_per_epoch = math.ceil(seqs.numel() / params.batch_sequences)
    total = steps_per_epoch * params.epochs
    warmup = math.ceil(params.warmup_ratio * total)
    opt = torch.optim.AdamW([p for p in predictor.parameters() if p.requires_grad], lr=params.lr,
                            weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    gen = torch.Generator().manual_seed(params.seed)
    # positions grouped by sequence once, so a step gathers its sequences' rows directly
    order = torch.argsort(data.seq_M, stable=True)
    counts = torch.bincount(data.seq_M)[seqs]
    starts = torch.cumsum(counts, 0) - counts
    rows_of = {int(s): order[int(a) : int(a) + int(c)] for s, a, c in zip(seqs, starts, counts)}
    predictor.train()
    losses: list[float] = []
    step = 0
    for _epoch in range(params.epochs):
        perm = seqs[torch.randperm(seqs.numel(), generator=gen)].tolist()
        for b in range(0, len(perm), params.batch_sequences):
            idx = torch.cat([rows_of[s] for s in perm[b : b + params.batch_sequences]])
            loss = predictor_loss(predictor, data, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(predictor.parameters(), params.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if log is not None:
                log(step, total, losses[-1])
    predictor.eval()
    return losses
