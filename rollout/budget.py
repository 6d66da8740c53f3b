"""Budget guidance (spec §4): a Gamma remaining-length predictor and guided sampling.

A small network reads every hidden state of the frozen LM at the current position (embedding
output + each layer, stacked as a sequence over layers) and predicts, for every candidate next
token ``v``, a Gamma distribution over the encoded remaining thinking length
``log(L + 1) ~ Gamma(alpha_v, rate=lam_v)``. Guided decoding reweights the LM distribution by
``Pr(L <= b)`` for the remaining budget ``b`` (classifier-guidance-style Bayes, §4.1/§4.4).

Contents: the Gamma maths (``gamma_nll``, ``guidance_weights``, ``guided_probs``), the
predictor (``PredictorConfig``, ``GammaPredictor``, save/load), its training loop
(``extract_features``, ``fit_predictor``, ``evaluate_predictor``) and ``BudgetGuidance``, a
batched ``rollout.sampling.LogitsProcessor`` for the HF engine. The data-generating command lives
in ``rlkit.budget_train`` (this package must not import rlkit).

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
from collections.abc import Callable, Sequence
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
    """

    min_lambda: float = 10.0  # mask: lam_v >= min_lambda
    min_alpha: float = 1.0  # mask: alpha_v > min_alpha (strict)
    min_mode: float = 0.9  # mask: exp((alpha-1)/lam) - 1 >= min_mode
    trigger_strings: tuple[str, ...] = ("\n",)
    think_start: str | None = None
    think_end: str | None = "</think>"
    temperature_on_guided_steps: bool = False

    def __post_init__(self) -> None:
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

    ``w_v = GammaCDF(log(b + 1); alpha_v, lam_v) * reliable_v``; a row whose weights are all
    zero puts weight 1 on its LM argmax; then ``w = clamp(w, 0, 1) / sum(w)``. float32.
    """
    alpha, lam = alpha_BV.float(), lam_BV.float()
    x_B1 = torch.log1p(budget_B.float().clamp(min=0))[:, None]
    w = torch.special.gammainc(alpha, lam * x_B1)
    reliable = reliable_mask(alpha, lam, params)
    w = torch.nan_to_num(torch.where(reliable, w, torch.zeros_like(w)), nan=0.0)
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
                                "train one with `python -m rlkit.budget_train`")
    doc = json.loads(cfg_file.read_text())
    predictor = GammaPredictor(PredictorConfig(**doc["predictor"]))
    predictor.load_state_dict(load_file(str(weights)))
    return predictor.to(device).eval(), doc.get("meta", {})


# ------------------------------------------------------------------------------------ training


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
