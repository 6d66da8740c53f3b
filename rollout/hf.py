"""Transformers rollout engine: batched KV-cache sampling with an explicit decode loop.

The CPU default engine (also runs on GPU). It deliberately does not call ``model.generate``: the
loop below records, per generated token, the behaviour log-probability ``log softmax(z / T)`` at
the sampled token (T = 1 for greedy rows) and optionally the entropy of that distribution, runs
the ``rollout.sampling`` logits-processor hook (adaptive temperature, budget guidance) and prunes
finished rows from the KV cache once more than ``PRUNE_FRACTION`` of a batch has finished.

Rows (request x sample) are sorted by context length and decoded in left-padded chunks of
``max_batch_size``; each row draws from its own ``torch.Generator`` (seeded from
``params.seed`` or the engine seed + a call counter), so a sample does not depend on which other
rows share its batch. Requests may mix sampling parameters; temperature / top-k / top-p /
max_new_tokens / stop strings are applied per row.

This module imports nothing of ``rlkit`` but :mod:`rlkit.common` (engines are usable on their own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlkit.common import hash_seed
from rollout.budget import HIDDEN_STATES_KEY
from rollout.engine import Completion, RolloutRequest, SamplingParams, generation_stats, register_engine
from rollout.hf_cache import cache_name, output_cache
from rollout.sampling import (
    DecodeState,
    LogitsProcessor,
    apply_processors,
    filter_top_k_top_p,
    logprobs_and_entropy,
    sample_rows,
    unique_rows,
)

logger = logging.getLogger(__name__)

PRUNE_FRACTION = 0.25  # drop finished rows from the batch/KV cache once this share has finished
# ... but only in batches of at least this many rows: on CPU a decode step costs about the same for
# 1-8 rows (weight-bandwidth bound; odd sizes can even be slower), so pruning small batches only
# adds copies. Measured on SmolLM2, 2 threads, B=32 x 64 tokens: 105 -> 132 tok/s with pruning.
PRUNE_MIN_ROWS = 16
_SCORE_MAX_LOGITS = 2**28  # cap on B * T * V logits materialised per score() forward (1 GiB fp32)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PEFT_PREFIX = "base_model.model."


@dataclass
class _Row:
    """One sample to draw: sample ``sample_idx`` of ``requests[req_idx]``."""

    req_idx: int
    sample_idx: int
    context: list[int]  # prompt_ids + resume_ids
    params: SamplingParams
    seed: int
    processors: list[LogitsProcessor]
    budget: int | None
    resumed: int = 0  # trailing context tokens that are this response's earlier segments (resume_ids)


@dataclass
class _Batch:
    """Per-row decode state of the rows still in the batch (all tensors (b, ...), b <= B).

    Pruning finished rows index-selects every field together with the KV cache; ``orig`` maps
    a current row back to its position in the chunk.
    """

    ids: torch.Tensor  # (b, P + T_max) long: left-padded context, then generated tokens
    attn: torch.Tensor  # (b, P + T_max) long attention mask
    pos: torch.Tensor  # (b,) position id of the next input token
    orig: torch.Tensor  # (b,) row index within the chunk
    temp: torch.Tensor  # (b,) float temperature, 0 = greedy
    topk: torch.Tensor  # (b,) long, 0 = off
    topp: torch.Tensor  # (b,) float, 1 = off
    maxnew: torch.Tensor  # (b,) long max_new_tokens
    ngen: torch.Tensor  # (b,) long tokens generated so far
    done: torch.Tensor  # (b,) bool
    gens: list[torch.Generator]
    stops: list[tuple[str, ...]]
    resumed: list[int]  # resume_ids per row: a stop string may start in them and end in new tokens

    @classmethod
    def build(cls, rows: list[_Row], P: int, T_max: int, pad_id: int, dev: torch.device) -> _Batch:
        B = len(rows)
        ids = torch.full((B, P + T_max), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + T_max), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r.context) : P] = torch.tensor(r.context, dtype=torch.long)
            attn[i, P - len(r.context) : P] = 1

        def vec(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        return cls(
            ids=ids.to(dev), attn=attn.to(dev), pos=attn.sum(-1).to(dev),
            orig=torch.arange(B, device=dev),
            temp=vec([r.params.temperature for r in rows], torch.float32),
            topk=vec([r.params.top_k for r in rows], torch.long),
            topp=vec([r.params.top_p for r in rows], torch.float32),
            maxnew=vec([r.params.max_new_tokens for r in rows], torch.long),
            ngen=torch.zeros(B, dtype=torch.long, device=dev),
            done=torch.zeros(B, dtype=torch.bool, device=dev),
            gens=[torch.Generator(device=dev).manual_seed(r.seed) for r in rows],
            stops=[r.params.stop for r in rows],
            resumed=[r.resumed for r in rows],
        )

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (1-D long index), in place."""
        for name in ("ids", "attn", "pos", "orig", "temp", "topk", "topp", "maxnew", "ngen", "done"):
            setattr(self, name, getattr(self, name)[keep])
        idx = keep.tolist()
        self.gens = [self.gens[i] for i in idx]
        self.stops = [self.stops[i] for i in idx]
        self.resumed = [self.resumed[i] for i in idx]


