"""The config schema: one frozen pydantic model per section, :class:`Config` at the top.

Pure data: this module imports nothing of rlkit but the composition helpers, so every layer
(loop, methods, learners, orchestration) can read a :class:`Config`. Loading a recipe, checking
combinations and registry names is :mod:`rlkit.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: F401

from rlkit.compose import ConfigError  # noqa: F401  (re-exported)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class LoraConfig(_Section):
    rank: int = Field(0, ge=0, description="LoRA rank; 0 disables LoRA (full fine-tune).")
    alpha: float = Field(32.0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt.")


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="HF model directory or built-in alias.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="fp32 on CPU, bf16 on GPU.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    budget_guidance: str | None = Field(
        None,
        description="Budget-guidance predictor dir (rlkit train-budget-predictor): guides rollouts of requests "
        "with a budget (data.budget) and `rlkit eval --budgets`; None = off.",
    )
    budget_guidance_params: dict[str, Any] = Field(
        default_factory=dict,
        description="rollout.budget.GuidanceParams overrides (min_lambda, min_alpha, min_mode, trigger_strings, "
        "think_start, think_end, temperature_on_guided_steps); default: those saved with the predictor.",
    )


class DataConfig(_Section):
    source: Literal["arithmetic", "jsonl", "parquet", "hf", "reasoning_gym"] = "arithmetic"
    path: str | None = Field(None, description="File/dir for jsonl, parquet and hf sources.")
    split: str | None = Field(None, description="Split name for hf sources.")
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    on_bad_row: Literal["error", "skip"] = "error"
    generator: dict[str, Any] = Field(default_factory=dict, description="Generator/task kwargs.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows in total.")
    eval_size: int | float = Field(64, description="Held-out rows: a count, or a fraction < 1.")
    system_prompt: str | None = None
    prompt_template: str | None = Field(
        "{prompt}\nPut your final answer within \\boxed{{}}.",
        description="Python format string applied to string prompts ({prompt} and row columns).",
    )
    shuffle: bool = True
    budget: dict[str, Any] | None = Field(
        None,
        description="Per-prompt token budget written into the prompt (L1 / budget rewards): "
        "rewards.budget_prompt.BudgetPromptParams fields (prior, low, high, template, ...).",
    )


class AdaptiveTemperatureConfig(_Section):
    """HAPO adaptive temperature (docs/algorithms.md §3.2): T' = T (1 + tau * h_hat) from last step's entropy stats."""

    enabled: bool = False
    tau: float = Field(0.05, ge=0.0, lt=1.0, description="temperature_tau.")
    pivot: float = Field(0.8, gt=0.0, lt=1.0, description="Entropy quantile used as the pivot.")
    replicate_release_sign: bool = Field(False, description="Reproduce the released code's sign of h_hat.")


class VLLMConfig(_Section):
    """Settings read only by the vLLM engine (``engine.name: vllm``, rollout.vllm.VLLMEngine)."""

    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="Share of each GPU vLLM may take for weights + KV cache (lower it "
        "when the learner shares the GPU: cluster.placement=colocated).")
    max_model_len: int | None = Field(None, ge=1, description="Context length (prompt + response); None = the model's.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower decoding).")
    enable_sleep_mode: bool | None = Field(
        None, description="Allow sleep/wake (weights to host memory between rollouts); None = on with CUDA.")
    weight_bucket_mb: float = Field(512.0, gt=0.0, description="Largest bucket of whole layers sent per weight reload.")
    in_process: bool = Field(
        True, description="Run vLLM's engine core inside the engine actor (weights reach it without serialisation); "
        "false = vLLM's own engine-core process.")
    llm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More vllm.LLM keyword arguments, passed as is (expert knobs).")


class EngineConfig(_Section):
    name: str = Field("hf", description="Rollout engine: hf (CPU/GPU transformers) or vllm (pip install 'rlkit[gpu]').")
    num_engines: int = Field(1, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: list[str] = Field(default_factory=list)
    max_batch_size: int = Field(64, ge=1, description="Sequences decoded together.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vllm); cluster.engine_gpus = num_engines x this.")
    adaptive_temperature: AdaptiveTemperatureConfig = Field(default_factory=AdaptiveTemperatureConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class DeepSpeedConfig(_Section):
    """Settings read only by the DeepSpeed learner (``learner.name: deepspeed``)."""

    zero_stage: Literal[2, 3] = Field(3, description="ZeRO stage: 2 shards grads+optimizer, 3 also the weights.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state (and its step) on the CPU.")
    bf16: bool = Field(False, description="bf16 weights/activations with fp32 master weights (GPU; slow on CPU).")
    timeout_s: float = Field(600.0, gt=0.0, description="torch.distributed rendezvous and collective timeout.")
    sync_bucket_mb: float = Field(
        256.0, gt=0.0, description="ZeRO-3: gather at most this many MiB of parameters at a time for weight sync."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Deep-merged into the generated DeepSpeed config (expert knobs)."
    )


class LearnerConfig(_Section):
    name: Literal["torch", "deepspeed"] = "torch"
    num_ranks: int = Field(1, ge=1, description="Data-parallel ranks (deepspeed): Ray actors in one placement group.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up, in RL steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward.")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Token budget of a forward/backward (rows x padded length), filled with "
        "sequences of similar length; replaces the fixed micro_batch_size. Gradients do not change.",
    )
    share_prompt: bool = Field(
        True,
        description="Run each group's shared prompt forward once and reuse its KV cache (with grad) for "
        "the group's responses; exact, and faster when prompts are a large share of the tokens.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per learner and engine actor; default all cores (train.async on "
        "CPUs: half the cores each, as the two run at the same time).")


class KLConfig(_Section):
    beta: float = Field(0.0, ge=0.0, description="KL loss coefficient; 0 = no reference model.")
    estimator: Literal["k1", "k2", "k3", "low_var_kl", "mse"] = "k3"


class DynamicSamplingConfig(_Section):
    enabled: bool = False
    max_gen_batches: int = Field(3, ge=0, description="Generation rounds per step; 0 = unlimited.")
    on: Literal["accuracy", "reward"] = Field(
        "accuracy", description="Drop groups whose correctness (accuracy verifier, DAPO) or final shaped reward "
        "is all equal."
    )


class OverlongShapingConfig(_Section):
    enabled: bool = False
    buffer_len: int = Field(32, ge=1, description="L_cache: soft-penalty zone before the max length.")
    penalty_factor: float = 1.0


class RolloutCorrectionConfig(_Section):
    """Rollout-training mismatch correction: weight the loss by pi_old / pi_rollout (rlkit/algorithms/correction.py)."""

    mode: Literal["auto", "none", "tis", "mis"] = Field(
        "auto", description="tis: weight min(w, clip); mis: drop tokens/sequences with w outside [1/clip, clip]; "
        "auto: tis when train.async trains on tokens of older policies, else none."
    )
    level: Literal["token", "sequence"] = Field("token", description="w per token, or per sequence (product).")
    clip: float = Field(2.0, gt=1.0, description="C of the truncation / the masking band.")


class AlgorithmConfig(_Section):
    advantage: str = Field("grpo", description="Registered advantage estimator.")
    advantage_params: dict[str, Any] = Field(default_factory=dict)
    policy_loss: str = Field("ppo_clip", description="Registered policy loss.")
    loss_params: dict[str, Any] = Field(default_factory=dict)
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    norm_length: int | None = Field(
        None, description="Length divisor of seq-mean-token-sum-norm; default: engine.max_new_tokens."
    )
    old_logprobs: Literal["auto", "recompute", "rollout"] = Field(
        "auto", description="auto: reuse current logprobs when one update per batch (on-policy)."
    )
    kl: KLConfig = Field(default_factory=KLConfig)
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong_filter: bool = Field(False, description="Mask the loss of truncated samples.")
    overlong_shaping: OverlongShapingConfig = Field(default_factory=OverlongShapingConfig)
    loss_mask: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Token loss masks applied after the policy loss, e.g. "
        "{mask_mastered_positive: {tau: 0.99, sigma: 0.2, entropy_scope: sample}} (UloRL DMMPT); "
        "masked tokens stay in the aggregation denominator.",
    )
    step_probe: dict[str, Any] = Field(
        default_factory=dict,
        description="SPAE probe settings (rlkit.methods.step_probes.ProbeParams); used by advantages that need probes.",
    )


class AsyncConfig(_Section):
    """Overlap of generation and training (rlkit.methods.async_rollout)."""

    mode: Literal["sync", "one_step_off", "async"] = Field(
        "sync", description="sync: generate, then train; one_step_off: the engines generate step t+1's batch while "
        "the learner trains on step t's; async: the engines generate ahead continuously, up to max_staleness."
    )
    max_staleness: int = Field(
        1, ge=0, description="Hard bound: no token sampled by a policy more than this many updates older than the "
        "learner's is trained on (such samples are regenerated, counted in async/dropped_stale)."
    )
    partial_rollout: bool = Field(
        False, description="async: generate in chunks of chunk_tokens, so a weight push waits at most one chunk; "
        "running samples continue under the new weights (each token keeps the version that sampled it)."
    )
    chunk_tokens: int | None = Field(None, ge=1, description="Chunk of partial_rollout; default max_new_tokens // 4.")

    def resolved_chunk(self, max_new_tokens: int) -> int:
        return min(self.chunk_tokens or max(1, max_new_tokens // 4), max_new_tokens)


class TrainConfig(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    steps: int = Field(20, ge=1, description="RL steps (rollout + update rounds).")
    prompts_per_step: int = Field(8, ge=1)
    samples_per_prompt: int = Field(8, ge=1, description="Group size G.")
    ppo_epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per epoch over the batch.")
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async",
                                description="Overlap generation with training (written `async:` in YAML).")


class VerifierConfig(_Section):
    name: str = Field(description="Registered name, module:function or file.py:function.")
    weight: float = 1.0
    timeout_s: float = Field(10.0, gt=0.0, description="Deadline of one call (sandbox: its wall limit).")
    failure_value: float = Field(0.0, description="Reward of a sample whose verification failed.")
    label: str | None = Field(None, description="Metric name reward/<label>/...; default: the name.")
    sandbox: bool = Field(False, description="Run each call in rewards.sandbox (untrusted code).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments: class constructor / extra function kwargs."
    )


class SandboxConfig(_Section):
    memory_mb: int = Field(1024, ge=32, description="Address-space limit per sandboxed process (MiB).")
    max_output_kb: int = Field(1024, ge=1, description="Cap on stdout/stderr/files of a sandboxed run.")
    max_procs: int = Field(32, ge=2, description="Processes+threads a sandboxed run may hold (fork bombs).")
    network: bool = Field(False, description="Allow network access from sandboxed runs.")
    confine: Literal["auto", "namespace", "landlock", "none"] = Field(
        "auto", description="Filesystem confinement of sandboxed runs: a mount namespace, else Landlock (auto); "
        "none only with allow_unconfined."
    )
    allow_unconfined: bool = Field(
        False, description="Run sandboxed code even where the filesystem cannot be confined (warns every start)."
    )


class RewardConfig(_Section):
    verifiers: list[VerifierConfig] = Field(
        default_factory=lambda: [VerifierConfig(name="math"), VerifierConfig(name="format", weight=0.2)]
    )
    plugins: list[str] = Field(default_factory=list, description="Modules importing @reward defs.")
    mode: Literal["process", "inline"] = "process"
    num_workers: int = Field(1, ge=1)
    batch_deadline_s: float | None = Field(
        None, gt=0.0, description="Bound on scoring one step; unfinished samples get failure_value."
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    length_shapers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Length-aware reward terms applied after the verifiers, in order: "
        "[{name: kimi|l1_exact|l1_max|l1_dual|hapo_history|budget_penalty|dapo_overlong, params: {...}, "
        "warmup: {delay_steps, ramp_steps}}] (warmup: the terms are 0 up to delay_steps, then ramp in linearly).",
    )
    accuracy: str | None = Field(
        None, description="Label of the verifier whose score >= 1 means correct (accuracy metrics, DAPO's "
        "filter, length rewards, BRPO summaries); default: math if configured, else the first verifier.",
    )

    @property
    def accuracy_key(self) -> str:
        labels = [v.label or v.name.rpartition(":")[2] for v in self.verifiers]  # the manager's per-verifier keys
        if self.accuracy is not None:
            if self.accuracy not in labels:
                raise ValueError(f"reward.accuracy={self.accuracy!r} is not a verifier label ({', '.join(labels)})")
            return self.accuracy
        return "math" if "math" in labels else labels[0]


class CheckpointConfig(_Section):
    every: int = Field(10, ge=0, description="Save every N steps (and at the end); 0 = only at end.")
    keep_last: int = Field(2, ge=1)
    resume: Literal["auto", "never", "must"] = "auto"
    export_final: bool = Field(True, description="Write an HF model/adapter dir to RUN_DIR/final.")


class TrackingConfig(_Section):
    tensorboard: bool = True
    wandb: dict[str, Any] | None = Field(None, description="wandb.init kwargs; None disables.")
    samples_per_step: int = Field(4, ge=0)
    inspect_groups: int = Field(
        2, ge=0, description="Groups per step dumped to RUN_DIR/inspect for `rlkit inspect`; 0 = off."
    )
    console: bool = True


class EvalSplitConfig(_Section):
    """An extra held-out set, drawn from the run's data source with some of its keys changed (e.g. an
    out-of-distribution split with more terms than training saw)."""

    generator: dict[str, Any] = Field(default_factory=dict,
                                      description="Keys merged over data.generator (e.g. {n_terms: 4}).")
    path: str | None = Field(None, description="Another file/dir for jsonl, parquet and hf sources.")
    split: str | None = Field(None, description="Another split name for hf sources.")
    size: int = Field(64, ge=1, description="Problems in the split (after removing prompts trained on).")


class EvalConfig(_Section):
    before: bool = Field(False, description="Evaluate the initial model before training.")
    after: bool = Field(False, description="Evaluate the trained model after training.")
    max_new_tokens: int | None = Field(None, description="Default: engine.max_new_tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    num_samples: int = Field(1, ge=1, description="Samples per problem (pass@k uses k<=this).")
    batch_size: int = Field(64, ge=1)
    splits: dict[str, EvalSplitConfig] = Field(
        default_factory=dict,
        description="Extra held-out sets by name, evaluated beside the in-distribution one (data.eval_size) "
        "and written to eval_<before|after>_<name>.json, e.g. {ood: {generator: {n_terms: 4}}}.",
    )


class ClusterConfig(_Section):
    """Ray cluster, placement of the roles and fault tolerance (rlkit.orchestration.placement)."""

    address: str | None = Field(None, description="Ray cluster to join (host:port, 'auto'); None = $RAY_ADDRESS "
                                "if set (ray job submit), else a local loopback Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; default all cores (at least 2).")
    dashboard: bool = Field(False, description="Start the Ray dashboard with the local Ray.")
    placement: Literal["colocated", "split"] = Field(
        "colocated", description="colocated: learner rank i and engine i share GPU i (on CPU: one shared CPU); "
        "split: each role gets its own GPUs (on CPU: one CPU per actor).")
    learner_gpus: int = Field(0, ge=0, description="GPUs for the learner, one per learner.num_ranks (deepspeed); 0 = CPU.")
    engine_gpus: int = Field(0, ge=0, description="GPUs for the engines: num_engines x tensor_parallel_size; 0 = CPU.")
    learner_resources: dict[str, float] = Field(
        default_factory=dict, description="cluster.placement=split: custom Ray resources each learner rank's bundle "
        "also reserves, to pin the learner to the nodes started with them (`ray start --resources='{\"learner\": 1}'`).")
    engine_resources: dict[str, float] = Field(
        default_factory=dict, description="cluster.placement=split: custom Ray resources each engine bundle (one per "
        "engine GPU, or per CPU engine) also reserves, to pin the engines to the nodes started with them.")
    placement_timeout_s: float = Field(600.0, gt=0.0, description="Wait this long for the placement groups' resources.")
    max_actor_restarts: int = Field(
        3, ge=0, description="Times each rollout engine actor may die and be recreated (re-synced to the current "
        "weights, its requests retried) before the run fails.")
    weight_sync: Literal["object_store", "collective", "cuda_ipc"] = Field(
        "object_store", description="How weights reach the engines after each update (rlkit.orchestration."
        "weight_sync): object_store = through Ray's object store; collective = broadcast from learner rank 0 in "
        "a private process group (NCCL when learner and engines have GPUs, else gloo); cuda_ipc = CUDA IPC "
        "handles to each learner rank's GPU copy (cluster.placement=colocated with GPUs).")
    sync_bucket_mb: float = Field(
        256.0, gt=0.0, description="collective / cuda_ipc: largest bucket (whole layers) gathered and sent at a "
        "time, MiB.")
    sync_timeout_s: float = Field(
        600.0, gt=0.0, description="collective: bound on forming the weight-sync group and on each whole "
        "broadcast of the weights (a member that does not answer by then fails the run, naming ranks and addresses).")
    verify_sync_every: int = Field(
        0, ge=0, description="At the sync of every step that is a multiple of N, engines score a fixed probe and "
        "must match the learner's log-probs within verify_sync_tol, else the run stops; 0 = off. Logs "
        "sync/logprob_max_abs_diff.")
    verify_sync_tol: float = Field(
        0.1, gt=0.0, description="Largest allowed |engine - learner| log-prob on the probe (nats); bf16 engines "
        "differ by ~1e-2, fp32 ones by ~1e-6, wrong weights by far more.")


class SegmentsConfig(_Section):
    """UloRL segment rollout (docs/algorithms.md §5.1-5.2): decode at most ``seg_len`` new tokens per sample per step
    and carry unfinished samples (resumed from their full prefix) into the next step.

    ``engine.max_new_tokens`` is the global max response length (UloRL: 128K in 8 x 16K segments).
    """

    enabled: bool = False
    seg_len: int | None = Field(
        None, ge=1, description="New tokens per sample per step; None = ceil(engine.max_new_tokens / 8)."
    )
    importance: Literal["pois", "sais"] = Field(
        "pois",
        description="pois: old log-probs of the whole sequence from the pre-update policy (algorithm.old_logprobs "
        "auto|recompute); sais: each segment's behaviour log-probs (algorithm.old_logprobs=rollout).",
    )
    group_mode: Literal["complete", "siblings"] = Field(
        "complete",
        description="complete: a prompt group trains once all G samples finished; siblings: a finished sample "
        "trains at once, its group statistics use the siblings finished so far.",
    )
    truncated_reward: float | None = Field(
        0.0, description="Reward of a sample cut at engine.max_new_tokens (replaces the verifiers'); None = keep."
    )
    topup: Literal["constant", "deficit"] = Field(
        "constant",
        description="New prompt groups per round: constant = train.prompts_per_step; deficit = only the missing ones.",
    )
    max_inflight_groups: int | None = Field(
        None, ge=1, description="Cap on unfinished groups; None = prompts_per_step * number of segments."
    )
    max_rounds_per_step: int = Field(
        0, ge=0, description="Stop a step's generation after this many rounds (smaller batch); 0 = until full."
    )

    def resolved_seg_len(self, max_len: int) -> int:
        """``seg_len``, or UloRL's ``max_len / 8`` (rounded up) when unset."""
        return self.seg_len if self.seg_len is not None else -(-max_len // 8)


class Config(_Section):
    plugins: list[str] = Field(
        default_factory=list, description="Modules or path/to/file.py imported before the config is checked, in "
        "the driver and in every learner and engine worker: your own estimators, losses, loss masks, length "
        "shapers, verifiers and data sources, selected by name."
    )
    stages: list[str | dict[str, Any]] = Field(
        default_factory=list, description="Extra method stages (a plugin's @register_stage): a name or "
        "{name: ..., params: {...}}; the built-in stages turn on with their own config block.",
    )
    name: str = Field("run", description="Run name; the run dir is output_dir/name.")
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)

    @model_validator(mode="after")
    def _async_threads(self) -> Config:
        """Overlapped modes on CPUs: the engine and the learner run at the same time, so by default
        each gets half the cores (both at all cores oversubscribe them: measured 4x slower steps)."""
        cl = self.cluster
        if (self.train.async_.mode != "sync" and self.learner.num_threads is None
                and cl.engine_gpus == 0 and cl.learner_gpus == 0):
            import os

            n = max(1, (cl.num_cpus or os.cpu_count() or 2) // 2)
            object.__setattr__(self, "learner", self.learner.model_copy(update={"num_threads": n}))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    @property
    def correction_mode(self) -> str:
        """``algorithm.rollout_correction.mode`` with ``auto`` resolved: tis when ``train.async`` may
        train on tokens of older policies (and the PPO ratio is not taken against them already)."""
        mode = self.algorithm.rollout_correction.mode
        if mode != "auto":
            return mode
        stale = self.train.async_.mode != "sync" and self.train.async_.max_staleness > 0
        return "tis" if stale and self.algorithm.old_logprobs != "rollout" else "none"

    @property
    def learner_algorithm(self) -> AlgorithmConfig:
        """``algorithm`` as the learners read it: ``norm_length`` defaults to the longest response,
        ``rollout_correction.mode`` resolved (:attr:`correction_mode`)."""
        a = self.algorithm
        upd: dict[str, Any] = {}
        if not a.norm_length:
            upd["norm_length"] = self.engine.max_new_tokens
        if a.rollout_correction.mode == "auto":
            upd["rollout_correction"] = a.rollout_correction.model_copy(update={"mode": self.correction_mode})
        return a.model_copy(update=upd) if upd else a
