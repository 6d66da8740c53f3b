"""The RL loop: collect -> stages -> advantages -> update -> sync weights -> log / checkpoint.

``Trainer.step`` reads top to bottom. A method that needs more than an estimator and a loss is a
stage (:mod:`rlkit.methods`): the trainer calls every active stage's hooks at fixed points and
checkpoints their state under their names; it knows no method by name. Resuming restores weights,
optimizer, scheduler, RNG, the data cursor and every stage's state, and every sampling seed is
derived from (seed, step), so a resumed run logs the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlkit.config import save_config
from rlkit.infra.checkpoint import fault_injection
from rlkit.loop import experience as X
from rlkit.loop import report
from rlkit.schema import Config


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool | None = None):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.resume = resume

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from rewards import RewardManager
        from rewards.length import LengthShaping
        from rlkit.infra.checkpoint import latest_checkpoint
        from rlkit.infra.data import PromptCursor, load_run_rows
        from rlkit.infra.eval_splits import load_eval_splits
        from rlkit.infra.models import load_tokenizer, resolve_model_path
        from rlkit.loop.prompts import PromptEncoder
        from rlkit.methods import StageContext, active_stages
        from rlkit.orchestration.ray_actors import (
            describe_placement,
            engine_kwargs,
            init_ray,
            learner_nodes,
            on_this_node,
            spawn_actors,
        )

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
        self.train_rows, self.eval_rows, self.data_stats = load_run_rows(cfg)
        self.eval_splits = load_eval_splits(cfg, self.train_rows, self.eval_rows) if cfg.eval.before or cfg.eval.after \
            else {}
        self.cursor = PromptCursor(len(self.train_rows), cfg.seed, shuffle=cfg.data.shuffle)
        self.encode = PromptEncoder(cfg, self.tokenizer)
        self.manager = RewardManager.from_config(cfg.reward, plugins=[*cfg.reward.plugins, *cfg.plugins])
        self.acc_key = cfg.reward.accuracy_key
        self.shaping = LengthShaping.from_config(cfg.reward.length_shapers)
        self.policy_version = 0  # step of the engines' weights: the last step that updated and synced

        stage_classes = active_stages(cfg)
        init_ray(cfg)
        extra = {k: v for s in stage_classes for k, v in s.engine_kwargs(cfg).items()}
        self.learner, self.engines = spawn_actors(cfg, self.model_path, engine_kwargs(cfg, extra))
        nodes = learner_nodes(self.learner)
        self.placement = describe_placement(nodes, self.engines)
        self.learner_local = on_this_node(nodes)
        ctx = StageContext(cfg, self.engines, self.tokenizer, self.manager, self.cursor, self.train_rows,
                           self.encode, self.run_dir, self.acc_key)
        self.stages = [s(ctx) for s in stage_classes]

    # ------------------------------------------------------------------ checkpoint
    def _restore(self) -> int:
        import ray

        from rlkit.infra.checkpoint import load_checkpoint, load_trainer_state, restore_rng_state

        if self.ckpt_path is None:
            return 0
        if self.learner_local:  # the learner reads its own files: the state does not pass through here
            ray.get(self.learner.restore_checkpoint_files.remote(str(self.ckpt_path)))
            step, ts = load_trainer_state(self.ckpt_path)
        else:
            state = load_checkpoint(self.ckpt_path)
            ray.get(self.learner.load_checkpoint_state.remote(state))
            step, ts = state["step"], state["trainer_state"]
        self.cursor.load_state_dict(ts["cursor"])
        restore_rng_state(ts["rng"])
        if "length_shaping" in ts:
            self.shaping.load_state_dict(ts["length_shaping"])
        self.policy_version = int(ts.get("policy_version", step))  # a skipped update keeps the old one
        for s in self.stages:
            s.load_state_dict(ts.get("stages", {}).get(s.name, ts.get(s.name)))
        return int(step)

    def _save(self, step: int) -> Path:
        import ray

        from rlkit.infra.checkpoint import capture_rng_state, save_checkpoint

        trainer_state = {"cursor": self.cursor.state_dict(), "rng": capture_rng_state(), "step": step,
                         "length_shaping": self.shaping.state_dict(), "policy_version": self.policy_version,
                         "stages": {s.name: s.state_dict() for s in self.stages}}
        keep = self.cfg.checkpoint.keep_last
        if self.learner_local:
            # the learner writes its weights and optimizer into the checkpoint itself: pulling them here
            # held them twice in this process (4 GiB for a 135M full fine-tune with Adam)
            return save_checkpoint(self.run_dir, step, trainer_state=trainer_state, keep_last=keep,
                                   write_files=lambda d: ray.get(self.learner.save_checkpoint_files.remote(str(d))))
        st = ray.get(self.learner.checkpoint_state.remote())  # a learner on another machine: through here
        return save_checkpoint(self.run_dir, step, model_state=st["model_state"], optimizer_state=st["optimizer_state"],
                               scheduler_state=st["scheduler_state"], trainer_state=trainer_state, keep_last=keep)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Train (resuming when a checkpoint exists); Ray and the reward workers are released
        however the run ends."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        import ray

        from rlkit.infra.sysmon import MemoryMonitor
        from rlkit.infra.tracking import Tracker

        cfg = self.cfg
        t_setup = time.perf_counter()
        self.memory = MemoryMonitor().start()  # PSS of this process + Ray's processes (its descendants)
        self._setup()
        start = self._restore()
        for s in self.stages:
            s.start(start)
        if start:
            self.engines.sync(self.learner, self.policy_version)
        for s in self.stages:
            s.after_sync(self.policy_version)
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "resumed_from": start}
        with Tracker(self.run_dir, total_steps=cfg.train.steps, start_step=start + 1, tensorboard=cfg.tracking.tensorboard,
                     wandb=cfg.tracking.wandb, console=cfg.tracking.console) as tracker:
            self.engines.log = tracker.print  # engine restarts (rlkit.orchestration.engine_pool)
            for s in self.stages:
                s.ctx.log = tracker.print
            tracker.print(f"rlkit: run dir {self.run_dir} | setup {time.perf_counter() - t_setup:.1f}s"
                          + (f" | resumed after step {start}" if start else ""))
            tracker.print(f"rlkit: placement: {self.placement}")
            if cfg.eval.before and not start:
                summary["eval_before"] = self._evaluate(tracker, "before")
            for step in range(start + 1, cfg.train.steps + 1):
                metrics = self.step(step, tracker)
                metrics.update(self.memory.metrics())
                tracker.log(step, metrics)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps:
                    self._save(step)
            self._close_stages()
            if cfg.checkpoint.export_final:
                summary["final"] = str(self.run_dir / "final")
                ray.get(self.learner.export.remote(summary["final"], self.model_path))
            if cfg.eval.after:
                summary["eval_after"] = self._evaluate(tracker, "after")
            summary["peak_memory_gib"] = self.memory.report_peak(tracker.print)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def collect(self, step: int, tracker) -> tuple[list[X.Group], list[X.Group], dict[str, float]]:
        """The step's groups: from the stage that replaces the collector, else the default one."""
        from rlkit.methods import merge_meta

        for s in self.stages:
            if s.collects:
                return s.collect(step, self.shaping)

        def params_fn(params):
            for s in self.stages:
                params = s.sampling(params, step)
            return params

        return X.collect(step, self.cfg, self.engines, self.cursor, self.train_rows, self.encode, self.manager,
                         tracker.print, shaping=self.shaping, acc_key=self.acc_key,
                         request_meta=merge_meta([s.request_meta(step) for s in self.stages]), params_fn=params_fn)

    def step(self, step: int, tracker) -> dict[str, float]:
        import ray

        from rlkit.orchestration.sync_check import verify_or_stop

        cfg = self.cfg
        t0 = time.perf_counter()
        groups, all_groups, m = self.collect(step, tracker)
        fault_injection(step)
        train_groups, extras = groups, {}
        for s in self.stages if groups else ():
            train_groups, extras, sm = s.after_score(step, train_groups, extras)
            m.update(sm)
        m.update(X.rollout_metrics(all_groups, self.acc_key))
        if groups:
            batch, _, extras = X.make_batch(train_groups, cfg, self.tokenizer.pad_token_id, extras, self.acc_key)
            m.update({k: float(v) for k, v in extras.get("metrics", {}).items()})
            report.dump_inspect(cfg, self.run_dir, self.tokenizer, step, groups, batch, extras)
            with self.engines.lending_memory(cfg):  # colocated on GPUs: the learner gets the engines' memory
                m.update(ray.get(self.learner.train_step.remote(batch)))
            for s in self.stages:
                m.update(s.after_update(self.learner))
            m["time/sync_s"] = self.engines.sync(self.learner, step)
            self.policy_version = step
            for s in self.stages:
                s.after_sync(step)
            if cfg.cluster.verify_sync_every and step % cfg.cluster.verify_sync_every == 0:
                m.update(verify_or_stop(self.engines, self.learner, step, cfg.cluster.verify_sync_tol, self.run_dir))
        else:
            tracker.print(f"step {step}: no informative group; update skipped")
        m.update(self.engines.metrics())  # cluster/actor_restarts: engines recreated after dying
        for s in self.stages:
            m.update(s.metrics())
        gen_tokens = m.get("rollout/tokens_generated",  # a collector that reports this step's new tokens
                           sum(len(c.token_ids) for g in all_groups for c in g.completions))
        m["time/step_s"] = time.perf_counter() - t0
        m["perf/gen_tokens_per_s"] = gen_tokens / max(m["time/gen_s"], 1e-9)
        m["perf/tokens_per_s"] = gen_tokens / m["time/step_s"]
        report.log_samples(cfg, step, all_groups, tracker)
        return m

    def _evaluate(self, tracker, tag: str) -> dict[str, float]:
        """The in-distribution held-out set (``eval_<tag>.json``), then each ``eval.splits`` entry
        (``eval_<tag>_<name>.json``); returns the first, with the others' accuracy under ``split/<name>/``."""
        res = report.evaluate(self.cfg, self.run_dir, self.eval_rows, self.encode, self.engines, tracker, tag)
        out = dict(res)
        for name, rows in self.eval_splits.items():
            r = report.evaluate(self.cfg, self.run_dir, rows, self.encode, self.engines, tracker, f"{tag}_{name}")
            out.update({f"split/{name}/{k}": v for k, v in r.items() if k in ("accuracy", "format_rate", "tokens_mean")})
        return out

    def _close_stages(self) -> None:
        for s in getattr(self, "stages", ()):
            s.close()

    def close(self) -> None:
        from rlkit.orchestration.ray_actors import release

        self._close_stages()
        if getattr(self, "memory", None) is not None:
            self.memory.stop()
        if getattr(self, "manager", None) is not None:
            self.manager.close()
        release(self.cfg, getattr(self, "learner", None), getattr(self, "engines", None))
