"""Cross-field and registry checks of a validated :class:`rlkit.config.Config`.

``check_combinations`` runs inside pydantic validation (its ``ValueError`` becomes a ConfigError
naming the keys); ``check_registries`` runs after it and checks names and parameter blocks against
the registries (advantages, losses, loss masks, length shapers, verifiers, probes, budgets). Neither
loads a model.
"""

from __future__ import annotations

from rlkit.compose import ConfigError, nearest
from rlkit.schema import Config

__all__ = ["check_combinations", "check_registries"]


def check_combinations(c: Config) -> None:
    t, a = c.train, c.algorithm
    if a.dynamic_sampling.enabled and t.samples_per_prompt < 2:
        raise ValueError(
            "algorithm.dynamic_sampling.enabled needs train.samples_per_prompt >= 2 "
            "(a group of one has no reward variance)"
        )
    if c.samples_per_step % t.mini_batches:
        raise ValueError(
            f"train.mini_batches={t.mini_batches} must divide prompts_per_step*samples_per_prompt"
            f"={c.samples_per_step}"
        )
    rc = a.rollout_correction.model_copy(update={"mode": c.correction_mode})
    if rc.mode != "none" and a.old_logprobs == "rollout":
        raise ValueError("algorithm.rollout_correction weights pi_old / pi_rollout; with algorithm.old_logprobs="
                         "rollout the PPO ratio is already taken against the engine's log-probs: use "
                         "old_logprobs auto or recompute, or rollout_correction.mode=none")
    e = c.engine
    if e.name == "vllm" and (e.top_p < 1 or e.top_k > 0) and (rc.mode != "none" or a.old_logprobs == "rollout"):
        raise ValueError(f"engine.top_p={e.top_p} / top_k={e.top_k}: vLLM reports log-probs renormalised over "
                         "the kept tokens, which are not the policy's, so the PPO ratio or the rollout "
                         "correction would be biased; sample with top_p=1 and top_k=0, or set "
                         "algorithm.old_logprobs=auto and rollout_correction.mode=none")
    if a.kl.beta > 0 and a.kl.estimator == "k1":
        raise ValueError("algorithm.kl.estimator=k1 as a loss has zero expected gradient (its gradient is the "
                         "score function, whose mean is 0): use k3 (unbiased value, low variance) or k2")
    if a.overlong_shaping.enabled and any(ls.get("name") == "dapo_overlong" for ls in c.reward.length_shapers):
        raise ValueError("DAPO's overlong punishment is on twice: algorithm.overlong_shaping.enabled and "
                         "reward.length_shapers [{name: dapo_overlong}]; keep one")
    if a.kl.beta > 0 and c.learner.name != "torch" and c.model.lora.rank == 0:
        raise ValueError("algorithm.kl.beta > 0 with the deepspeed learner needs model.lora.rank > 0")
    if isinstance(c.data.eval_size, float) and not 0 < c.data.eval_size < 1:
        raise ValueError("data.eval_size as a float must be a fraction in (0, 1)")
    if c.data.source in ("jsonl", "parquet", "hf") and not c.data.path:
        raise ValueError(f"data.path is required when data.source is {c.data.source!r}")
    if not c.reward.verifiers:
        raise ValueError("reward.verifiers must name at least one verifier")
    c.reward.accuracy_key  # noqa: B018  (an unknown reward.accuracy label raises)
    _check_generator(c)
    _check_stages(c)
    _check_engine(c)
    from rlkit.orchestration.placement import check_cluster_config

    check_cluster_config(c)
    _check_weight_sync(c)


