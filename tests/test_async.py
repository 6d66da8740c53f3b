"""train.async: config checks, the staleness bound under adversarial timing, parity with sync at
max_staleness 0 (through the real Trainer), and kill -9 + resume accounting for every prompt."""

from __future__ import annotations

import threading
import time

import pytest
from test_train_e2e import ROOT, _run_cli, tiny_overrides

from rlkit.config import ConfigError, load_config

QUICK = ROOT / "recipes/quickstart.yaml"


def _cfg(*ov, recipe=QUICK):
    return load_config(recipe, list(ov))


# ---------------------------------------------------------------------- config
def test_async_config_errors_name_the_key():
    cases = {
        ("train.async.mode=one_step_off", "train.async.max_staleness=0"): "max_staleness",
        ("train.async.mode=async", "segments.enabled=true"): "'segments'",
        ("train.async.mode=async", "cluster.placement=colocated", "cluster.engine_gpus=1",
         "cluster.learner_gpus=1"): "cluster.placement",
    }
    for ov, key in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _cfg(*ov)
    with pytest.raises(ConfigError, match="step_probes"):  # SPAE probes need the current policy
        _cfg("train.async.mode=async", recipe=ROOT / "recipes/spae.yaml")
    with pytest.raises(ConfigError, match="adaptive_temperature"):  # HAPO's sampler changes each step
        _cfg("train.async.mode=one_step_off", recipe=ROOT / "recipes/hapo.yaml")
    with pytest.raises(ConfigError, match="train.async.mod"):
        _cfg("train.async.mod=async")


def test_rollout_correction_auto_turns_on_for_stale_tokens(tmp_path):
    from rlkit.config import save_config

    assert _cfg().correction_mode == "none"
    assert _cfg("train.async.mode=async", "train.async.max_staleness=0").correction_mode == "none"
    c = _cfg("train.async.mode=async", "train.async.max_staleness=2")
    assert c.correction_mode == "tis" and c.learner_algorithm.rollout_correction.mode == "tis"
    assert _cfg("train.async.mode=one_step_off", "algorithm.rollout_correction.mode=mis").correction_mode == "mis"
    assert _cfg("train.async.mode=one_step_off", "algorithm.old_logprobs=rollout").correction_mode == "none"
    save_config(c, tmp_path / "c.yaml")  # written as `async:` and read back
    assert "async:" in (tmp_path / "c.yaml").read_text()
    assert load_config(tmp_path / "c.yaml").train.async_.max_staleness == 2


def test_overlapped_modes_split_the_cpu_cores_by_default():
    assert _cfg("cluster.num_cpus=4").learner.num_threads is None  # sync: every actor uses all cores
    assert _cfg("train.async.mode=async", "cluster.num_cpus=4").learner.num_threads == 2
    assert _cfg("train.async.mode=one_step_off", "cluster.num_cpus=2").learner.num_threads == 1
    assert _cfg("train.async.mode=async", "learner.num_threads=3").learner.num_threads == 3  # explicit wins


def test_one_step_off_is_async_at_staleness_one_with_whole_requests():
    from rlkit.methods.async_rollout import async_settings

    assert async_settings(_cfg("train.async.mode=one_step_off", "train.async.max_staleness=3",
                               "train.async.partial_rollout=true")) == ("one_step_off", 1, False)
    assert async_settings(_cfg("train.async.mode=async", "train.async.max_staleness=0",
                               "train.async.partial_rollout=true")) == ("async", 0, False)


# ---------------------------------------------------------------------- the collector, in process
class SerialPool:
    """A real in-process engine behind the engine-pool interface, one call at a time (as a Ray
    actor runs its calls), each ``generate`` taking at least ``delay_s`` (a slow engine)."""

    def __init__(self, engine, delay_s: float = 0.0):
        from rollout.pool import LocalEnginePool

        self.pool, self.engine, self.delay_s, self.lock = LocalEnginePool([engine]), engine, delay_s, threading.Lock()

    def generate(self, reqs):
        with self.lock:
            t0 = time.perf_counter()
            out = self.pool.generate(reqs)
            time.sleep(max(0.0, self.delay_s - (time.perf_counter() - t0)))
            return out

    def push(self, version: int):  # the weight sync: queued behind the running call
        with self.lock:
            self.engine.load_weights({}, version=version)


