"""Weight-sync verification: after a sync, every engine scores a fixed probe and its log-probs are
compared with the learner's on the same tokens (``cluster.verify_sync_every``).

A sync that silently delivers wrong weights (a corrupted or missing tensor, a LoRA adapter not
applied, a bucket sent to the wrong layer) does not fail: the engines keep sampling from some
other policy and the run drifts. The probe is two fixed 16-token continuations of fixed 16-token
prefixes (ids below 256, which exist in every real vocabulary); the check costs one teacher-forced
``score`` call per engine and one forward pass of the learner.
"""

from __future__ import annotations

from typing import Any

PROBE_PREFIXES = [[20 + (7 * i + 3) % 200 for i in range(16)], [20 + (11 * i + 5) % 200 for i in range(16)]]
PROBE_CONTINUATIONS = [[20 + (13 * i + 1) % 200 for i in range(16)], [20 + (5 * i + 9) % 200 for i in range(16)]]


class SyncVerificationError(RuntimeError):
    """An engine's log-probs after a weight sync are not the learner's."""


def verify_sync(pool: Any, learner: Any, step: int, tol: float) -> dict[str, float]:
    """Score the probe on every engine of ``pool`` and on ``learner``; return
    ``{"sync/logprob_max_abs_diff": worst engine's max |difference|}``, or raise
    :class:`SyncVerificationError` naming the engine and the step when it exceeds ``tol``."""
    import ray

    from rlkit.loop.batch import build_batch

    batch = build_batch(PROBE_PREFIXES, PROBE_CONTINUATIONS, pad_id=0)
    ref = ray.get(learner.compute_logprobs.remote(batch))
    diffs = []
    for rows in pool.score_each(PROBE_PREFIXES, PROBE_CONTINUATIONS):
        diffs.append(max(abs(float(a) - float(ref[i, t])) for i, row in enumerate(rows) for t, a in enumerate(row)))
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    if diffs[worst] > tol:
        raise SyncVerificationError(
            f"weight sync check after step {step}: engine {worst} scores a fixed probe {diffs[worst]:.3g} nats away "
            f"from the learner (> cluster.verify_sync_tol={tol:g}; engines: "
            f"{', '.join(f'{d:.2g}' for d in diffs)}): its weights are not the learner's")  # fmt: skip
    return {"sync/logprob_max_abs_diff": diffs[worst]}


def verify_or_stop(pool: Any, learner: Any, step: int, tol: float, run_dir: Any) -> dict[str, float]:
    """:func:`verify_sync`; a failure names the last checkpoint to resume from."""
    from rlkit.infra.checkpoint import latest_checkpoint

    try:
        return verify_sync(pool, learner, step, tol)
    except SyncVerificationError as e:
        raise SyncVerificationError(f"{e}; stopping. Last checkpoint: {latest_checkpoint(run_dir) or 'none'}") from None
