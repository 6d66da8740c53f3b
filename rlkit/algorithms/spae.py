"""SPAE: Step Potential Advantage Estimation (docs/algorithms.md §2) — step segmentation and the advantage math.

Pure functions, torch only (no tokenizer, no engine). Probing the policy at step boundaries, which
needs an engine, lives in :mod:`rlkit.methods.step_probes`; it fills the ``AdvantageInputs.extras`` keys read
by the ``spae`` estimator:

- ``spae_boundaries_BK``: long [B, K], response-relative positions of the step-boundary tokens,
  strictly increasing per row, padded with -1 (K = max steps in the batch, may be 0);
- ``spae_acc_BK``: float [B, K], probe correctness Acc_{i,k} in [0, 1] (any value on padding);
- ``spae_conf_BK``: float [B, K], probe confidence Conf_{i,k} in (0, 1] (any value on padding).

Step k of response i is the tokens after boundary k-1 up to and including boundary k (§2.1).
Tokens after the last boundary ("tail": rest of the thinking, ``</think>``, the summary) use the
saturation factor with C_sat counted over all K steps and no shaping (g = 0) [INFERRED, §2.4];
a response with no boundary gets its plain group advantage before standardisation.

Choices the spec marks [INFERRED], exposed in :class:`SPAEParams`: min-max and E_B scope over all
steps of the batch (``shaping_scope``), population std over valid tokens for the final
standardisation (``std_unbiased``), ε_sat = 0.9. Further implementation choices, all documented:
a step counts only if its boundary token is a valid (unmasked) token, so responses removed by the
overlong filter drop out of the batch statistics; a degenerate min-max (all ΔΦ equal) gives
ΔΦ̃ = 0 and therefore g = 0; a singleton group uses a zero baseline (as ``dr_grpo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from rlkit.algorithms.groups import group_stats
from rlkit.algorithms.registry import register_advantage
from rlkit.algorithms.types import AdvantageInputs, AdvantageOutput

PROBE_STRING = "**Final Answer**\n\\boxed{"  # p_probe (§2.2)
STEP_SUFFIXES: tuple[str, ...] = (".\n\n",)  # boundary rule (§2.1)
THINK_END = "</think>"

EXTRA_BOUNDARIES = "spae_boundaries_BK"
EXTRA_ACC = "spae_acc_BK"
EXTRA_CONF = "spae_conf_BK"


# ---------------------------------------------------------------------------------------------
# §2.1 step segmentation
# ---------------------------------------------------------------------------------------------


def think_region_length(token_texts: Sequence[str], think_end: str | None = THINK_END) -> int:
    """Number of leading tokens inside the thinking region (§2.1).

    The region ends before the token in which the first ``think_end`` starts; without
    ``think_end`` in the text (or with ``think_end=None``) the whole response is searched.
    """
    n = len(token_texts)
    if not think_end:
        return n
    pos = "".join(token_texts).find(think_end)
    if pos < 0:
        return n
    end = 0
    for j, text in enumerate(token_texts):
        end += len(text)
        if end > pos:
            return j
    return n


def find_step_boundaries(
    token_texts: Sequence[str],
    *,
    suffixes: Sequence[str] = STEP_SUFFIXES,
    think_end: str | None = THINK_END,
    match: Literal["token", "text"] = "token",
    max_steps: int | None = None,
) -> list[int]:
    """Positions of step-boundary tokens in one response (§2.1).

    Args:
        token_texts: the response decoded token by token (``len == number of tokens``).
        suffixes: a token is a boundary if its text ends with one of these (default ``".\\n\\n"``).
        think_end: only tokens before the first occurrence of this tag are searched (None: all).
        match: ``"token"`` (spec): the token's own text ends with a suffix; ``"text"``
            [INFERRED option]: the decoded text up to and including the (non-empty) token does, for
            tokenizers that split ``"."`` from ``"\\n\\n"`` (GPT-2-style pre-tokenisation).
        max_steps: keep at most the first ``max_steps`` boundaries (probe cost cap) [INFERRED];
            None keeps all.

    Returns:
        Strictly increasing token positions (0-based, response-relative).

    >>> find_step_boundaries(["A", ".\\n\\n", "B", ".\\n\\n", "</think>", "C", ".\\n\\n"])
    [1, 3]
    """
    suffixes = tuple(suffixes)
    if not suffixes or any(not s for s in suffixes):
        raise ValueError(f"suffixes must be non-empty strings, got {suffixes!r}")
    if match not in ("token", "text"):
        raise ValueError(f"match must be 'token' or 'text', got {match!r}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
    limit = think_region_length(token_texts, think_end)
    width = max(len(s) for s in suffixes)
    out: list[int] = []
    tail = ""
    for j in range(limit):
        if max_steps is not None and len(out) >= max_steps:
            break
        text = token_texts[j]
        if match == "text":
            tail = (tail + text)[-width:]
            hit = bool(text) and tail.endswith(suffixes)
        else:
            hit = text.endswith(suffixes)
        if hit:
            out.append(j)
    return out


def pad_steps(values: Sequence[Sequence[float | int]], fill: float | int, dtype: torch.dtype) -> Tensor:
    """Ragged per-response step lists -> [B, K] tensor padded with ``fill`` (K = longest row)."""
    K = max((len(v) for v in values), default=0)
    out = torch.full((len(values), K), fill, dtype=dtype)
    for i, v in enumerate(values):
        if len(v):
            out[i, : len(v)] = torch.tensor(list(v), dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------
# §2.3 step potential, §2.4 saturation and shaping
# ---------------------------------------------------------------------------------------------


def step_potential(acc: Tensor, conf: Tensor) -> Tensor:
    """Φ = 1.5·Acc·Conf + 0.5·Acc − Conf ∈ [-1, 1] (§2.3), elementwise."""
    return 1.5 * acc * conf + 0.5 * acc - conf


def potential_differences(phi_BK: Tensor, step_mask_BK: Tensor) -> Tensor:
    """ΔΦ_{i,k} = Φ_{i,k} − Φ_{i,k−1}, ΔΦ_{i,1} = 0 (§2.3); 0 on padded steps. [B, K]."""
    dphi_BK = torch.zeros_like(phi_BK)
    if phi_BK.shape[1] > 1:
        dphi_BK[:, 1:] = phi_BK[:, 1:] - phi_BK[:, :-1]
    return dphi_BK * step_mask_BK


def saturation_counts(phi_BK: Tensor, step_mask_BK: Tensor, eps_sat: float) -> tuple[Tensor, Tensor]:
    """C^sat_{i,k} = #{t < k : Φ_{i,t} > ε_sat} (exclusive cumsum, §2.4).

    Returns ``(csat_BK, total_B)``: per-step counts (0 on padded steps) and the count over all
    K steps of each response (used for tail tokens).
    """
    sat_BK = ((phi_BK > eps_sat) & step_mask_BK.bool()).to(phi_BK.dtype)
    incl_BK = sat_BK.cumsum(1)
    return (incl_BK - sat_BK) * step_mask_BK, sat_BK.sum(1)


def saturation_factor(csat: Tensor, alpha: float) -> Tensor:
    """f = 1 − α (1 − exp(−C^sat)) (§2.4), elementwise."""
    return 1.0 - alpha * (1.0 - torch.exp(-csat))


def difference_shaping(dphi_BK: Tensor, step_mask_BK: Tensor, weights_BK: Tensor | None = None) -> Tensor:
    """g = exp(ΔΦ̃) − E_B[exp(ΔΦ̃)] with ΔΦ̃ the min–max normalisation over all valid steps (§2.4).

    Args:
        dphi_BK: float [B, K] potential differences.
        step_mask_BK: float [B, K], 1 on valid steps.
        weights_BK: optional [B, K] weights of E_B (e.g. step token counts for token-weighted
            centring); None = unweighted mean over steps.

    Returns:
        g_BK [B, K], 0 on padded steps (and everywhere when the batch has no step). When all ΔΦ
        are equal the range is 0 and ΔΦ̃ := 0, so g = 0.
    """
    valid_BK = step_mask_BK.bool()
    g_BK = torch.zeros_like(dphi_BK)
    if not bool(valid_BK.any()):
        return g_BK
    vals = dphi_BK[valid_BK]
    lo, hi = vals.min(), vals.max()
    span = hi - lo
    norm_BK = (dphi_BK - lo) / span if float(span) > 0 else torch.zeros_like(dphi_BK)
    e_BK = torch.exp(norm_BK)
    w_BK = step_mask_BK if weights_BK is None else weights_BK * step_mask_BK
    centre = (e_BK * w_BK).sum() / w_BK.sum()
    return torch.where(valid_BK, e_BK - centre, g_BK)


# ---------------------------------------------------------------------------------------------
# §2.4 the advantage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SPAEParams:
    """Hyper-parameters of the SPAE advantage (docs/algorithms.md §2.4, §2.5).

    Attributes:
        alpha: α, saturation-penalty strength (paper 0.5).
        xi: ξ, difference-shaping weight (paper 0.5).
        eps_sat: ε_sat, Φ above it marks a saturated step (0.9, [INFERRED] from the probe code).
        eps: added to the batch std in the final standardisation.
        shaping_scope: E_B over ``"step"`` (each step once, default) or ``"token"`` (steps
            weighted by their token count) [INFERRED].
        standardize: apply the final batch standardisation (§2.4 "RF-B").
        std_unbiased: Bessel-corrected std in the standardisation; default population [INFERRED].
    """

    alpha: float = 0.5
    xi: float = 0.5
    eps_sat: float = 0.9
    eps: float = 1e-6
    shaping_scope: Literal["step", "token"] = "step"
    standardize: bool = True
    std_unbiased: bool = False

    # read by the trainer (no name branching): this estimator needs rlkit.methods.step_probes.probe_groups
    needs_step_probes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SPAEParams.alpha must be in [0, 1], got {self.alpha}")
        if self.xi < 0:
            raise ValueError(f"SPAEParams.xi must be >= 0, got {self.xi}")
        if self.eps < 0:
            raise ValueError(f"SPAEParams.eps must be >= 0, got {self.eps}")
        if self.shaping_scope not in ("step", "token"):
            raise ValueError(f"SPAEParams.shaping_scope must be 'step' or 'token', got {self.shaping_scope!r}")


def _read_extras(inp: AdvantageInputs) -> tuple[Tensor, Tensor, Tensor]:
    missing = [k for k in (EXTRA_BOUNDARIES, EXTRA_ACC, EXTRA_CONF) if k not in inp.extras]
    if missing:
        raise KeyError(
            f"spae advantage needs AdvantageInputs.extras {missing}; run rlkit.methods.step_probes.probe_groups "
            "(or run_step_probes) and pass ProbeResult.extras() into the advantage inputs"
        )
    B, T = inp.response_mask_BT.shape
    bnd_BK = torch.as_tensor(inp.extras[EXTRA_BOUNDARIES]).long().to(inp.response_mask_BT.device)
    acc_BK = torch.as_tensor(inp.extras[EXTRA_ACC]).float()
    conf_BK = torch.as_tensor(inp.extras[EXTRA_CONF]).float()
    if bnd_BK.dim() != 2 or bnd_BK.shape[0] != B:
        raise ValueError(f"{EXTRA_BOUNDARIES} must have shape ({B}, K), got {tuple(bnd_BK.shape)}")
    for name, t in ((EXTRA_ACC, acc_BK), (EXTRA_CONF, conf_BK)):
        if t.shape != bnd_BK.shape:
            raise ValueError(f"{name} must have shape {tuple(bnd_BK.shape)} like {EXTRA_BOUNDARIES}, "
                             f"got {tuple(t.shape)}")
    present_BK = bnd_BK >= 0
    if bool((bnd_BK >= T).any()):
        raise ValueError(f"{EXTRA_BOUNDARIES} has positions >= T={T} (response length)")
    if bnd_BK.shape[1] > 1:
        nxt_present = present_BK[:, 1:]
        if bool((nxt_present & ~present_BK[:, :-1]).any()):
            raise ValueError(f"{EXTRA_BOUNDARIES}: -1 padding must come after the valid steps of a row")
        if bool((nxt_present & (bnd_BK[:, 1:] <= bnd_BK[:, :-1])).any()):
            raise ValueError(f"{EXTRA_BOUNDARIES} must be strictly increasing within a row")
    return bnd_BK, acc_BK, conf_BK


def _masked_std(x_BT: Tensor, m_BT: Tensor, mean: Tensor, n: Tensor, unbiased: bool) -> Tensor:
    var = (((x_BT - mean) ** 2) * m_BT).sum() / (n - 1 if unbiased else n).clamp(min=1)
    return var.sqrt()


def step_token_index(bnd_BK: Tensor, step_mask_BK: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Map tokens to steps: M(j) = #{valid boundaries < j} (§2.1).

    Returns ``(idx_BT, tail_BT)``: long [B, T] step index of each token (clamped to K-1) and bool
    [B, T] marking tokens after the last valid boundary of their row (M(j) = K_i).
    """
    B, K = bnd_BK.shape
    if K == 0:
        zeros = torch.zeros(B, T, dtype=torch.long, device=bnd_BK.device)
        return zeros, torch.ones(B, T, dtype=torch.bool, device=bnd_BK.device)
    valid_BK = step_mask_BK.bool()
    sorted_BK = torch.where(valid_BK, bnd_BK, torch.full_like(bnd_BK, T)).contiguous()
    pos_BT = torch.arange(T, device=bnd_BK.device).expand(B, T).contiguous()
    step_BT = torch.searchsorted(sorted_BK, pos_BT, side="left")
    return step_BT.clamp(max=K - 1), step_BT >= valid_BK.sum(1, keepdim=True)