def _collector(model_dir, tmp_path, *ov, delay_s=0.0, engine=None):
    from rewards import RewardManager
    from rlkit.infra.data import PromptCursor, load_run_rows
    from rlkit.infra.models import load_tokenizer
    from rlkit.loop.prompts import PromptEncoder
    from rlkit.methods.async_rollout import AsyncRollout
    from rollout.hf import HFEngine

    cfg = load_config(QUICK, [*tiny_overrides(model_dir, tmp_path, "c"), "train.prompts_per_step=2",
                              "engine.max_new_tokens=8", *ov])
    tok = load_tokenizer(model_dir)
    rows, _, _ = load_run_rows(cfg)
    cursor = PromptCursor(len(rows), cfg.seed)
    pool = SerialPool(engine or HFEngine(model_dir, max_batch_size=16, seed=0), delay_s)
    man = RewardManager.from_config(cfg.reward)
    ro = AsyncRollout(cfg, pool, cursor, rows, PromptEncoder(cfg, tok), lambda ids: tok.decode(ids), man, "math",
                      tmp_path / "c")
    ro.log = lambda msg: None
    return ro, pool, man, rows


def _drive(ro, pool, steps, learner_s=0.0):
    """The trainer's loop around the collector: collect, train (``learner_s``), push, after_sync."""
    ro.start(0)
    ro.after_sync(0)
    out = []
    for t in range(1, steps + 1):
        kept, _, m = ro.collect(t)
        versions = [v for g in kept for c in g.completions for v in c.meta["segment_versions"]]
        out.append((m, t - 1 - min(versions)))
        time.sleep(learner_s)
        pool.push(t)
        ro.after_sync(t)
    ro.close()
    return out


@pytest.mark.parametrize("k,partial,learner_s,engine_s", [
    (1, False, 0.4, 0.0),  # slow learner, fast engine: the producer runs ahead as far as allowed
    (2, True, 0.4, 0.0),
    (2, False, 0.0, 0.3),  # slow engine, fast learner: the learner waits, never trains older tokens
    (1, True, 0.0, 0.3),
])
def test_staleness_bound_holds_under_adversarial_timing(tiny_model_dir, tmp_path, k, partial, learner_s, engine_s):
    from rlkit.infra.data import PromptCursor

    ro, pool, man, rows = _collector(tiny_model_dir, tmp_path, "train.async.mode=async",
                                     f"train.async.max_staleness={k}", f"train.async.partial_rollout={partial}",
                                     "train.async.chunk_tokens=3", "train.steps=5", delay_s=engine_s)
    try:
        res = _drive(ro, pool, 5, learner_s)
    finally:
        man.close()
    for m, oldest in res:
        assert oldest <= k and m["async/staleness_max"] <= k  # recorded versions, not an estimate
    if learner_s:  # the producer ran ahead as far as allowed: the bound is reached, and held
        assert max(m["async/staleness_max"] for m, _ in res) == k
    if partial and engine_s:  # pushes landed between the chunks of running samples
        assert sum(m["async/partial_resumed"] for m, _ in res) > 0
    # every prompt the cursor handed out is trained once or still pending
    from rlkit.methods.async_rollout import read_async_log

    trained = [r for rec in read_async_log(tmp_path / "c") for r in rec["rows"]]
    pending = ro.pending_rows()
    assert sorted(trained + pending) == sorted(PromptCursor(len(rows), 0).next_indices(len(trained) + len(pending)))


def test_a_group_over_the_bound_is_regenerated_not_trained(tiny_model_dir, tmp_path):
    """The learner jumps three versions while a round sits in the buffer (a fast learner, a slow
    engine): the consumer's check sends those prompts back; they are trained, fresh, in the same step."""
    ro, pool, man, _ = _collector(tiny_model_dir, tmp_path, "train.async.mode=async", "train.async.max_staleness=1")
    try:
        ro.start(0)
        ro.after_sync(0)
        ro.collect(1)
        with ro.cond:  # the next round was started at version 0, one ahead
            while not ro.ready:
                ro.cond.wait(1.0)
            buffered = sorted(int(ro.groups[g].payload) for g in ro.ready)
        pool.push(3)
        ro.after_sync(3)
        kept, _, m = ro.collect(4)
        ro.close()
    finally:
        man.close()
    assert m["async/dropped_stale"] == 2 and m["async/staleness_max"] == 0 and len(kept) == 2
    from rlkit.methods.async_rollout import read_async_log

    rec = read_async_log(tmp_path / "c")[-1]
    assert sorted(rec["regenerate"]) == buffered
    assert all(lo == 3 for lo, _ in rec["versions"])  # what was trained is fresh
    # the sent-back prompts were trained in this step or wait to be, generated again
    assert set(buffered) <= set(rec["rows"]) | set(ro.pending_rows())