def _last_hidden(res: Any) -> torch.Tensor:
    """(B, N+1, H): embedding output and every layer's hidden state at the last position."""
    return torch.stack([h[:, -1] for h in res.hidden_states], dim=1)


def _mix_seed(*parts: Any) -> int:
    return hash_seed(*parts, bits=63, algo="blake2b")


def lora_config(lora: Mapping[str, Any]) -> Any:
    """``{"rank", "alpha", "dropout", "target_modules"}`` -> ``peft.LoraConfig`` (causal LM).

    Lives here because ``rollout`` never imports ``rlkit``; ``rlkit.infra.models`` re-uses it."""
    from peft import LoraConfig

    known = {"rank", "r", "alpha", "lora_alpha", "dropout", "lora_dropout", "target_modules"}
    if set(lora) - known:
        raise ValueError(f"unknown LoRA keys {sorted(set(lora) - known)}; known: {sorted(known)}")
    rank = int(lora.get("rank", lora.get("r", 8)))
    return LoraConfig(
        r=rank,
        lora_alpha=float(lora.get("alpha", lora.get("lora_alpha", 2 * rank))),
        lora_dropout=float(lora.get("dropout", lora.get("lora_dropout", 0.0))),
        target_modules=lora.get("target_modules") or "all-linear",
        task_type="CAUSAL_LM",
    )


