"""The RL loop: generate -> score -> advantages -> update -> sync weights -> log / checkpoint.

``Trainer.run`` reads top to bottom; every stage is a named function in :mod:`rlkit.experience`,
:mod:`rlkit.orchestration.ray_actors`, :mod:`rlkit.checkpoint` or :mod:`rlkit.tracking`.
Resuming restores weights, optimizer, scheduler, RNG and the data cursor, and every sampling seed
is derived from (seed, step), so a resumed run logs the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from rlkit import experience as X
from rlkit.config import Config, save_config


def _fault_injection(step: int) -> None:
    """Test hook: ``RLKIT_KILL_AT_STEP=N`` SIGKILLs this process in the middle of step N."""
    at = os.environ.get("RLKIT_KILL_AT_STEP")
    if at and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.resume = resume

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from rewards import RewardManager
        from rlkit.checkpoint import latest_checkpoint
        from rlkit.data import PromptCursor, load_rows, split_rows
        from rlkit.models import load_tokenizer, resolve_model_path

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir)
        if cfg.checkpoint.resume == "must" and ckpt is None:
            raise FileNotFoundError(f"checkpoint.resume=must but no checkpoint in {self.run_dir}")
        if self.resume is False or cfg.checkpoint.resume == "never":
            ckpt = None
        self.ckpt_path = ckpt
        save_config(cfg, self.run_dir / "config.yaml")

        self.model_path = resolve_model_path(cfg.model.name)
        self.tokenizer = load_tokenizer(self.model_path)
        d = cfg.data
        rows, stats = load_rows(
            d.source, path=d.path, split=d.split, prompt_key=d.prompt_key, answer_key=d.answer_key,
            on_bad_row=d.on_bad_row, generator_kwargs=d.generator, seed=cfg.seed, limit=d.limit,
        )
        self.data_stats = stats
        self.train_rows, self.eval_rows = split_rows(rows, d.eval_size, cfg.seed)
        if not self.train_rows:
            raise ValueError("no training rows left after the eval split; lower data.eval_size")
        self.cursor = PromptCursor(len(self.train_rows), cfg.seed, shuffle=d.shuffle)
        self._prompt_cache: dict[int, list[int]] = {}
        self.manager = RewardManager.from_config(cfg.reward, plugins=[*cfg.reward.plugins, *cfg.plugins])
        keys = [v.label or v.name.rpartition(":")[2] for v in cfg.reward.verifiers]  # the manager's per-verifier keys
        self.acc_key = "math" if "math" in keys else keys[0]
        from rewards.length import LengthShaping

        self.shaping = LengthShaping.from_config(cfg.reward.length_shapers)
        from rlkit.algorithms import ADVANTAGES

        a = cfg.algorithm
        self.adv_params = ADVANTAGES.build_params(a.advantage, a.advantage_params)
        # an advantage's params may adapt the training rollout's sampling (BRPO: the thinking)
        self.rollout_params = getattr(self.adv_params, "rollout_params", None)
        self.sampler_stats: list[float] | None = None  # HAPO adaptive temperature, from the last step
        self.policy_version = 0  # step of the engines' weights: the last step that updated and synced

        from rlkit.orchestration.ray_actors import init_ray, spawn_actors

        init_ray(cfg)
        engine_kwargs = {"dtype": cfg.model.dtype, "max_batch_size": cfg.engine.max_batch_size, "seed": cfg.seed}
        if cfg.model.lora.rank > 0:
            engine_kwargs["lora"] = cfg.model.lora.model_dump()
        if cfg.engine.name == "vllm":  # rollout.vllm.VLLMEngine keyword arguments
            engine_kwargs.update(cfg.engine.vllm.model_dump())
        if cfg.model.budget_guidance:  # guided sampling for requests that carry a budget (data.budget)
            engine_kwargs["budget_guidance"] = str(Path(cfg.model.budget_guidance).resolve())
            engine_kwargs["budget_guidance_params"] = dict(cfg.model.budget_guidance_params)
        self.learner, self.engines = spawn_actors(cfg, self.model_path, engine_kwargs)
        self.segments = None  # UloRL segment rollout (spec §5): carries unfinished samples across steps
        if cfg.segments.enabled:
            from rlkit.segment_collect import SegmentRollout

            self.segments = SegmentRollout(
                cfg, lambda reqs: X.generate(self.engines, reqs)[0], self.cursor, self.train_rows, self.encode,
                lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), self.run_dir,
            )

    def encode(self, row: dict, budget=None) -> list[int]:
        """Prompt token ids of ``row`` (with its token ``budget`` written in, if any); cached."""
        from rlkit.data import format_prompt
        from rlkit.models import apply_chat_template

        key = (id(row), budget)
        if key not in self._prompt_cache:
            msgs = format_prompt(row, self.cfg.data.system_prompt, self.cfg.data.prompt_template)
            if budget is not None:
                from rewards.budget_prompt import apply_budget, budget_params

                msgs = apply_budget(msgs, budget, budget_params(self.cfg.data.budget))
            self._prompt_cache[key] = apply_chat_template(self.tokenizer, msgs)
        return self._prompt_cache[key]

    # ------------------------------------------------------------------ checkpoint
    def _restore(self) -> int:
        import ray

        from rlkit.checkpoint import load_checkpoint, restore_rng_state

        if self.ckpt_path is None:
            return 0
        state = load_checkpoint(self.ckpt_path)
        ray.get(self.learner.load_checkpoint_state.remote(state))
        ts = state["trainer_state"]
        self.cursor.load_state_dict(ts["cursor"])
        restore_rng_state(ts["rng"])
        if "length_shaping" in ts:
            self.shaping.load_state_dict(ts["length_shaping"])
        self.sampler_stats = ts.get("sampler_stats")
        self.policy_version = int(ts.get("policy_version", state["step"]))  # a skipped update keeps the old one
        if self.segments is not None:
            self.segments.load_state_dict(ts.get("segments"))
        return int(state["step"])

    def _save(self, step: int) -> Path:
        import ray

        from rlkit.checkpoint import capture_rng_state, save_checkpoint

        st = ray.get(self.learner.checkpoint_state.remote())
        return save_checkpoint(
            self.run_dir, step, model_state=st["model_state"], optimizer_state=st["optimizer_state"],
            scheduler_state=st["scheduler_state"], keep_last=self.cfg.checkpoint.keep_last,
            trainer_state={"cursor": self.cursor.state_dict(), "rng": capture_rng_state(), "step": step,
                           "length_shaping": self.shaping.state_dict(), "sampler_stats": self.sampler_stats,
                           "policy_version": self.policy_version,
                           "segments": self.segments.state_dict() if self.segments is not None else None},
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        from rlkit.orchestration.ray_actors import sync_weights
        from rlkit.sysmon import MemoryMonitor
        from rlkit.tracking import Tracker

        cfg = self.cfg
        t_setup = time.perf_counter()
        self.memory = MemoryMonitor().start()  # PSS of this process + Ray's processes (its descendants)
        self._setup()
        start = self._restore()
        if self.segments is not None:
            self.segments.open_log(start)
        if start:
            sync_weights(self.learner, self.engines, self.policy_version)
        tr = cfg.tracking
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "resumed_from": start}
        with Tracker(self.run_dir, total_steps=cfg.train.steps, start_step=start + 1,
                     tensorboard=tr.tensorboard, wandb=tr.wandb, console=tr.console) as tracker:
            self.engines.log = tracker.print  # engine restarts (rlkit.orchestration.engine_pool)
            tracker.print(f"rlkit: run dir {self.run_dir} | setup {time.perf_counter() - t_setup:.1f}s"
                          + (f" | resumed after step {start}" if start else ""))
            if cfg.eval.before and not start:
                summary["eval_before"] = self.evaluate(tracker, "before")
            for step in range(start + 1, cfg.train.steps + 1):
                metrics = self.step(step, tracker)
                metrics.update(self.memory.metrics())
                tracker.log(step, metrics)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                    self._save(step)
            if cfg.checkpoint.export_final:
                import ray

                out = str(self.run_dir / "final")
                ray.get(self.learner.export.remote(out, self.model_path))
                summary["final"] = out
            if cfg.eval.after:
                summary["eval_after"] = self.evaluate(tracker, "after")
            mem = self.memory.metrics()
            summary["peak_memory_gib"] = {"pss": round(mem["sys/mem_pss_peak_gib"], 3),
                                          "rss_sum": round(mem["sys/mem_rss_peak_gib"], 3)}
            tracker.print(f"peak memory (this process + Ray workers): PSS {mem['sys/mem_pss_peak_gib']:.2f} GiB"
                          f" (summed RSS {mem['sys/mem_rss_peak_gib']:.2f} GiB)")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.close()
        return summary

    def step(self, step: int, tracker) -> dict[str, float]:
        import ray

        from rlkit.orchestration.ray_actors import sync_weights

        cfg = self.cfg
        t0 = time.perf_counter()
        if self.segments is not None:
            groups, all_groups, m = self.segments.collect(step, self.manager, shaping=self.shaping,
                                                          acc_key=self.acc_key)
        else:
            groups, all_groups, m = X.collect(step, cfg, self.engines, self.cursor, self.train_rows,
                                              self.encode, self.manager, tracker.print, shaping=self.shaping,
                                              acc_key=self.acc_key, request_meta=self._request_meta(),
                                              params_fn=self.rollout_params)
        _fault_injection(step)
        train_groups, extras = self._advantage_extras(step, groups, m) if groups else (groups, {})
        m.update(X.rollout_metrics(all_groups, self.acc_key))
        if groups:
            batch, _, extras = X.make_batch(train_groups, cfg, self.tokenizer.pad_token_id, extras, self.acc_key)
            m.update({k: float(v) for k, v in extras.get("metrics", {}).items()})
            self._dump_inspect(step, groups, batch, extras)
            # colocated on GPUs: the engines give their memory to the learner while it trains
            swap = cfg.cluster.placement == "colocated" and cfg.cluster.engine_gpus > 0
            if swap:
                self.engines.sleep()
            m.update(ray.get(self.learner.train_step.remote(batch)))
            if swap:
                self.engines.wake()
            at = cfg.engine.adaptive_temperature
            if at.enabled:
                self.sampler_stats = ray.get(self.learner.entropy_stats.remote(at.pivot, at.replicate_release_sign))
            m["time/sync_s"] = sync_weights(self.learner, self.engines, step)
            self.policy_version = step
            if cfg.cluster.verify_sync_every and step % cfg.cluster.verify_sync_every == 0:
                m.update(self._verify_sync(step))
        else:
            tracker.print(f"step {step}: no informative group; update skipped")
        m.update(self.engines.metrics())  # cluster/actor_restarts: engines recreated after dying
        if cfg.model.budget_guidance:
            m.update(self.engines.guidance_metrics())
        gen_tokens = m.get("rollout/tokens_generated",  # segments: this step's tokens, not whole samples'
                           sum(len(c.token_ids) for g in all_groups for c in g.completions))
        m["time/step_s"] = time.perf_counter() - t0
        m["perf/gen_tokens_per_s"] = gen_tokens / max(m["time/gen_s"], 1e-9)
        m["perf/tokens_per_s"] = gen_tokens / m["time/step_s"]
        self._log_samples(step, all_groups, tracker)
        return m

    def _verify_sync(self, step: int) -> dict[str, float]:
        from rlkit.checkpoint import latest_checkpoint
        from rlkit.orchestration.sync_check import SyncVerificationError, verify_sync

        try:
            return verify_sync(self.engines, self.learner, step, self.cfg.cluster.verify_sync_tol)
        except SyncVerificationError as e:
            last = latest_checkpoint(self.run_dir)
            raise SyncVerificationError(f"{e}; stopping. Last checkpoint: {last or 'none'}") from None

    def _request_meta(self) -> dict[str, Any]:
        """Per-request extras for training rollouts: HAPO's adaptive temperature processor."""
        at = self.cfg.engine.adaptive_temperature
        if not at.enabled or self.sampler_stats is None:
            return {}
        from rlkit.algorithms.hapo import EntropyStats
        from rollout.adaptive_temperature import AdaptiveTemperature

        return {"logits_processors": [AdaptiveTemperature(EntropyStats(*self.sampler_stats), tau=at.tau)]}

    def _advantage_extras(self, step: int, groups: list[X.Group],
                          m: dict[str, float]) -> tuple[list[X.Group], dict[str, Any]]:
        """Training groups and inputs an advantage estimator asks for beyond rewards: SPAE's step
        probes; BRPO's summaries of the truncated thinking (groups packed after ``groups``)."""
        if getattr(self.adv_params, "needs_anytime_rollout", False):
            import dataclasses

            from rlkit.anytime_collect import summarize_groups

            t0 = time.perf_counter()
            base = dataclasses.replace(X.sampling_params(self.cfg, n=1, seed=0), return_entropy=False)
            res = summarize_groups(groups, self.engines, self.tokenizer, self.manager, self.adv_params,
                                   base_params=base, seed=X.step_seed(self.cfg.seed, step, 104729),
                                   acc_key=self.acc_key)
            m.update(res.metrics)
            m["time/summary_s"] = time.perf_counter() - t0
            return groups + res.summary_groups, res.extras
        if not getattr(self.adv_params, "needs_step_probes", False):
            return groups, {}
        from rewards.length import build_dataclass
        from rlkit.probes import ProbeParams, probe_groups

        p = build_dataclass(ProbeParams, self.cfg.algorithm.step_probe, "step_probe")
        t0 = time.perf_counter()
        res = probe_groups(groups, self.engines, self.tokenizer, p, seed=X.step_seed(self.cfg.seed, step, 7919))
        m.update({k: float(v) for k, v in res.metrics.items()})
        m["time/probe_s"] = time.perf_counter() - t0
        return groups, res.extras()

    def _dump_inspect(self, step: int, groups: list[X.Group], batch, extras: dict[str, Any]) -> None:
        """Write the first ``tracking.inspect_groups`` groups' per-token credit for ``rlkit inspect``."""
        k = self.cfg.tracking.inspect_groups
        if not k:
            return
        from rlkit.inspector import write_step_dump

        sel = [(gi, g, c, r) for gi, g in enumerate(groups[:k]) for c, r in zip(g.completions, g.rewards)]
        n = len(sel)
        maps: dict[str, Any] = {"advantage": batch.advantages_BT[:n]}
        for name, t in extras.get("token_maps", {}).items():
            maps[name] = t[:n]
        if all(c.entropies for _, _, c, _ in sel):
            maps["entropy"] = [list(c.entropies) for _, _, c, _ in sel]
        prompt = [g.row["prompt"] if isinstance(g.row["prompt"], str) else g.row["prompt"][-1]["content"]
                  for _, g, _, _ in sel]
        a = self.cfg.algorithm
        write_step_dump(
            self.run_dir, step, prompts=prompt, answers=[g.row.get("answer") for _, g, _, _ in sel],
            rewards=[float(r) for *_, r in sel], finish_reasons=[c.finish_reason for _, _, c, _ in sel],
            group_ids=[gi for gi, *_ in sel], token_ids=[list(c.token_ids) for _, _, c, _ in sel],
            token_texts=[[self.tokenizer.decode([t]) for t in c.token_ids] for _, _, c, _ in sel],
            maps=maps, meta={"advantage": a.advantage, "policy_loss": a.policy_loss,
                             **{k2: float(v) for k2, v in extras.get("metrics", {}).items()}},
        )

    def _log_samples(self, step: int, groups: list[X.Group], tracker) -> None:
        k = self.cfg.tracking.samples_per_step
        if not k:
            return
        samples = []
        for g in groups[:k]:
            c, r = g.completions[0], g.rewards[0]
            prompt = g.row["prompt"] if isinstance(g.row["prompt"], str) else g.row["prompt"][-1]["content"]
            samples.append({"prompt": prompt, "completion": c.text, "reward": r, "answer": g.row.get("answer"),
                            "finish_reason": c.finish_reason, "tokens": len(c.token_ids)})
        tracker.log_samples(step, samples)

    def evaluate(self, tracker, tag: str) -> dict[str, float]:
        from rlkit.evaluate import evaluate_rows, format_table

        def gen(reqs):
            return X.generate(self.engines, reqs)[0]

        res = evaluate_rows(self.cfg, self.eval_rows, self.encode, gen)
        tracker.print(f"eval ({tag}, {len(self.eval_rows)} held-out problems):\n" + format_table({tag: res}))
        (self.run_dir / f"eval_{tag}.json").write_text(json.dumps(res, indent=2))
        return res

    def close(self) -> None:
        if getattr(self, "memory", None) is not None:
            self.memory.stop()
        self.manager.close()
        import ray

        if ray.is_initialized() and not self.cfg.cluster.address:
            ray.shutdown()
        elif ray.is_initialized() and getattr(self, "engines", None) is not None:
            # joined cluster (cluster.address): stays up; release this run's actors and placement groups
            if hasattr(self.learner, "shutdown"):
                self.learner.shutdown()
            else:
                ray.kill(self.learner)
            self.engines.shutdown()
