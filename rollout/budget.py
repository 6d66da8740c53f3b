"""Budget guidance (docs/algorithms.md §4): a Gamma remaining-length predictor and guided sampling.

A small network reads every hidden state of the frozen LM at the current position (embedding
output + each layer, stacked as a sequence over layers) and predicts, for every candidate next
token ``v``, a Gamma distribution over the encoded remaining thinking length
``log(L + 1) ~ Gamma(alpha_v, rate=lam_v)``. Guided decoding reweights the LM distribution by
``Pr(L <= b)`` for the remaining budget ``b`` (classifier-guidance-style Bayes, §4.1/§4.4).

Contents: the Gamma maths (``gamma_nll``, ``guidance_weights``, ``guided_probs``), the
predictor (``PredictorConfig``, ``GammaPredictor``, save/load) and ``BudgetGuidance``, a
batched ``rollout.sampling.LogitsProcessor`` for the HF engine. Its training loop
(``extract_features``, ``fit_predictor``, ``evaluate_predictor``) is in :mod:`rollout.budget_fit`;
the data-generating command in ``rlkit.tools.budget_train`` (this package must not import rlkit).

Departures from the reference code (UMass-Embodied-AGI/BudgetGuidance):
- batched over rows with per-row budgets (the reference asserts batch size 1);
- the default predictor is small (hidden 128, 2 BERT layers) so it trains on a CPU;
  ``PredictorConfig.reference`` gives the paper's BERT-base encoder;
- training gathers the head rows of the label tokens instead of computing all V outputs: the
  same loss, without a (positions x V) matmul;
- the thinking region is configurable (``think_start`` / ``think_end``); a model without think
  tags treats its whole response (through EOS) as the region to budget;
- guided steps ignore the row's temperature as in the reference (the processor returns
  ``T * log p'`` so the engine's division by ``T`` yields ``p'``), but the engine's top-k/top-p
  still truncate the guided distribution (the reference skips them on guided steps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_STATES_KEY = "hidden_states_BLH"
"""``DecodeState.extra`` key where the HF engine puts ``(B, N+1, H)`` hidden states of the
current position for processors with ``needs_hidden_states = True``."""
WEIGHTS_FILE = "budget_predictor.safetensors"
CONFIG_FILE = "budget_predictor.json"

# ------------------------------------------------------------------------------------ Gamma maths


def encode_length(length: torch.Tensor) -> torch.Tensor:
    """``z = log(L + 1)`` (``encode_budget`` with ``scale="log"``)."""
    return torch.log1p(length.float())


def decode_length(z: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_length``: ``exp(z) - 1``."""
    return torch.expm1(z)