# ---------------------------------------------------------------------- through the Trainer / CLI
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["quickstart", "tempo"])
def test_async_staleness_zero_is_the_sync_run(tiny_model_dir, tmp_path, recipe):
    """mode=async, max_staleness=0 logs exactly the per-step metrics of mode=sync (one thread per actor)."""
    import golden

    from rlkit.infra.tracking import read_metrics
    from rlkit.trainer import Trainer

    runs = {}
    for name, extra in [("sync", []), ("async0", ["train.async.mode=async", "train.async.max_staleness=0"])]:
        ov = golden.overrides(tiny_model_dir, tmp_path, name) + ["train.steps=3", *extra]
        Trainer(load_config(ROOT / f"recipes/{recipe}.yaml", ov)).run()
        runs[name] = [golden.stable(m) for m in read_metrics(tmp_path / name)]
    sync, asy = runs["sync"], runs["async0"]
    assert all(m["async/staleness_max"] == 0 and m["async/dropped_stale"] == 0 for m in asy)
    assert all(set(b) <= set(a) for a, b in zip(asy, sync))
    # every metric of the sync run, bit for bit (async adds async/* and rollout/tokens_generated)
    assert golden.compare(recipe, [{k: v for k, v in a.items() if k in b} for a, b in zip(asy, sync)],
                          sync, tol=0.0) == []


def _accounting(run_dir):
    """(rows trained per the log, rows pending in the final checkpoint, rows in the data)."""
    from rlkit.infra.checkpoint import latest_checkpoint, load_checkpoint
    from rlkit.methods.async_rollout import read_async_log

    log = read_async_log(run_dir)
    st = load_checkpoint(latest_checkpoint(run_dir))["trainer_state"]["stages"]["async"]
    pending = [int(g["payload"]) for g in st["groups"]] + [int(i) for i in st["todo"]]
    return log, [r for rec in log for r in rec["rows"]], pending


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["train.async.mode=one_step_off"],
                                  ["train.async.mode=async", "train.async.max_staleness=2",
                                   "train.async.partial_rollout=true", "train.async.chunk_tokens=4"]])
def test_kill9_and_resume_skip_and_repeat_no_prompt(tiny_model_dir, tmp_path, mode):
    from rlkit.infra.data import PromptCursor
    from rlkit.infra.tracking import read_metrics

    def args(name):
        return ["train", str(QUICK), *tiny_overrides(tiny_model_dir, tmp_path, name, steps=6), *mode,
                "eval.after=false", "eval.before=false", "checkpoint.export_final=false"]

    run = tmp_path / "crash"
    for kill_at in (3, 5):  # killed mid-step (groups taken, update not done), twice
        crashed = _run_cli(args("crash"), {"RLKIT_KILL_AT_STEP": str(kill_at)})
        assert crashed.returncode == -9, crashed.stderr[-3000:]
        assert _accounting(run)[2], "the checkpoint holds the groups generated ahead"
    done = _run_cli(args("crash"))
    assert done.returncode == 0, done.stderr[-3000:]
    log, trained, pending = _accounting(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    n_rows = 40 - 4  # data.generator n minus the eval split
    cursor = PromptCursor(n_rows, 0).next_indices(len(trained) + len(pending))
    assert sorted(trained + pending) == sorted(cursor)  # nothing skipped, nothing twice
    assert len(trained) == 6 * 2
    m = read_metrics(run)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    k = 1 if "one_step_off" in mode[0] else 2
    assert all(x["async/staleness_max"] <= k for x in m) and max(x["async/staleness_max"] for x in m) >= 1