def steps_to_tokens(step_BK: Tensor, tail_B: Tensor, idx_BT: Tensor, tail_BT: Tensor) -> Tensor:
    """[B, K] step values -> [B, T] token values; tail tokens take ``tail_B`` (not masked)."""
    tail_BT_vals = tail_B[:, None].expand(idx_BT.shape)
    if step_BK.shape[1] == 0:
        return tail_BT_vals.clone()
    return torch.where(tail_BT, tail_BT_vals, step_BK.gather(1, idx_BT))


@register_advantage("spae", params=SPAEParams)
@torch.no_grad()
def spae_advantage(inp: AdvantageInputs, p: SPAEParams) -> Tensor:
    """SPAE token advantages (docs/algorithms.md §2.3–2.4, pseudo-code §2.6).

    ``Â_{i,j} = Â^Group_i · f(Φ_{i,M(j)}) + ξ · g(ΔΦ_{i,M(j)})`` with ``Â^Group_i = R_i − mean_g R``,
    then standardised over all valid tokens of the batch.

    Args:
        inp: ``rewards_B`` [B], ``group_ids_B`` [B], ``response_mask_BT`` [B, T] and
            ``extras[spae_boundaries_BK | spae_acc_BK | spae_conf_BK]`` (module docstring).
        p: :class:`SPAEParams`.

    Returns:
        :class:`AdvantageOutput`: advantages_BT [B, T], zero on padding; metrics ``spae/*``; per-token maps ``spae/potential`` (Φ of the token's step, 0 on
        tail tokens), ``spae/step_boundary`` (1 at boundary tokens), ``spae/sat_factor`` (f) and
        ``spae/shaping`` (ξ·g).
    """
    bnd_BK, acc_BK, conf_BK = _read_extras(inp)
    mask_BT = inp.response_mask_BT.float()
    T = mask_BT.shape[1]
    rewards_B = inp.rewards_B.float()

    # Â^Group: no std normalisation; singleton groups use a zero baseline (repo convention)
    stats = group_stats(rewards_B, inp.group_ids_B)
    singleton_B = stats.count_G[stats.index_B] == 1
    adv_group_B = rewards_B - torch.where(singleton_B, torch.zeros_like(rewards_B), stats.mean_G[stats.index_B])

    # a step is valid if its boundary token is a valid token (masked rows drop out of batch stats)
    step_mask_BK = ((bnd_BK >= 0) & (mask_BT.gather(1, bnd_BK.clamp(min=0)) > 0)).float()
    valid_BK = step_mask_BK.bool()
    acc_BK = torch.where(valid_BK, acc_BK.to(mask_BT.device), torch.zeros_like(step_mask_BK))
    conf_BK = torch.where(valid_BK, conf_BK.to(mask_BT.device), torch.zeros_like(step_mask_BK))
    phi_BK = step_potential(acc_BK, conf_BK) * step_mask_BK
    dphi_BK = potential_differences(phi_BK, step_mask_BK)
    csat_BK, csat_total_B = saturation_counts(phi_BK, step_mask_BK, p.eps_sat)
    f_BK, f_tail_B = saturation_factor(csat_BK, p.alpha), saturation_factor(csat_total_B, p.alpha)

    weights_BK = None
    if p.shaping_scope == "token" and bnd_BK.shape[1]:
        prev_BK = torch.cat([torch.full_like(bnd_BK[:, :1], -1), bnd_BK[:, :-1]], dim=1)
        weights_BK = (bnd_BK - prev_BK).float()
    g_BK = difference_shaping(dphi_BK, step_mask_BK, weights_BK)
    adv_step_BK = adv_group_B[:, None] * f_BK + p.xi * g_BK

    idx_BT, tail_BT = step_token_index(bnd_BK, step_mask_BK, T)
    adv_BT = steps_to_tokens(adv_step_BK, adv_group_B * f_tail_B, idx_BT, tail_BT) * mask_BT
    n_tok = mask_BT.sum()
    raw_mean = adv_BT.sum() / n_tok.clamp(min=1)
    raw_std = _masked_std(adv_BT, mask_BT, raw_mean, n_tok, p.std_unbiased)
    if p.standardize and float(n_tok) > 0:
        adv_BT = (adv_BT - raw_mean) / (raw_std + p.eps) * mask_BT
    if not bool(torch.isfinite(adv_BT).all()):
        raise FloatingPointError("spae advantage produced non-finite values (check probe acc/conf inputs)")

    def to_tokens(step_BK: Tensor, tail_B: Tensor) -> Tensor:
        return steps_to_tokens(step_BK, tail_B, idx_BT, tail_BT) * mask_BT

    zeros_B = torch.zeros_like(rewards_B)
    sat_BT = to_tokens(f_BK, f_tail_B)
    n_steps = float(step_mask_BK.sum())
    K_B = step_mask_BK.sum(1)[mask_BT.sum(1) > 0]  # steps per (non-empty) response

    def step_mean(x_BK: Tensor) -> float:
        return float((x_BK * step_mask_BK).sum() / n_steps) if n_steps else 0.0

    metrics = {
        "spae/num_steps_mean": float(K_B.mean()) if K_B.numel() else 0.0,
        "spae/no_step_frac": float((K_B == 0).float().mean()) if K_B.numel() else 0.0,
        "spae/saturation_count": float(((phi_BK > p.eps_sat) & valid_BK).sum()),
        "spae/potential_mean": step_mean(phi_BK),
        "spae/acc_mean": step_mean(acc_BK),
        "spae/conf_mean": step_mean(conf_BK),
        "spae/delta_potential_mean": step_mean(dphi_BK),
        "spae/sat_factor_mean": float(sat_BT.sum() / n_tok) if float(n_tok) else 1.0,
        "spae/adv_mean_raw": float(raw_mean),
        "spae/adv_std_raw": float(raw_std),
    }
    # scatter_add: padded steps point at column 0 with weight 0 and must not overwrite a boundary
    boundary_BT = torch.zeros_like(mask_BT).scatter_add_(1, bnd_BK.clamp(min=0), step_mask_BK)
    token_maps = {
        "spae/potential": to_tokens(phi_BK, zeros_B),
        "spae/step_boundary": boundary_BT * mask_BT,
        "spae/sat_factor": sat_BT,
        "spae/shaping": to_tokens(p.xi * g_BK, zeros_B),
    }
    return AdvantageOutput(adv_BT, metrics, token_maps)