def gamma_nll(alpha: torch.Tensor, lam: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-log Gamma(z; shape alpha, rate lam)`` (§4.3), in float32."""
    alpha, lam, z = alpha.float(), lam.float(), z.float()
    return -(alpha * torch.log(lam) - torch.lgamma(alpha) + (alpha - 1) * torch.log(z) - lam * z)


def gamma_mode_length(alpha: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mode of the Gamma, decoded to tokens: ``exp((alpha - 1) / lam) - 1``."""
    return torch.expm1((alpha.float() - 1) / lam.float())


@dataclass(frozen=True)
class GuidanceParams:
    """Guided-sampling knobs (§4.4/§4.5). Thresholds are the reference's hard-coded heuristics.

    ``trigger_strings``: guidance runs at the step after a token whose text contains one of them
    (and at the first step). ``think_start``: if set, guidance waits until it appears in the
    context; ``None`` = thinking starts with the first generated token. ``think_end``: guidance
    stops after a token containing it; ``None`` = never (budget the whole response).
    ``temperature_on_guided_steps``: reweight ``softmax(logits / T)`` instead of the reference's
    ``softmax(logits)`` on guided steps.
    ``unreliable``: weight of a candidate that fails the mask. ``zero`` (reference): it is excluded,
    so a predictor that is sure only about a few rare tokens forces them over the LM's choice.
    ``neutral`` [departure]: it gets the row's LM-probability-weighted mean weight of the reliable
    candidates (guidance abstains on it); a row with no reliable candidate is left unchanged.
    """

    min_lambda: float = 10.0  # mask: lam_v >= min_lambda
    min_alpha: float = 1.0  # mask: alpha_v > min_alpha (strict)
    min_mode: float = 0.9  # mask: exp((alpha-1)/lam) - 1 >= min_mode
    trigger_strings: tuple[str, ...] = ("\n",)
    think_start: str | None = None
    think_end: str | None = "</think>"
    temperature_on_guided_steps: bool = False
    unreliable: Literal["zero", "neutral"] = "zero"

    def __post_init__(self) -> None:
        if self.unreliable not in ("zero", "neutral"):
            raise ValueError(f"unreliable must be 'zero' or 'neutral', got {self.unreliable!r}")
        if not self.trigger_strings or any(not s for s in self.trigger_strings):
            raise ValueError(f"trigger_strings must be non-empty strings, got {self.trigger_strings!r}")


def reliable_mask(alpha_BV: torch.Tensor, lam_BV: torch.Tensor, params: GuidanceParams = GuidanceParams()) -> torch.Tensor:
    """The reference's reliability mask (§4.4): ``lam >= min_lambda``, ``alpha > min_alpha``, mode >= min_mode."""
    alpha, lam = alpha_BV.float(), lam_BV.float()
    reliable = (lam >= params.min_lambda) & (alpha > params.min_alpha)
    return reliable & (gamma_mode_length(alpha, lam) >= params.min_mode)


def guidance_weights(
    alpha_BV: torch.Tensor, lam_BV: torch.Tensor, budget_B: torch.Tensor, logits_BV: torch.Tensor,
    params: GuidanceParams = GuidanceParams(),
) -> torch.Tensor:
    """Normalised guidance weights ``w_BV`` for remaining budgets ``budget_B`` (§4.4).

    ``w_v = GammaCDF(log(b + 1); alpha_v, lam_v) * reliable_v`` (``unreliable="neutral"``: an
    unreliable ``v`` gets ``sum_u p_u w_u / sum_u p_u`` over the reliable ``u``, 1 if there is none);
    a row whose weights are all zero puts weight 1 on its LM argmax; then
    ``w = clamp(w, 0, 1) / sum(w)``. float32.
    """
    alpha, lam = alpha_BV.float(), lam_BV.float()
    x_B1 = torch.log1p(budget_B.float().clamp(min=0))[:, None]
    w = torch.nan_to_num(torch.special.gammainc(alpha, lam * x_B1), nan=0.0)
    reliable = reliable_mask(alpha, lam, params)
    w = torch.where(reliable, w, torch.zeros_like(w))
    if params.unreliable == "neutral":
        p_rel = torch.softmax(logits_BV.float(), dim=-1) * reliable
        mass_B1 = p_rel.sum(-1, keepdim=True)
        mean_B1 = torch.where(mass_B1 > 0, (p_rel * w).sum(-1, keepdim=True) / mass_B1.clamp(min=1e-30),
                              torch.ones_like(mass_B1))
        w = torch.where(reliable, w, mean_B1.expand_as(w))
    empty_B = w.sum(-1) <= 0
    if bool(empty_B.any()):
        top = F.one_hot(logits_BV.argmax(-1), w.shape[-1]).to(w.dtype)
        w = torch.where(empty_B[:, None], top, w)
    w = w.clamp(0.0, 1.0)
    return w / w.sum(-1, keepdim=True)


def guided_probs(
    logits_BV: torch.Tensor, alpha_BV: torch.Tensor, lam_BV: torch.Tensor, budget_B: torch.Tensor,
    params: GuidanceParams = GuidanceParams(),
) -> torch.Tensor:
    """``p'(v) ∝ softmax(logits)_v * w_v`` (§4.4), (B, V) float32; falls back to the argmax."""
    p = torch.softmax(logits_BV.float(), dim=-1) * guidance_weights(alpha_BV, lam_BV, budget_B, logits_BV, params)
    total = p.sum(-1, keepdim=True)
    bad = total <= 0  # weights only on tokens an earlier processor set to -inf
    if bool(bad.any()):
        top = F.one_hot(logits_BV.argmax(-1), p.shape[-1]).to(p.dtype)
        p, total = torch.where(bad, top, p), torch.where(bad, torch.ones_like(total), total)
    return p / total


# ------------------------------------------------------------------------------------ predictor


@dataclass(frozen=True)
class PredictorConfig:
    """Shape of the predictor (§4.2). Defaults are CPU-sized; see ``reference()`` for the paper's.

    ``num_hidden_states`` = N + 1 (embedding output + N layers) of the LM it reads.
    ``head_bias`` [departure, off in the reference]: the two heads get a bias, which
    :func:`init_head_bias` sets to the Gamma fitted to all training targets, so a predictor trained
    on a few hundred self-generated traces starts at the marginal length distribution instead of
    ``alpha = lam = softplus(0)`` and only has to learn how the context moves it.
    """

    d_model: int
    vocab_size: int
    num_hidden_states: int
    encoder_type: Literal["bert", "linear"] = "bert"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    dropout: float = 0.1  # BertConfig() default
    scale: Literal["log"] = "log"
    head_bias: bool = False

    def __post_init__(self) -> None:
        if self.encoder_type not in ("bert", "linear"):
            raise ValueError(f"encoder_type must be 'bert' or 'linear', got {self.encoder_type!r}")
        if self.scale != "log":
            raise ValueError(f"only scale='log' is supported (all reference recipes), got {self.scale!r}")
        if min(self.d_model, self.vocab_size, self.num_hidden_states) < 1:
            raise ValueError(f"d_model, vocab_size and num_hidden_states must be >= 1: {self}")
        if self.encoder_type == "bert" and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def reference(cls, d_model: int, vocab_size: int, num_hidden_states: int) -> PredictorConfig:
        """The released recipes' encoder: ``BertConfig()`` (12 layers, 768, 12 heads, FFN 3072)."""
        return cls(d_model, vocab_size, num_hidden_states, "bert", 768, 12, 12, 3072, 0.1)


class GammaPredictor(nn.Module):
    """Hidden states ``(M, N+1, d_model)`` -> per-candidate Gamma ``(alpha, lam)``, each (M, V).

    ``bert``: prepend a zero-initialised ``cls_token``, ``Linear(d_model -> hidden)``, a BERT
    encoder stack over the layer sequence (no embeddings/positions), take the CLS output.
    ``linear``: the heads read the last hidden state directly.
    """

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.d_model
        if cfg.encoder_type == "bert":
            from transformers import BertConfig
            from transformers.models.bert.modeling_bert import BertEncoder

            bert = BertConfig(
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            )
            bert._attn_implementation = "sdpa"  # standalone encoder: pick the kernel ourselves
            self.cls_token = nn.Parameter(torch.zeros(cfg.d_model))
            self.encoder = nn.Sequential(nn.Linear(cfg.d_model, cfg.hidden_size), BertEncoder(bert))
            width = cfg.hidden_size
        self.alpha_head = nn.Linear(width, cfg.vocab_size, bias=cfg.head_bias)
        self.lam_head = nn.Linear(width, cfg.vocab_size, bias=cfg.head_bias)

    def encode(self, hidden_MLD: torch.Tensor) -> torch.Tensor:
        """(M, N+1, d_model) -> (M, width) summary the heads read."""
        cfg = self.cfg
        if hidden_MLD.dim() != 3 or hidden_MLD.shape[1:] != (cfg.num_hidden_states, cfg.d_model):
            raise ValueError(
                f"predictor expects hidden states (M, {cfg.num_hidden_states}, {cfg.d_model}) "
                f"(N+1 layers x d_model of the LM it was trained on), got {tuple(hidden_MLD.shape)}"
            )
        x = hidden_MLD.to(self.alpha_head.weight.dtype)
        if cfg.encoder_type == "linear":
            return x[:, -1]
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return self.encoder(x).last_hidden_state[:, 0]

    def forward(self, hidden_MLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_MV, lam_MV)``: softplus of the heads, float32."""
        h = self.encode(hidden_MLD)
        return F.softplus(self.alpha_head(h).float()), F.softplus(self.lam_head(h).float())

    def params_at(self, hidden_MLD: torch.Tensor, tokens_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_M, lam_M)`` at one candidate token per position (training; no (M, V) matmul)."""
        h = self.encode(hidden_MLD).float()
        a = (h * self.alpha_head.weight[tokens_M].float()).sum(-1)
        lam = (h * self.lam_head.weight[tokens_M].float()).sum(-1)
        if self.cfg.head_bias:
            a, lam = a + self.alpha_head.bias[tokens_M].float(), lam + self.lam_head.bias[tokens_M].float()
        return F.softplus(a), F.softplus(lam)


def gamma_moments(z: torch.Tensor) -> tuple[float, float]:
    """``(alpha, lam)`` of the Gamma with the mean and variance of the samples ``z`` (> 0).

    >>> gamma_moments(torch.tensor([3.0, 4.0, 5.0]))  # mean 4, variance 2/3
    (24.0, 6.0)
    """
    z = z.double()
    mean, var = float(z.mean()), float(z.var(unbiased=False))
    var = max(var, 1e-6 * mean * mean)
    return mean * mean / var, mean / var


@torch.no_grad()
def init_head_bias(predictor: GammaPredictor, lengths: torch.Tensor) -> tuple[float, float]:
    """Set both heads' biases (``head_bias``) to the moment-matched Gamma of ``log(L + 1)`` over
    ``lengths`` for every candidate token; returns that ``(alpha, lam)``."""
    if not predictor.cfg.head_bias:
        raise ValueError("init_head_bias needs a predictor built with head_bias=True")
    alpha, lam = gamma_moments(encode_length(lengths.float()))
    inv_softplus = lambda y: math.log(math.expm1(y)) if y < 20 else y  # noqa: E731
    predictor.alpha_head.bias.fill_(inv_softplus(alpha))
    predictor.lam_head.bias.fill_(inv_softplus(lam))
    return alpha, lam


def save_predictor(predictor: GammaPredictor, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``budget_predictor.safetensors`` + ``budget_predictor.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    doc = {"format": "rlkit.budget_predictor/1", "predictor": asdict(predictor.cfg), "meta": meta or {}}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2, default=str))
    return out


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> tuple[GammaPredictor, dict[str, Any]]:
    """Load a predictor saved by ``save_predictor``; returns ``(predictor in eval mode, meta)``."""
    from safetensors.torch import load_file

    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_file, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{root}: no budget predictor ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                                "train one with `python -m rlkit.tools.budget_train`")
    doc = json.loads(cfg_file.read_text())
    predictor = GammaPredictor(PredictorConfig(**doc["predictor"]))
    predictor.load_state_dict(load_file(str(weights)))
    return predictor.to(device).eval(), doc.get("meta", {})


