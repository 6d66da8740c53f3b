"""rlkit.infra.models: name resolution, tokenizer/model loading, LoRA wrapping, tiny models."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from rlkit.infra import models
from rlkit.infra.models import (
    CHATML_TEMPLATE,
    apply_chat_template,
    load_model,
    load_tokenizer,
    make_tiny_model,
    resolve_model_path,
)


def test_unknown_name_suggests_alias(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct") as info:
        resolve_model_path("smollm2-135m-instrukt", cache_dir=str(tmp_path))
    assert "Did you mean" in str(info.value) and "no model hub" in str(info.value)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub id with no hub: say what to do
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"Hub snapshot failed.*huggingface-cli download meta-llama/Llama-3-8B"
                       r".*built-in alias: \['smollm2-135m-instruct'\]"):
        resolve_model_path("meta-llama/Llama-3-8B", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model directory 'runs/nope/final' does not exist"):
        resolve_model_path("runs/nope/final", cache_dir=str(tmp_path))  # a path, not a hub id


def test_local_dir_returned_as_is(tiny_model_dir: str) -> None:
    assert resolve_model_path(tiny_model_dir) == tiny_model_dir


def test_alias_conversion_is_atomic_and_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent resolvers: one conversion, every caller gets the complete directory."""
    calls: list[int] = []

    def fake_convert(directory: Path, gguf_file: str, out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # a slow conversion widens the race window
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_builtin_gguf", lambda alias: (tmp_path, "x.gguf"))
    monkeypatch.setattr(models, "_gguf_to_hf", fake_convert)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        resolve_model_path("SmolLM2-135M-Instruct", cache_dir=str(tmp_path / "cache")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    assert results == [str(target)] * 4 and len(calls) == 1
    assert (target / "config.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # temp dir renamed


def test_failed_conversion_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(directory: Path, gguf_file: str, out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_builtin_gguf", lambda alias: (tmp_path, "x.gguf"))
    monkeypatch.setattr(models, "_gguf_to_hf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("smollm2-135m-instruct", cache_dir=str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"


def test_tiny_model_roundtrip_and_determinism(tmp_path: Path) -> None:
    a = make_tiny_model(str(tmp_path / "a"), arch="qwen2", seed=3)
    b = make_tiny_model(str(tmp_path / "b"), arch="qwen2", seed=3)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes()
    tok = load_tokenizer(a)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left" and 256 < len(tok) <= 500
    text = "Tom has 12 apples. What is 3+4?"
    assert tok.decode(tok.encode(text)) == text  # byte-level BPE: lossless
    ids = apply_chat_template(tok, [{"role": "user", "content": "What is 2+3?"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(tok, "What is 2+3?") == ids
    model = load_model(a)
    cfg = model.config
    shape = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert shape == ("qwen2", 2, 64, len(tok))
    assert model.generation_config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny_model(str(tmp_path / "c"), arch="gpt2")


def test_load_tokenizer_fallbacks(tiny_model_dir: str, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw.pad_token = None
    raw.chat_template = None
    raw.save_pretrained(str(tmp_path))
    for f in tmp_path.glob("chat_template.*"):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="rlkit.infra.models"):
        tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.chat_template == CHATML_TEMPLATE
    assert "no chat template" in caplog.text


def test_lora_trainable_params_only_in_adapters(tiny_model_dir: str) -> None:
    model = load_model(tiny_model_dir, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # "all-linear" covers attention and MLP projections, not the LM head
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    only_q = load_model(tiny_model_dir, lora={"rank": 2, "target_modules": ["q_proj"]})
    assert all("q_proj" in n for n, p in only_q.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown LoRA keys"):
        load_model(tiny_model_dir, lora={"rnak": 4})


def test_load_model_dtype_and_checkpointing(tiny_model_dir: str) -> None:
    import torch

    model = load_model(tiny_model_dir, dtype="bfloat16", gradient_checkpointing=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")


@pytest.mark.slow
def test_smollm2_alias_resolves(smollm2_dir: str) -> None:
    tok = load_tokenizer(smollm2_dir)
    assert (Path(smollm2_dir) / "config.json").is_file()
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert resolve_model_path("smollm2-135m-instruct") == smollm2_dir  # cached: no reconversion


def test_adapter_dir_resolves_to_a_merged_model_once(tiny_model_dir: str, tmp_path: Path) -> None:
    """A LoRA run's ``final/`` as ``model.name``: merged into its base once, same logits as base + adapter."""
    import torch

    from rlkit.infra.checkpoint import export_hf

    torch.manual_seed(0)
    peft_model = load_model(tiny_model_dir, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)  # PEFT starts B at 0: make the adapter change the outputs
    adapter = export_hf(peft_model, load_tokenizer(tiny_model_dir), tmp_path / "run" / "final")
    cache = tmp_path / "cache"
    merged = models.resolve_model_path(str(adapter), cache_dir=str(cache))
    assert Path(merged, "config.json").is_file() and not Path(merged, "adapter_config.json").exists()
    assert Path(merged).parent == cache / "merged" and Path(merged).name.startswith("run-final-")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        got = load_model(merged).eval()(ids).logits
        base = load_model(tiny_model_dir).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter is really in there
    stamp = Path(merged, "config.json").stat().st_mtime_ns
    assert models.resolve_model_path(str(adapter), cache_dir=str(cache)) == merged  # cached, not rebuilt
    assert Path(merged, "config.json").stat().st_mtime_ns == stamp
    # a different adapter (same path) gets its own merged copy
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    export_hf(peft_model, None, adapter)
    assert models.resolve_model_path(str(adapter), cache_dir=str(cache)) != merged
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        models.resolve_model_path(str(adapter), cache_dir=str(cache))
