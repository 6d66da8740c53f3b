"""Tests for rlkit.infra.checkpoint: atomic save/load, pruning, crash leftovers, RNG, tied weights."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from rlkit.infra.checkpoint import (
    capture_rng_state,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _train_objects(seed: int = 0) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _assert_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip_restores_training_state(tmp_path: Path) -> None:
    model, opt, sched = _train_objects()
    trainer_state = {"cursor": 17, "pool": [("a", 1.0)], "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path, 3, model_state=model.state_dict(),
                           optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                           trainer_state=trainer_state)
    assert path == tmp_path / "checkpoints" / "step_00000003"
    assert (path / "COMPLETE").exists() and (path / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path) == path
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    ck = load_checkpoint(path)
    assert ck["step"] == 3
    _assert_equal(model.state_dict(), ck["model_state"])
    _assert_equal(opt.state_dict(), ck["optimizer_state"])
    _assert_equal(sched.state_dict(), ck["scheduler_state"])
    assert ck["trainer_state"]["cursor"] == 17 and ck["trainer_state"]["pool"] == [("a", 1.0)]

    # A fresh model/optimizer/scheduler loaded from it continues identically.
    model2, opt2, sched2 = _train_objects(seed=1)
    model2.load_state_dict(ck["model_state"])
    opt2.load_state_dict(ck["optimizer_state"])
    sched2.load_state_dict(ck["scheduler_state"])
    x = torch.randn(5, 4)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(x).pow(2).mean().backward()
        o.step()
        s.step()
    _assert_equal(model.state_dict(), model2.state_dict())
    assert sched.get_last_lr() == sched2.get_last_lr()
    # Loading from the run dir resolves the latest checkpoint.
    assert load_checkpoint(tmp_path)["step"] == 3


def test_optional_states_none(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)})
    ck = load_checkpoint(path)
    assert ck["optimizer_state"] is None and ck["scheduler_state"] is None
    assert ck["trainer_state"] == {}


def test_keep_last_prunes(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model_state={"w": torch.full((2,), float(step))},
                        trainer_state={}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert load_checkpoint(latest_checkpoint(tmp_path))["model_state"]["w"][0] == 40
    save_checkpoint(tmp_path, 50, model_state={"w": torch.ones(1)}, keep_last=0)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40, 50]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, model_state={"w": torch.zeros(2)})
    save_checkpoint(tmp_path, 5, model_state={"w": torch.ones(2)})
    assert torch.equal(load_checkpoint(tmp_path)["model_state"]["w"], torch.ones(2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_latest_none_when_no_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)


def test_crashed_temp_dir_ignored_and_cleaned(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)})
    ckpt_dir = tmp_path / "checkpoints"
    # A save of step 2 that crashed mid-write (dead pid), and one by a previous process that had
    # our pid; plus a step dir that somehow lacks the COMPLETE marker.
    crashed = ckpt_dir / ".tmp_step_2_999999999"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"garbage")
    own = ckpt_dir / f".tmp_step_3_{os.getpid()}"
    own.mkdir()
    torn = ckpt_dir / "step_00000004"
    torn.mkdir()
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(torn)
    assert load_checkpoint(tmp_path)["step"] == 1
    assert not crashed.exists() and not own.exists()

    crashed.mkdir()
    save_checkpoint(tmp_path, 5, model_state={"w": torch.ones(2)})
    assert not crashed.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 5]


def test_stale_latest_pointer_falls_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, keep_last=5)
    p2 = save_checkpoint(tmp_path, 2, model_state={"w": torch.ones(2)}, keep_last=5)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert latest_checkpoint(tmp_path) == p2


def test_rng_capture_restore(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(5)
    state = capture_rng_state()
    expected = (torch.rand(4), [random.random() for _ in range(3)], np.random.rand(2))
    # Round-trip through a checkpoint as a trainer would.
    save_checkpoint(tmp_path, 1, model_state={}, trainer_state={"rng": state})
    torch.rand(10)
    random.random()
    restore_rng_state(load_checkpoint(tmp_path)["trainer_state"]["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert [random.random() for _ in range(3)] == expected[1]
    assert np.array_equal(np.random.rand(2), expected[2])


def test_tied_and_shared_weights_save(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied embeddings
    big = torch.arange(12.0)
    state = {"embed.weight": emb.weight, "lm_head.weight": head.weight,
             "a": big[:6], "b": big[6:], "t": big.view(3, 4).t()}
    path = save_checkpoint(tmp_path, 1, model_state=state)
    loaded = load_checkpoint(path)["model_state"]
    assert torch.equal(loaded["embed.weight"], emb.weight.detach())
    assert loaded["lm_head.weight"] is loaded["embed.weight"]  # stored once, re-tied
    assert torch.equal(loaded["a"], big[:6]) and torch.equal(loaded["b"], big[6:])
    assert torch.equal(loaded["t"], big.view(3, 4).t())


def test_torch_save_fallback_without_safetensors(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import rlkit.infra.checkpoint as ck_mod

    monkeypatch.setattr(ck_mod, "_safetensors_available", lambda: False)
    w = torch.randn(3, 3)
    path = save_checkpoint(tmp_path, 1, model_state={"w": w, "w2": w})
    assert (path / "model.pt").exists() and not (path / "model.safetensors").exists()
    loaded = load_checkpoint(path)["model_state"]
    assert torch.equal(loaded["w"], w) and loaded["w2"] is loaded["w"]


class _FakeSaver:
    def __init__(self) -> None:
        self.saved: list[str] = []
        self.merged = False

    def save_pretrained(self, out: str) -> None:
        self.saved.append(out)
        Path(out, "config.json").write_text("{}")


class _FakePeft(_FakeSaver):
    def merge_and_unload(self) -> _FakeSaver:
        self.merged = True
        return _FakeSaver()


def test_export_hf_duck_typed(tmp_path: Path) -> None:
    model, tok = _FakePeft(), _FakeSaver()
    out = export_hf(model, tok, tmp_path / "export")
    assert (out / "config.json").exists() and model.saved and tok.saved
    merged_model = _FakePeft()
    export_hf(merged_model, None, tmp_path / "m", merge=True)
    assert not merged_model.merged and not merged_model.saved  # a deep copy was merged
    export_hf(merged_model, None, tmp_path / "m2", merge=True, inplace=True)
    assert merged_model.merged
    with pytest.raises(TypeError):
        export_hf(_FakeSaver(), None, tmp_path / "x", merge=True)


def test_export_hf_peft_adapter_and_merge(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    out = export_hf(model, None, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()
    merged = export_hf(model, None, tmp_path / "merged", merge=True)
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    assert isinstance(model, peft.PeftModel)  # caller's model untouched
    # A real tied-embedding HF model's full state dict goes through save_checkpoint.
    plain = transformers.LlamaForCausalLM(cfg)
    state = plain.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, model_state=state))["model_state"]
    reloaded = transformers.LlamaForCausalLM(cfg)
    reloaded.load_state_dict(loaded, strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_learner_written_files_make_the_same_checkpoint(tmp_path):
    """``write_files`` (the learner writing its part into the temporary directory) gives the checkpoint
    that passing the states gives; ``load_trainer_state`` reads only the driver's part."""
    from rlkit.infra.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint, write_state_files

    w = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    opt, sched, ts = {"state": {0: {"m": torch.zeros(2)}}}, {"last_epoch": 3}, {"cursor": 7}
    seen = []

    def write(d):
        seen.append(d.name)
        assert d.name.startswith(".tmp_step_2")  # written where the checkpoint is assembled, before it is final
        return write_state_files(d, w, opt, sched)

    a = save_checkpoint(tmp_path / "a", 2, write_files=write, trainer_state=ts)
    b = save_checkpoint(tmp_path / "b", 2, model_state=w, optimizer_state=opt, scheduler_state=sched, trainer_state=ts)
    assert seen and sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    la, lb = load_checkpoint(a), load_checkpoint(b)
    assert all(torch.equal(la["model_state"][k], lb["model_state"][k]) for k in w)
    assert la["scheduler_state"] == sched and la["trainer_state"] == ts and la["step"] == 2
    assert load_trainer_state(a) == (2, ts)
    with pytest.raises(ValueError, match="exactly one of model_state and write_files"):
        save_checkpoint(tmp_path / "c", 1, model_state=w, write_files=write)
    with pytest.raises(ValueError, match="exactly one"):
        save_checkpoint(tmp_path / "c", 1)

    def broken(d):
        (d / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # a failed write leaves no checkpoint behind
        save_checkpoint(tmp_path / "d", 1, write_files=broken)
    assert not any((tmp_path / "d" / "checkpoints").iterdir())
