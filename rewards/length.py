"""Length and budget shaping terms added to verifier rewards (spec §6). Plain Python, no torch.

Only DAPO's soft overlong punishment lives here so far; the other shapers (Kimi, L1, HAPO-history,
BRPO budgets) join this module with their own issue.
"""

from __future__ import annotations


def dapo_overlong_penalty(length: int, *, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO soft overlong punishment (spec §6e, verl ``dapo.py``).

    ``0`` while ``length <= max_len - buffer_len``, then linear down to ``-penalty_factor`` at
    ``max_len`` (and capped at ``-penalty_factor`` beyond it).

    >>> [round(dapo_overlong_penalty(n, max_len=20480, buffer_len=4096), 4) for n in (16000, 16384, 18432, 20480)]
    [0.0, 0.0, -0.5, -1.0]
    """
    expected = max_len - buffer_len
    over = length - expected
    return max(min(-over / buffer_len * penalty_factor, 0.0), -penalty_factor)