# ------------------------------------------------------------------------------------ guided sampling


def token_string_mask(tokenizer: Any, vocab_size: int, strings: Sequence[str]) -> torch.Tensor:
    """(V,) bool: token ids whose decoded text contains any of ``strings``."""
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    hits = [i for i, t in enumerate(texts) if any(s in t for s in strings)]
    mask[hits] = True
    return mask


@dataclass
class _RowMemory:
    """Per-(request, sample) flags that survive the engine pruning finished rows."""

    started_RN: torch.Tensor  # bool: thinking has begun
    ended_RN: torch.Tensor  # bool: think_end seen -> guidance off for good
    offset_R: torch.Tensor  # long: resume-prefix tokens, counted as already generated
    first_trigger_R: torch.Tensor  # bool: is step 0 a guided step (True unless resuming mid-line)


class BudgetGuidance:
    """Batched budget-guided sampling (§4.4) as a ``rollout.sampling.LogitsProcessor``.

    A row is guided at a step when it has a budget (``state.budget_B > 0``), is thinking
    (``think_start`` seen or not required, ``think_end`` not yet generated) and its previous
    token contains a trigger string (``"\\n"``), or it is the first step. Its logits become
    ``T * log p'`` with ``p' ∝ softmax(logits) * w`` (``guided_probs``) for the remaining budget
    ``b = max(budget - generated, 1)``, so the engine's ``/T`` leaves ``p'``; every other row
    and step is returned unchanged. Needs the engine to put the current position's hidden
    states into ``state.extra[HIDDEN_STATES_KEY]`` (``needs_hidden_states = True``). Put it last
    in a processor chain: it reads the temperature earlier processors wrote.
    """

    needs_hidden_states = True
    COUNTERS = ("guided_row_steps", "unreliable_row_steps", "changed_row_steps")

    def __init__(self, predictor: GammaPredictor, tokenizer: Any, params: GuidanceParams = GuidanceParams()) -> None:
        self.predictor = predictor.eval()
        self.tokenizer = tokenizer
        self.params = params
        V = predictor.cfg.vocab_size
        self._trigger_V = token_string_mask(tokenizer, V, params.trigger_strings)
        self._start_V = token_string_mask(tokenizer, V, [params.think_start]) if params.think_start else None
        self._end_V = token_string_mask(tokenizer, V, [params.think_end]) if params.think_end else None
        self._key = f"budget_guidance/{id(self)}"
        # diagnostics, counted in rows x steps: guided; no candidate passed the reliability mask (the
        # row fell back to its LM argmax); the guided argmax differs from the LM's (what greedy changes)
        self.guided_row_steps = 0
        self.unreliable_row_steps = 0
        self.changed_row_steps = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: Any, device: str | torch.device = "cpu",
                        **overrides: Any) -> BudgetGuidance:
        """Load a saved predictor; guidance params default to those saved with it, then ``overrides``."""
        predictor, meta = load_predictor(path, device)
        saved = {k: tuple(v) if k == "trigger_strings" else v for k, v in meta.get("guidance", {}).items()}
        return cls(predictor, tokenizer, replace(GuidanceParams(**saved), **overrides))

    def counts(self) -> dict[str, int]:
        """The diagnostics counters (rows x decode steps) since this processor was made."""
        return {k: getattr(self, k) for k in self.COUNTERS}

    def _memory(self, state: Any) -> _RowMemory:
        mem = state.extra.get(self._key)
        if mem is not None:
            return mem
        p, reqs = self.params, state.requests
        R, N = len(reqs), max(int(getattr(r.params, "n", 1)) for r in reqs)
        started = torch.ones(R, dtype=torch.bool)
        ended = torch.zeros(R, dtype=torch.bool)
        for i, r in enumerate(reqs):
            resume = self.tokenizer.decode(list(r.resume_ids), skip_special_tokens=False) if r.resume_ids else ""
            if p.think_start:  # thinking iff the last think_start in the context is not closed
                ctx = self.tokenizer.decode(list(r.prompt_ids), skip_special_tokens=False) + resume
                at = ctx.rfind(p.think_start)
                started[i] = at >= 0 and (not p.think_end or ctx.rfind(p.think_end) < at)
            elif p.think_end:
                ended[i] = p.think_end in resume
        first = torch.tensor([not r.resume_ids or bool(self._trigger_V[r.resume_ids[-1]]) for r in reqs])
        dev = state.budget_B.device
        mem = _RowMemory(
            started_RN=started[:, None].expand(R, N).clone().to(dev),
            ended_RN=ended[:, None].expand(R, N).clone().to(dev),
            offset_R=torch.tensor([len(r.resume_ids) for r in reqs], dtype=torch.long, device=dev),
            first_trigger_R=first.to(dev),
        )
        for name in ("_trigger_V", "_start_V", "_end_V"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(dev))
        state.extra[self._key] = mem
        return mem

    def __call__(self, step: int, input_ids: torch.Tensor, logits_BV: torch.Tensor, state: Any) -> torch.Tensor:
        budget_B = state.budget_B
        if not bool((budget_B > 0).any()):
            return logits_BV
        mem = self._memory(state)
        r_B, s_B = state.request_index_B, state.sample_index_B
        if step == 0:
            trigger_B = mem.first_trigger_R[r_B]
        else:
            last_B = input_ids[:, -1]
            trigger_B = self._trigger_V[last_B]
            if self._start_V is not None:
                mem.started_RN[r_B, s_B] |= self._start_V[last_B]
            if self._end_V is not None:
                mem.ended_RN[r_B, s_B] |= self._end_V[last_B]
        guided_B = (budget_B > 0) & trigger_B & mem.started_RN[r_B, s_B] & ~mem.ended_RN[r_B, s_B]
        g = torch.nonzero(guided_B).flatten()
        if g.numel() == 0:
            return logits_BV
        hidden = state.extra.get(HIDDEN_STATES_KEY)
        if hidden is None:
            raise RuntimeError(f"BudgetGuidance needs hidden states in state.extra[{HIDDEN_STATES_KEY!r}]; "
                               "use an engine that honours `needs_hidden_states` (rollout.hf.HFEngine)")
        alpha, lam = self.predictor(hidden[g])
        if alpha.shape[-1] != logits_BV.shape[-1]:
            raise ValueError(f"predictor vocab {alpha.shape[-1]} != LM vocab {logits_BV.shape[-1]}: "
                             "the predictor was trained for another model")
        remaining = (budget_B[g] - state.num_generated_B[g] - mem.offset_R[r_B[g]]).clamp(min=1)
        temp = state.temperature_B[g].float()
        temp = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
        logits = logits_BV[g].float()
        if self.params.temperature_on_guided_steps:
            logits = logits / temp
        p = guided_probs(logits, alpha, lam, remaining, self.params)
        out = logits_BV.float().clone()
        out[g] = temp * torch.log(p)  # the engine divides by T again: softmax gives p'
        self.guided_row_steps += int(g.numel())
        self.unreliable_row_steps += int((~reliable_mask(alpha, lam, self.params).any(-1)).sum())
        self.changed_row_steps += int((p.argmax(-1) != logits.argmax(-1)).sum())
        return out
