"""Single-process torch learner: logprobs/entropy, micro-batched PPO-style updates, AdamW, LoRA.

The policy loss, aggregation and KL come from the registries in :mod:`rlkit.algorithms`; the
learner never branches on a method's name. Aggregation uses the token/sequence counts of the whole
mini-batch, so the gradient does not depend on ``micro_batch_size`` (tested).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlkit.algorithms import (
    LOSS_MASKS,
    POLICY_LOSSES,
    PolicyLossInputs,
    RolloutCorrectionParams,
    aggregate,
    apply_loss_masks,
    kl_penalty,
    rollout_correction,
)
from rlkit.loop.batch import TrainBatch, pad_to
from rlkit.schema import AlgorithmConfig, Config, LearnerConfig, ModelConfig, TrainConfig
from rollout.hf_cache import cache_kwargs, output_cache
from rollout.sampling import unique_rows


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier at RL step ``step`` (0-based): linear warm-up, then constant/linear/cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def prompt_groups(mb: TrainBatch) -> tuple[Tensor, Tensor]:
    """Rows of ``mb`` that share an identical (left-padded) prompt.

    Returns ``(first_U, inverse_B)``: the index of one representative row per distinct prompt and,
    for every row, which distinct prompt it has (``first_U[inverse_B]`` has row ``b``'s prompt).
    """
    P = mb.prompt_width
    return unique_rows(mb.input_ids_BS[:, :P], mb.attention_mask_BS[:, :P])


def _response_logits(model: torch.nn.Module, mb: TrainBatch, share_prompt: bool) -> Tensor:
    """Logits [B, T, V] predicting each response token (position t predicts token t).

    With ``share_prompt``, rows with the same prompt (a GRPO group) run that prompt forward once;
    its KV cache (with grad) is expanded to the rows and the responses run on top of it. This is
    exact: the same attention over the same keys and values, with gradients from every response
    flowing back through the shared prompt activations.
    """
    ids, attn = mb.input_ids_BS, mb.attention_mask_BS
    P = mb.prompt_width
    T = ids.shape[1] - P
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    first_U, inverse_B = prompt_groups(mb) if share_prompt and P > 0 else (None, None)
    if first_U is None or len(first_U) == len(inverse_B):
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False)
        return out.logits[:, -(T + 1) : -1]
    head = model(input_ids=ids[first_U, :P], attention_mask=attn[first_U, :P], position_ids=pos[first_U, :P],
                 use_cache=True, logits_to_keep=1)
    first_BV = head.logits[inverse_B, -1]
    if T == 1:
        return first_BV[:, None]
    cache = output_cache(model, head)
    cache.batch_select_indices(inverse_B)  # U -> B rows; indexing keeps the autograd graph
    tail = model(input_ids=ids[:, P:-1], attention_mask=attn[:, :-1], position_ids=pos[:, P:-1],
                 use_cache=True, **cache_kwargs(model, cache))
    return torch.cat([first_BV[:, None], tail.logits], dim=1)


def response_logprobs(
    model: torch.nn.Module, mb: TrainBatch, *, with_entropy: bool, share_prompt: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropy) of the response tokens under ``model``; one forward pass.

    Returns ``logprobs_BT`` (with grad if enabled) and ``entropy_BT`` (detached) for ``mb``'s T.
    ``share_prompt`` runs each distinct prompt once (see :func:`_response_logits`).
    """
    logits = _response_logits(model, mb, share_prompt).float()
    if mb.temperature and mb.temperature != 1.0:
        logits = logits / mb.temperature
    logz = torch.logsumexp(logits, dim=-1)
    tok = mb.response_ids_BT.unsqueeze(-1)
    logprobs = logits.gather(-1, tok).squeeze(-1) - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.softmax(logits.detach(), dim=-1)
            entropy = logz.detach() - (p * logits.detach()).sum(-1)
    return logprobs, entropy


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for a forward-only pass, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def plan_micro_batches(batch: TrainBatch, rows, size: int | None, share_prompt: bool,
                       max_tokens: int | None = None) -> list[list[int]]:
    """Split ``rows`` into micro-batches of rows of similar length (less padding).

    Fixed count: ``size`` rows each. Token budget (``max_tokens``): consecutive rows of the
    length-sorted order while the micro-batch's padded size (rows x (longest prompt + longest
    response)) stays within ``max_tokens``, and at most ``size`` rows when ``size`` is given; a row
    (or prompt group) over the budget on its own gets a micro-batch of its own. Rows sharing a
    prompt stay together (longest groups first), so with ``share_prompt`` a micro-batch holds whole
    groups and runs each prompt once. Deterministic in its inputs, so every data-parallel rank
    computes the same plan. The gradient does not depend on the plan: every micro-batch is
    aggregated with the whole mini-batch's counts (:func:`aggregation_counts`).
    """
    rows = list(rows)
    if not rows:
        return []
    lens = batch.attention_mask_BS[rows].sum(1).tolist()
    _, inv = prompt_groups(batch.select(rows)) if share_prompt else (None, torch.arange(len(rows)))
    inv = inv.tolist()
    group_len: dict[int, int] = {}
    for g, n in zip(inv, lens):
        group_len[g] = max(group_len.get(g, 0), n)
    order = sorted(zip((-group_len[g] for g in inv), inv, (-n for n in lens), rows))
    if max_tokens is None:
        flat = [r for *_, r in order]
        return [flat[i : i + size] for i in range(0, len(flat), size)]
    P = batch.prompt_width
    plen = dict(zip(rows, batch.attention_mask_BS[rows, :P].sum(1).tolist()))
    rlen = dict(zip(rows, batch.response_mask_BT[rows].sum(1).tolist()))
    units: list[list[int]] = []  # rows that must share a micro-batch: a prompt group, or one row
    last_group = None
    for _, g, _, r in order:
        if units and share_prompt and g == last_group:
            units[-1].append(r)
        else:
            units.append([r])
        last_group = g
    plan: list[list[int]] = []
    cur: list[int] = []
    for unit in units:
        cand = cur + unit
        cost = len(cand) * (max(plen[r] for r in cand) + max(rlen[r] for r in cand))
        if cur and (cost > max_tokens or (size is not None and len(cand) > size)):
            plan.append(cur)
            cand = list(unit)
        cur = cand
    return plan + [cur]


def update_schedule(batch_size: int, train_cfg: TrainConfig, step: int) -> list[tuple[int, list[int]]]:
    """``(epoch, rows)`` of each optimizer update of one train step, in order.

    ``ppo_epochs`` passes over ``mini_batches`` mini-batches; rows are shuffled per epoch when
    there is more than one mini-batch, seeded by ``step`` (so identical on every rank). A batch size
    that ``mini_batches`` does not divide (BRPO adds a varying number of summary rows) is split into
    near-equal mini-batches, so no row is dropped.
    """
    gen = torch.Generator().manual_seed(int(step))
    n = train_cfg.mini_batches
    out: list[tuple[int, list[int]]] = []
    for epoch in range(train_cfg.ppo_epochs):
        perm = torch.randperm(batch_size, generator=gen).tolist() if n > 1 else list(range(batch_size))
        out.extend((epoch, perm[m * batch_size // n : (m + 1) * batch_size // n]) for m in range(n))
    return out


def prepare_logprobs(batch: TrainBatch, algo: AlgorithmConfig, train_cfg: TrainConfig, compute_logprobs) -> bool:
    """Fill ``batch.old_logprobs_BT`` / ``ref_logprobs_BT`` as the config asks; return ``on_policy``.

    On-policy (one update per batch, ``old_logprobs: auto``) the ratio denominator is the current
    log-probs, detached, so no extra forward pass runs. ``compute_logprobs(batch, reference=...,
    entropy_out=...)`` is the learner's forward-only pass. The pre-update pass (the old-log-prob
    recompute, or one for the entropies alone when a loss mask gates on the mini-batch's entropy)
    also fills ``batch.old_entropy_BT``: statistics that must not depend on how the mini-batch is
    split into micro-batches or ranks come from it.
    """
    on_policy = algo.old_logprobs == "auto" and train_cfg.ppo_epochs * train_cfg.mini_batches == 1
    entropy_BT = torch.zeros_like(batch.response_mask_BT)
    if algo.old_logprobs == "rollout":
        batch.old_logprobs_BT = batch.rollout_logprobs_BT
    elif not on_policy:
        batch.old_logprobs_BT = compute_logprobs(batch, entropy_out=entropy_BT)
        batch.old_entropy_BT = entropy_BT
    if batch.old_entropy_BT is None and needs_batch_entropy(algo):
        compute_logprobs(batch, entropy_out=entropy_BT)
        batch.old_entropy_BT = entropy_BT
    if algo.kl.beta > 0:
        batch.ref_logprobs_BT = compute_logprobs(batch, reference=True)
    return on_policy


def needs_batch_entropy(algo: AlgorithmConfig) -> bool:
    """A configured loss mask gates on the mini-batch's mean entropy (DMMPT ``entropy_scope: batch``)."""
    return any(getattr(LOSS_MASKS.build_params(name, kw), "entropy_scope", None) == "batch"
               for name, kw in (algo.loss_mask or {}).items())  # fmt: skip


def batch_mean_entropy(batch: TrainBatch, rows: list[int]) -> float | None:
    """Token-mean pre-update entropy of mini-batch ``rows`` (None without the pre-update pass)."""
    if batch.old_entropy_BT is None:
        return None
    mask = batch.response_mask_BT[rows]
    return float((batch.old_entropy_BT[rows] * mask).sum() / mask.sum().clamp(min=1.0))


def pre_update_entropies(batch: TrainBatch) -> list[Tensor]:
    """Response-token entropies of the pre-update pass, or [] when there was none."""
    if batch.old_entropy_BT is None:
        return []
    return [batch.old_entropy_BT[batch.response_mask_BT > 0]]


def run_train_step(learner: Any, batch: TrainBatch, keep_entropies: bool = True) -> dict[str, float]:
    """One train step, shared by both learners (only their ``_update`` differs): old/ref log-probs,
    then the PPO epochs over mini-batches; returns the metrics averaged over updates.
    ``keep_entropies``: keep the pre-update pass's entropies for ``entropy_stats`` (one rank)."""
    t0 = time.perf_counter()
    on_policy = prepare_logprobs(batch, learner.algo, learner.train_cfg, learner.compute_logprobs)
    learner._entropies = pre_update_entropies(batch) if keep_entropies else []
    norm_length = float(learner.algo.norm_length or batch.response_mask_BT.shape[1])
    sums: dict[str, float] = {}
    schedule = update_schedule(len(batch), learner.train_cfg, int(learner.scheduler.last_epoch))
    for i, (_, rows) in enumerate(schedule):
        # without a pre-update pass, the first update's forward passes give the entropy statistics
        collect = i == 0 and batch.old_entropy_BT is None
        for k, v in learner._update(batch, rows, norm_length, on_policy, collect_entropy=collect).items():
            merge_metric(sums, k, v)
    learner.scheduler.step()
    padded, valid = sums.pop("perf/padded_tokens", 0.0), sums.pop("perf/valid_tokens", 0.0)
    metrics = {k: v if k.endswith("_max") else v / len(schedule) for k, v in sums.items()}
    if padded:
        metrics["perf/pad_frac"] = 1.0 - valid / padded  # padding share of the learner's forward tokens
    metrics["actor/lr"] = learner.optimizer.param_groups[0]["lr"]
    metrics["time/train_s"] = time.perf_counter() - t0
    return metrics


def aggregation_counts(batch: TrainBatch, rows: list[int], norm_length: float) -> dict[str, float]:
    """Token/sequence counts of the whole mini-batch ``rows``, the divisors of :func:`aggregate`: every
    micro-batch (and data-parallel shard) divides by these, so the summed gradients equal the whole
    mini-batch's gradient however its rows are split."""
    mask = batch.response_mask_BT[rows]
    num_seqs = float((mask.sum(-1) > 0).sum().clamp(min=1))  # fully masked rows are not sequences (verl)
    return dict(num_tokens=float(mask.sum().clamp(min=1.0)), num_seqs=num_seqs, norm_length=norm_length)


@dataclass
class MicroBatchLoss:
    loss: Tensor  # scalar with grad: this micro-batch's share of the mini-batch loss
    metrics: dict[str, float]  # additive shares of the mini-batch metrics (sum over micro-batches)
    entropy_tokens: Tensor  # detached entropies of the micro-batch's response tokens [N]


def micro_batch_loss(
    model: torch.nn.Module,
    mb: TrainBatch,
    loss_fn,
    loss_params: Any,
    algo: AlgorithmConfig,
    agg: dict[str, float],
    *,
    on_policy: bool,
    share_prompt: bool,
    batch_mean_entropy: float | None = None,
) -> MicroBatchLoss:
    """Policy loss (+ KL) of one micro-batch, aggregated with the mini-batch counts ``agg``.

    ``loss_fn`` is a registered policy loss ``(PolicyLossInputs, params) -> (loss_BT, metrics)``.
    The metric shares add up over all micro-batches (and ranks) to the mini-batch value:
    ``pg_loss``/``kl``/``entropy`` by construction, the loss's own metrics by token share.
    """
    num_tokens = agg["num_tokens"]
    lp, ent = response_logprobs(model, mb, with_entropy=True, share_prompt=share_prompt)
    mask = mb.response_mask_BT
    old = lp.detach() if on_policy else mb.old_logprobs_BT
    inp = PolicyLossInputs(
        logprobs_BT=lp, old_logprobs_BT=old, advantages_BT=mb.advantages_BT, response_mask_BT=mask, entropy_BT=ent,
    )
    loss_BT, lm = loss_fn(inp, loss_params)
    if mb.rollout_logprobs_BT is not None:  # mismatch diagnostics always, the correction if configured
        rc = algo.rollout_correction
        weight_BT, cm = rollout_correction(old.detach(), mb.rollout_logprobs_BT, mask,
                                           RolloutCorrectionParams(rc.mode, rc.level, rc.clip))  # fmt: skip
        loss_BT = loss_BT * weight_BT
        lm = {**lm, **{f"mismatch/{k}": v for k, v in cm.items()}}
    if algo.loss_mask:  # e.g. DMMPT; aggregation keeps the full mask as its denominator
        loss_BT, mm = apply_loss_masks(loss_BT, inp, algo.loss_mask, positive_B=mb.correct_B,
                                       batch_mean_entropy=batch_mean_entropy)  # fmt: skip
        lm = {**lm, **mm}
    pg = aggregate(loss_BT, mask, algo.loss_agg, **agg)
    loss = pg
    acc: dict[str, float] = {}
    w = float(mask.sum()) / num_tokens  # token share of this micro-batch, for metrics
    if algo.kl.beta > 0:
        kl_BT = kl_penalty(lp, mb.ref_logprobs_BT, algo.kl.estimator)
        loss = loss + algo.kl.beta * aggregate(kl_BT, mask, algo.loss_agg, **agg)
        acc["actor/kl"] = float((kl_BT.detach() * mask).sum()) / num_tokens
    acc["actor/pg_loss"] = float(pg.detach())
    acc["actor/entropy"] = float((ent * mask).sum()) / num_tokens
    for k, v in lm.items():
        key = k if k.startswith("mismatch/") else f"actor/{k}"
        acc[key] = float(v) if k.endswith("_max") else float(v) * w
    # token counts of the forward pass (summed over micro-batches, then a ratio: perf/pad_frac)
    acc["perf/padded_tokens"] = float(mb.attention_mask_BS.numel())
    acc["perf/valid_tokens"] = float(mb.attention_mask_BS.sum())
    return MicroBatchLoss(loss, acc, ent[mask > 0].detach())


def merge_metric(acc: dict[str, float], key: str, value: float) -> None:
    """Add a micro-batch's (or rank's) metric share into ``acc``; ``*_max`` metrics take the max."""
    acc[key] = max(acc.get(key, value), value) if key.endswith("_max") else acc.get(key, 0.0) + value


def learner_sections(cfg: Config) -> tuple[ModelConfig, LearnerConfig, AlgorithmConfig, TrainConfig, int]:
    """The parts of a run's config a learner reads."""
    return cfg.model, cfg.learner, cfg.learner_algorithm, cfg.train, cfg.seed


def learner_schedule(learner: Any, optimizer: Any, learner_cfg: LearnerConfig, algo_cfg: AlgorithmConfig,
                     train_cfg: TrainConfig) -> None:
    """What both learners set up alike: their configs, the LR scheduler (warm-up, then the
    schedule over ``train.steps``) and the registered policy loss with its params."""
    learner.cfg, learner.algo, learner.train_cfg = learner_cfg, algo_cfg, train_cfg
    learner.scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=learner_cfg.warmup_steps, total=train_cfg.steps,
                                       schedule=learner_cfg.lr_schedule))
    learner.loss_entry = POLICY_LOSSES.get(algo_cfg.policy_loss)
    learner.loss_params = POLICY_LOSSES.build_params(algo_cfg.policy_loss, algo_cfg.loss_params)
    learner._entropies = []


class TorchLearner:
    """Holds the trainable policy (+ optional frozen reference) and its optimizer."""

    def __init__(self, model_path: str, cfg: Config) -> None:
        """``cfg``: the run's config (``model``, ``learner``, ``train``, ``seed`` and the algorithm as
        the learner reads it, :attr:`Config.learner_algorithm`)."""
        from rlkit.infra.models import load_model

        model_cfg, learner_cfg, algo_cfg, train_cfg, seed = learner_sections(cfg)

        torch.manual_seed(seed)
        if learner_cfg.num_threads:
            torch.set_num_threads(learner_cfg.num_threads)
        self.cfg, self.algo, self.train_cfg = learner_cfg, algo_cfg, train_cfg
        lora = model_cfg.lora.model_dump() if model_cfg.lora.rank > 0 else None
        self.lora = lora is not None
        self.model = load_model(
            model_path,
            dtype=model_cfg.dtype,
            lora=lora,
            gradient_checkpointing=model_cfg.gradient_checkpointing,
        )
        self.model.train()
        self.ref_model = None
        if algo_cfg.kl.beta > 0 and not self.lora:
            self.ref_model = load_model(model_path, dtype=model_cfg.dtype).eval()
            self.ref_model.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=learner_cfg.lr, betas=learner_cfg.betas, weight_decay=learner_cfg.weight_decay
        )
        learner_schedule(self, self.optimizer, learner_cfg, algo_cfg, train_cfg)
        # a prompt KV cache cannot be built under gradient checkpointing (HF drops use_cache)
        self.share_prompt = learner_cfg.share_prompt and not model_cfg.gradient_checkpointing
        self._entropies: list[Tensor] = []  # per-token entropies of the last step (first epoch)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.num_trainable = sum(p.numel() for p in params)

    # ------------------------------------------------------------------ forward-only passes
    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, reference: bool = False,
                         entropy_out: Tensor | None = None) -> Tensor:
        """Log-probs of the responses under the current (or reference) policy: float [B, T].
        ``entropy_out`` [B, T]: filled with the tokens' entropies from the same pass. Runs in eval
        mode: dropout (e.g. LoRA's) would make the recomputed log-probs random."""
        T = batch.response_mask_BT.shape[1]
        out = torch.zeros_like(batch.response_mask_BT)
        with eval_mode(self.model):
            for idx in self._micro_batches(batch, range(len(batch))):
                mb = batch.select(idx)
                if reference and self.lora:
                    with self.model.disable_adapter():
                        lp, _ = response_logprobs(self.model, mb, with_entropy=False, share_prompt=self.share_prompt)
                else:
                    model = self.ref_model if reference else self.model
                    lp, ent = response_logprobs(model, mb, with_entropy=entropy_out is not None,
                                                share_prompt=self.share_prompt)  # fmt: skip
                    if entropy_out is not None:
                        entropy_out[idx] = pad_to(ent * mb.response_mask_BT, T)
                out[idx] = pad_to(lp, T)
        return out * batch.response_mask_BT

    # ------------------------------------------------------------------ update
    def _micro_batches(self, batch: TrainBatch, rows) -> list[list[int]]:
        """Split rows into micro-batches (see :func:`plan_micro_batches`)."""
        budget = self.cfg.max_tokens_per_micro_batch
        return plan_micro_batches(batch, rows, None if budget else self.cfg.micro_batch_size, self.share_prompt,
                                  max_tokens=budget)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """PPO epochs over mini-batches; returns averaged metrics (namespaced ``actor/``)."""
        self.model.train()
        return run_train_step(self, batch)

    def _update(self, batch: TrainBatch, rows: list[int], norm_length: float, on_policy: bool,
                collect_entropy: bool = False) -> dict[str, float]:
        agg = aggregation_counts(batch, rows, norm_length)
        self.optimizer.zero_grad(set_to_none=True)
        acc: dict[str, float] = {}
        mean_entropy = batch_mean_entropy(batch, rows)
        for idx in self._micro_batches(batch, rows):
            mb = batch.select(idx)
            out = micro_batch_loss(self.model, mb, self.loss_entry.fn, self.loss_params, self.algo, agg,
                                   on_policy=on_policy, share_prompt=self.share_prompt,
                                   batch_mean_entropy=mean_entropy)  # fmt: skip
            out.loss.backward()
            if collect_entropy:
                self._entropies.append(out.entropy_tokens)
            for k, v in out.metrics.items():
                merge_metric(acc, k, v)
        params = [p for p in self.model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if torch.isfinite(gn):
            self.optimizer.step()
        else:
            acc["actor/skipped_nonfinite"] = 1.0
        acc["actor/grad_norm"] = float(gn)
        return acc

    def entropy_stats(self, pivot: float, replicate_release_sign: bool = False) -> list[float] | None:
        """HAPO sampling statistics (docs/algorithms.md §3.1) of the last step's token entropies under the policy
        that sampled the batch: the old-log-prob pass, else the first update's forward passes (the first
        mini-batch with ``old_logprobs: rollout``). No extra forward pass; ``None`` without entropies."""
        from rlkit.algorithms.hapo import hapo_sampling_stats

        stats = hapo_sampling_stats(torch.cat(self._entropies), pivot=pivot,
                                    replicate_release_sign=replicate_release_sign) if self._entropies else None
        return None if stats is None else [float(x) for x in stats]

    def temperature_stats(self, applied: list[float], tau: float) -> dict[str, float]:
        """HAPO's ``T'/T`` over the last step's tokens, from the entropies of ``entropy_stats`` and the
        statistics ``applied`` that the sampler used (``temperature_factor_summary``)."""
        from rollout.adaptive_temperature import temperature_factor_summary

        return temperature_factor_summary(torch.cat(self._entropies), applied, tau) if self._entropies else {}

    # ------------------------------------------------------------------ sync / checkpoint
    def state_for_sync(self) -> dict[str, Tensor]:
        """Tensors the engines need: the adapter only under LoRA, else all weights."""
        if self.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model_state": self.state_for_sync(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state["model_state"])
        else:
            self.model.load_state_dict(state["model_state"], strict=False)
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])

    def export(self, out_dir: str, tokenizer_path: str) -> str:
        """Write a plain HF model dir (full FT) or a PEFT adapter dir (LoRA), with the tokenizer."""
        from rlkit.infra.checkpoint import export_hf
        from rlkit.infra.models import load_tokenizer

        export_hf(self.model, load_tokenizer(tokenizer_path), out_dir)
        return out_dir

    def info(self) -> dict[str, int]:
        return {"params": self.num_params, "trainable": self.num_trainable}