def _check_generator(c: Config) -> None:
    """data.generator keys must be the chosen generator's (its task's, for reasoning_gym)."""
    import dataclasses
    import inspect

    d = c.data
    if d.source == "arithmetic":
        from rlkit.infra.generators import generate_arithmetic

        where, valid = "source 'arithmetic'", set(inspect.signature(generate_arithmetic).parameters) - {"seed"}
    elif d.source == "reasoning_gym":
        task = d.generator.get("task")
        if not task:
            raise ValueError("data.generator.task is required with data.source=reasoning_gym (e.g. chain_sum)")
        try:
            from reasoning_gym.factory import DATASETS
        except ImportError:
            return  # the data loader says what to install
        if task not in DATASETS:
            hint = nearest(str(task), list(DATASETS))
            raise ValueError(f"data.generator.task: unknown reasoning-gym task {task!r}"
                             + (f"; did you mean {hint!r}?" if hint else ""))
        where = f"reasoning-gym task {task!r}"
        valid = {f.name for f in dataclasses.fields(DATASETS[task][1])} - {"seed"} | {"task"}
    else:
        return
    bad = sorted(set(d.generator) - valid - {"n", "size"})
    if bad:
        raise ValueError(f"data.generator: {', '.join(bad)} not a parameter of {where} (its parameters: "
                         f"{', '.join(sorted(valid - {'task', 'size', 'n'}))}, and n = the number of rows)")


def _check_weight_sync(c: Config) -> None:
    """cluster.weight_sync against the placement (rlkit.orchestration.weight_sync)."""
    cl, e = c.cluster, c.engine
    gpus = f"cluster.learner_gpus={cl.learner_gpus}, cluster.engine_gpus={cl.engine_gpus}"
    if cl.weight_sync == "cuda_ipc":
        if cl.placement != "colocated" or cl.engine_gpus == 0:
            raise ValueError(
                f"cluster.weight_sync=cuda_ipc needs the learner and each engine on one GPU: set "
                f"cluster.placement=colocated and cluster.engine_gpus>0 (got cluster.placement={cl.placement}, "
                f"{gpus}); on CPU or split GPUs use cluster.weight_sync=object_store or collective")
        if e.tensor_parallel_size > 1:
            raise ValueError(f"cluster.weight_sync=cuda_ipc supports engine.tensor_parallel_size=1 only (got "
                             f"{e.tensor_parallel_size}); use cluster.weight_sync=collective with "
                             "cluster.placement=split")
        if e.name == "vllm" and not e.vllm.in_process:
            raise ValueError("cluster.weight_sync=cuda_ipc loads the opened tensors in the engine actor: it needs "
                             "engine.vllm.in_process=true")
    if cl.weight_sync == "collective" and cl.placement == "colocated" and cl.engine_gpus > 0:
        raise ValueError(
            f"cluster.weight_sync=collective with cluster.placement=colocated and GPUs ({gpus}) puts learner rank 0 "
            "and engine 0 on one GPU, which one NCCL group cannot hold; use cluster.weight_sync=cuda_ipc (colocated) "
            "or cluster.placement=split")


def _check_engine(c: Config) -> None:
    """engine.name names a registered engine; what the vLLM engine cannot do fails here, not mid-run."""
    from rollout.engine import get_engine_class

    try:
        get_engine_class(c.engine.name)  # built-in engines import without their backend (vllm is lazy)
    except KeyError as e:
        raise ValueError(f"engine.name: {e.args[0]}") from None
    if c.engine.name != "vllm":
        return
    if c.model.budget_guidance:
        raise ValueError("model.budget_guidance needs engine.name=hf: guided sampling reads every layer's hidden "
                         "state at each decode step, which vLLM's logits processors do not see")
    from rlkit.algorithms import ADVANTAGES

    try:
        params = ADVANTAGES.get(c.algorithm.advantage).params
    except Exception:  # unknown names are reported by the registry checks
        return
    if getattr(params, "needs_step_probes", False):
        raise ValueError(f"algorithm.advantage={c.algorithm.advantage!r} probes per-token entropies, which the vLLM "
                         "engine does not return; use engine.name=hf")


def _check_stages(c: Config) -> None:
    """Every registered stage checks the config (a stage that is off returns at once)."""
    from rlkit.methods import STAGES, active_stages

    active_stages(c)  # unknown names in ``stages``, two collectors
    for stage in STAGES.values():
        stage.check(c)