def _canonical_name(name: str) -> str:
    """Parameter name without PEFT wrapping (prefix, ``.base_layer``, adapter name ``.default``)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    name = name.replace(".base_layer.", ".")
    for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        name = name.replace(f".{kind}.default.", f".{kind}.").replace(f".{kind}.default", f".{kind}")
    return name


@register_engine("hf")
class HFEngine:
    """``RolloutEngine`` on a transformers causal LM (optionally PEFT LoRA-wrapped).

    ``logits_processors`` apply to every row; a request may add its own list under
    ``request.meta["logits_processors"]`` (rows with different lists are decoded in different
    chunks).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 64,
        seed: int = 0,
        num_threads: int | None = None,
        lora: Mapping[str, Any] | None = None,
        logits_processors: list[LogitsProcessor] | None = None,
        prune_finished: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.logits_processors: list[LogitsProcessor] = list(logits_processors or [])
        self.prune_finished = prune_finished
        self.policy_version = 0
        self._calls = 0
        self._stats: dict[str, float] = {}
        self._rows_pruned = 0

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype])
        if lora:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(lora))
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(self.device).eval()
        self.lora = dict(lora) if lora else None

        eos: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if src is not None:
                eos.update([src] if isinstance(src, int) else list(src))
        if not eos:
            raise ValueError(f"{model_path}: no EOS token in tokenizer or generation config")
        self.eos_ids = sorted(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self._eos_t = torch.tensor(self.eos_ids, device=self.device)
        self._param_index = {_canonical_name(k): k for k in self.model.state_dict()}

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, requests: list[RolloutRequest]) -> list[Completion]:
        """Sample ``r.params.n`` completions per request, grouped and in request order."""
        t0 = time.perf_counter()
        self._calls += 1
        self._rows_pruned = 0
        rows: list[_Row] = []
        for ri, req in enumerate(requests):
            context = list(req.prompt_ids) + list(req.resume_ids)
            if not context:
                raise ValueError(f"request {ri} has an empty prompt")
            procs = self.logits_processors + list(req.meta.get("logits_processors", []))
            for j in range(req.params.n):
                base = (req.params.seed,) if req.params.seed is not None else (self.seed, self._calls, ri)
                rows.append(_Row(ri, j, context, req.params, _mix_seed(*base, j), procs, req.budget,
                                 len(req.resume_ids)))
        # group rows sharing processors, shortest contexts together (less padding per chunk)
        order = sorted(
            range(len(rows)),
            key=lambda i: (tuple(map(id, rows[i].processors)), len(rows[i].context)),
        )
        out: list[Completion | None] = [None] * len(rows)
        start = 0
        while start < len(order):
            key = tuple(map(id, rows[order[start]].processors))
            end = start
            while (end < len(order) and end - start < self.max_batch_size
                   and tuple(map(id, rows[order[end]].processors)) == key):
                end += 1
            chunk = order[start:end]
            for i, comp in zip(chunk, self._generate_chunk([rows[i] for i in chunk], requests)):
                out[i] = comp
            start = end
        completions = [c for c in out if c is not None]
        elapsed = time.perf_counter() - t0
        self._stats = {**generation_stats(completions, elapsed), "rollout/rows_pruned": float(self._rows_pruned)}
        return completions

    def _generate_chunk(self, rows: list[_Row], requests: list[RolloutRequest]) -> list[Completion]:
        """Decode one left-padded batch of rows; returns completions in ``rows`` order."""
        B, P = len(rows), max(len(r.context) for r in rows)
        T_max = max(r.params.max_new_tokens for r in rows)
        bt = _Batch.build(rows, P, T_max, self.pad_id, self.device)
        want_entropy = any(r.params.return_entropy for r in rows)
        processors = rows[0].processors
        # opt-in: processors with `needs_hidden_states` (budget guidance) read every layer's hidden
        # state at the current position from state.extra[HIDDEN_STATES_KEY]; off by default (cost)
        hidden_kw = {"output_hidden_states": True} if any(
            getattr(p, "needs_hidden_states", False) for p in processors) else {}
        state = DecodeState(
            requests=requests,
            request_index_B=torch.tensor([r.req_idx for r in rows], device=self.device),
            sample_index_B=torch.tensor([r.sample_idx for r in rows], device=self.device),
            num_generated_B=bt.ngen,
            temperature_B=bt.temp,
            budget_B=torch.tensor([-1 if r.budget is None else r.budget for r in rows], device=self.device),
        )
        # outputs, indexed by original row
        tok_BT = torch.full((B, T_max), self.pad_id, dtype=torch.long, device=self.device)
        lp_BT = torch.zeros((B, T_max), dtype=torch.float32, device=self.device)
        ent_BT = torch.zeros((B, T_max), dtype=torch.float32, device=self.device) if want_entropy else None
        gen_len, reason = [T_max] * B, ["length"] * B

        cache, logits_bV = self._prefill(bt.ids[:, :P], bt.attn[:, :P], state.extra if hidden_kw else None)
        kv = cache_name(self.model)  # the KV-cache keyword of this transformers version
        for step in range(T_max):
            if processors:
                state.num_generated_B, state.temperature_B = bt.ngen, bt.temp
                logits_bV = apply_processors(processors, step, bt.ids[:, : P + step], logits_bV, state)
                bt.temp = state.temperature_B
            logp_bV, ent_b = logprobs_and_entropy(logits_bV, bt.temp, want_entropy)
            tok_b = sample_rows(filter_top_k_top_p(logp_bV, bt.topk, bt.topp), bt.temp, bt.gens)
            live_b = ~bt.done
            tok_b = torch.where(live_b, tok_b, torch.full_like(tok_b, self.pad_id))
            tok_BT[bt.orig, step] = tok_b
            lp_BT[bt.orig, step] = logp_bV.gather(-1, tok_b[:, None])[:, 0]
            if ent_BT is not None and ent_b is not None:
                ent_BT[bt.orig, step] = ent_b
            bt.ids[:, P + step] = tok_b
            bt.attn[:, P + step] = 1
            bt.ngen = bt.ngen + live_b.long()
            eos_b = torch.isin(tok_b, self._eos_t) & live_b
            len_b = (bt.ngen >= bt.maxnew) & live_b
            stop_b = self._stop_hits(bt.ids, P, step, bt.stops, live_b & ~eos_b, bt.resumed)
            new_done_b = eos_b | len_b | stop_b
            for i in torch.nonzero(new_done_b).flatten().tolist():
                o = int(bt.orig[i])
                gen_len[o] = step + 1
                reason[o] = "stop" if bool(eos_b[i] | stop_b[i]) else "length"
            bt.done = bt.done | new_done_b
            if bool(bt.done.all()):
                break
            n_rows = bt.done.numel()
            if (self.prune_finished and n_rows >= PRUNE_MIN_ROWS
                    and int(bt.done.sum()) > PRUNE_FRACTION * n_rows):
                keep = torch.nonzero(~bt.done).flatten()
                self._rows_pruned += n_rows - keep.numel()
                cache.batch_select_indices(keep)
                bt.select(keep)
                tok_b = tok_b[keep]
                for name in ("request_index_B", "sample_index_B", "budget_B"):
                    setattr(state, name, getattr(state, name)[keep])
            res = self.model(input_ids=tok_b[:, None], attention_mask=bt.attn[:, : P + step + 1],
                             position_ids=bt.pos[:, None], use_cache=True, **{kv: cache}, **hidden_kw)
            cache, logits_bV = getattr(res, kv), res.logits[:, -1, :]
            if hidden_kw:
                state.extra[HIDDEN_STATES_KEY] = _last_hidden(res)
            bt.pos = bt.pos + 1
        return [self._completion(rows[i], requests, tok_BT[i], lp_BT[i],
                                 None if ent_BT is None else ent_BT[i], gen_len[i], reason[i])
                for i in range(B)]

    def _prefill(self, ids_BP: torch.Tensor, attn_BP: torch.Tensor, hidden_out: dict[str, Any] | None = None):
        """Prefill the left-padded contexts, each distinct context once (the n samples of a
        request share it); the KV cache and last logits are then expanded to every row.
        With ``hidden_out``, the last position's hidden states go to ``hidden_out[HIDDEN_STATES_KEY]``."""
        first, inverse = unique_rows(ids_BP, attn_BP)
        if len(first) == len(inverse):
            first, inverse = None, None
        ids_u, attn_u = (ids_BP, attn_BP) if first is None else (ids_BP[first], attn_BP[first])
        pos_u = (attn_u.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids_u, attention_mask=attn_u, position_ids=pos_u, use_cache=True, logits_to_keep=1,
                         **({"output_hidden_states": True} if hidden_out is not None else {}))
        cache, logits = output_cache(self.model, res), res.logits[:, -1, :]
        if hidden_out is not None:
            hidden = _last_hidden(res)
            hidden_out[HIDDEN_STATES_KEY] = hidden if inverse is None else hidden[inverse]
        if inverse is not None:
            cache.batch_select_indices(inverse)
            logits = logits[inverse]
        return cache, logits

    def _stop_hits(self, ids_bT: torch.Tensor, P: int, step: int, stops: list[tuple[str, ...]],
                   check_b: torch.Tensor, resumed: list[int]) -> torch.Tensor:
        """(b,) bool: rows whose decoded generated tail now contains one of their stop strings."""
        hit_b = torch.zeros_like(check_b)
        rows = [i for i in range(len(stops)) if stops[i]]
        if not rows:
            return hit_b
        check = check_b.tolist()
        for i in rows:
            if not check[i]:
                continue
            window = 2 * max(len(s) for s in stops[i]) + 4  # tokens; >= the chars of any stop
            # a resumed segment: the stop string may begin in the earlier segments' tail
            lo = max(P - min(resumed[i], window), P + step + 1 - window)
            tail = self.tokenizer.decode(ids_bT[i, lo : P + step + 1].tolist(), skip_special_tokens=True)
            if lo < P:  # only a stop string that ends in this call's tokens counts
                prev = self.tokenizer.decode(ids_bT[i, lo:P].tolist(), skip_special_tokens=True)
                hit = any(tail.count(s) > prev.count(s) for s in stops[i])
            else:
                hit = any(s in tail for s in stops[i])
            if hit:
                hit_b[i] = True
        return hit_b

    def _completion(self, row: _Row, requests: list[RolloutRequest], tok_T: torch.Tensor,
                    lp_T: torch.Tensor, ent_T: torch.Tensor | None, n: int, reason: str) -> Completion:
        tokens = tok_T[:n].tolist()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" and row.params.stop:
            # the stop string is kept, text after it (inside the last token) is not
            cuts = [text.find(s) + len(s) for s in row.params.stop if s in text]
            if cuts:
                text = text[: min(cuts)]
        req = requests[row.req_idx]
        return Completion(
            prompt_ids=list(req.prompt_ids),
            token_ids=tokens,
            logprobs=lp_T[:n].tolist(),
            finish_reason=reason,
            group_id=req.group_id,
            entropies=ent_T[:n].tolist() if ent_T is not None and row.params.return_entropy else None,
            text=text,
            policy_version=self.policy_version,
            meta={"sample_index": row.sample_idx},
        )

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(self, prefixes: list[list[int]], continuations: list[list[int]], *,
              temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced ``log softmax(z / temperature)`` of each continuation token.

        Rows are left padded so every continuation ends in the last column, which lets the
        forward materialise logits only for the last ``max(len(cont)) + 1`` positions.
        """
        if len(prefixes) != len(continuations):
            raise ValueError("prefixes and continuations differ in length")
        if any(not p for p in prefixes):
            raise ValueError("every prefix needs at least one token (nothing predicts token 0)")
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
        out: list[list[float]] = [[] for _ in prefixes]
        start = 0
        while start < len(order):
            end, C = start, 0
            while end < len(order) and end - start < self.max_batch_size:
                c = max(C, len(continuations[order[end]]))
                if end > start and (end - start + 1) * (c + 1) * vocab > _SCORE_MAX_LOGITS:
                    break
                C, end = c, end + 1
            chunk = order[start:end]
            start = end
            if C == 0:
                continue
            for i, lp in zip(chunk, self._score_chunk([prefixes[i] for i in chunk],
                                                      [continuations[i] for i in chunk], C, temperature)):
                out[i] = lp
        return out

    def _score_chunk(self, prefixes: list[list[int]], conts: list[list[int]], C: int,
                     temperature: float) -> list[list[float]]:
        seqs = [list(p) + list(c) for p, c in zip(prefixes, conts)]
        L = max(len(s) for s in seqs)
        ids_BL = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        attn_BL = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_BL[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            attn_BL[i, L - len(s):] = 1
        ids_BL, attn_BL = ids_BL.to(self.device), attn_BL.to(self.device)
        pos_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)
        logits_BKV = self.model(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL,
                                use_cache=False, logits_to_keep=C + 1).logits
        # kept column k is position L-C-1+k and predicts position L-C+k; continuation i
        # occupies the last len(c) positions -> columns C-len(c) .. C-1
        logp_BKV = torch.log_softmax(logits_BKV[:, :-1].float() / temperature, dim=-1)
        target_BK = ids_BL[:, L - C:]
        tok_lp_BK = logp_BKV.gather(-1, target_BK[..., None])[..., 0].cpu()
        return [tok_lp_BK[i, C - len(c):].tolist() for i, c in enumerate(conts)]

    # ------------------------------------------------------------------ weights & memory

    @torch.no_grad()
    def load_weights(self, state: Mapping[str, Any], version: int | None = None) -> None:
        """Copy tensors into the model by name; bumps (or sets) ``policy_version``.

        Names may be plain (``model.layers.0...``) or PEFT-wrapped (``base_model.model.``,
        ``.base_layer``, adapter name ``default`` optional), so full state dicts and
        ``get_peft_model_state_dict`` adapters both load. Unknown names raise ``KeyError``.
        """
        params = self.model.state_dict()
        missing = []
        for name, value in state.items():
            key = self._param_index.get(_canonical_name(name))
            if key is None:
                missing.append(name)
                continue
            target = params[key]
            value = torch.as_tensor(value)
            if value.shape != target.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        if missing:
            hint = "" if self.lora else " (LoRA tensors need an engine built with lora=...)"
            raise KeyError(f"unknown parameter names {missing[:5]} ({len(missing)} total){hint}")
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def sleep(self) -> None:
        """Move weights to CPU and free accelerator memory (no-op on CPU)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def wake(self) -> None:
        """Move weights back to ``device`` (no-op on CPU)."""
        if self.device.type != "cpu":
            self.model.to(self.device)

    def engine_stats(self) -> dict[str, float]:
        """Metrics of the last ``generate`` call (tokens generated, seconds, tokens/s)."""
        return dict(self._stats)