def check_registries(cfg: Config) -> None:
    from rlkit.algorithms import ADVANTAGES, POLICY_LOSSES

    a = cfg.algorithm
    for reg, key, name, params_key, kwargs in (
        (ADVANTAGES, "algorithm.advantage", a.advantage, "algorithm.advantage_params", a.advantage_params),
        (POLICY_LOSSES, "algorithm.policy_loss", a.policy_loss, "algorithm.loss_params", a.loss_params),
    ):
        try:
            reg.get(name)
        except KeyError as e:
            raise ConfigError(f"{key}: {e.args[0]}") from None
        try:
            reg.build_params(name, kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{params_key}: {e}") from None
    from rlkit.algorithms import LOSS_MASKS

    for name, kwargs in a.loss_mask.items():
        try:
            LOSS_MASKS.build_params(name, kwargs)
        except KeyError as e:
            raise ConfigError(f"algorithm.loss_mask: {e.args[0]}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"algorithm.loss_mask.{name}: {e}") from None
    _check_plugin_params(cfg)
    import rewards

    rewards.load_plugins(cfg.reward.plugins)
    known = rewards.list_rewards() + rewards.registry.entry_point_names()  # entry points: not imported
    for i, v in enumerate(cfg.reward.verifiers):
        if ":" in v.name:
            continue  # resolved (and imported) by the reward workers
        if v.name not in known:
            hint = nearest(v.name, known)
            raise ConfigError(
                f"reward.verifiers.{i}.name: unknown verifier '{v.name}'"
                + (f"; did you mean '{hint}'?" if hint else "")
                + f" (registered: {', '.join(known)})"
            )
        _check_verifier_params(i, v.name, v.params)
    _check_sandbox(cfg, known)
    labels = [v.label or (v.name.rpartition(":")[2] if ":" in v.name else v.name) for v in cfg.reward.verifiers]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"reward.verifiers: duplicate metric names {dupes}; give each a distinct 'label'")


def _check_sandbox(cfg: Config, known: list[str]) -> None:
    """Fail closed before training: verifiers that run model-written code need a confined sandbox."""
    from rewards.registry import list_rewards, lookup
    from rewards.sandbox import confinement_problem

    sb = cfg.reward.sandbox
    registered = set(list_rewards())
    users = [v.label or v.name for v in cfg.reward.verifiers
             if not (sb.allow_unconfined or v.params.get("allow_unconfined"))
             and (v.sandbox or (v.name in registered and getattr(lookup(v.name), "uses_sandbox", False)))]  # fmt: skip
    if sb.confine == "none" and not sb.allow_unconfined:
        raise ConfigError("reward.sandbox.confine: none turns filesystem confinement off; it needs "
                          "reward.sandbox.allow_unconfined: true")  # fmt: skip
    problem = confinement_problem(sb.confine) if users else None
    if problem:
        raise ConfigError(f"reward.verifiers: {', '.join(users)} run model-written code in the sandbox, but {problem}")


def _check_plugin_params(cfg: Config) -> None:
    """Validate the dict-valued blocks read by method modules (probes, length shapers, budgets)."""
    from rewards.budget_prompt import budget_params
    from rewards.length import LengthShaping
    checks = [("reward.length_shapers", lambda: LengthShaping.from_config(cfg.reward.length_shapers))]
    if cfg.data.budget is not None:
        checks.append(("data.budget", lambda: budget_params(cfg.data.budget)))
    for key, fn in checks:
        try:
            fn()
        except (ValueError, TypeError, KeyError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ConfigError(f"{key}: {msg}") from None


def _check_verifier_params(i: int, name: str, params: dict) -> None:
    """A registered verifier's ``params``: names its signature does not take are refused; rlkit's own
    verifier classes are built (cheap, no ``setup()``) so their value checks run here too. Plugin classes
    are not built (their constructor may be costly); entry points are checked by the reward workers."""
    import inspect

    import rewards

    if not params or name not in rewards.list_rewards():
        return
    obj = rewards.registry.lookup(name)
    try:
        if inspect.isclass(obj) and obj.__module__.startswith("rewards."):
            obj(**params)
        elif inspect.isclass(obj):
            inspect.signature(obj).bind_partial(**params)
        elif unknown := rewards.registry.unknown_params(obj, params):  # a function: extra call kwargs
            raise TypeError(f"{name} takes no keyword argument(s) {unknown}")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward.verifiers.{i}.params: {e}") from None
