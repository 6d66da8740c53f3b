"""Verifiers for tests/test_rewards_*.py, loaded by path ("tests/rewards_fixtures.py:name") so that
spawned reward workers can import them. Samples containing "BAD" trigger each fault."""

from __future__ import annotations

import asyncio
import os
import time


def exact(completions, answer, **columns):
    """1.0 where the completion equals the answer."""
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]


def exact_no_kwargs(completions, answer):
    """Like exact, but without **kwargs: extra dataset columns must be filtered out."""
    return exact(completions, answer)


async def async_exact(completions, answer, **columns):
    await asyncio.sleep(0)
    return exact(completions, answer)


class LengthVerifier:
    """Class verifier: setup() must run before the first call."""

    def __init__(self):
        self.scale = None

    def setup(self):
        self.scale = 0.1

    def __call__(self, completions, **columns):
        return [self.scale * len(c) for c in completions]


def _good(completions):
    return [1.0] * len(completions)


def raises(completions, **columns):
    if any("BAD" in c for c in completions):
        raise RuntimeError("verifier exploded")
    return _good(completions)


def sleeps(completions, **columns):
    if any("BAD" in c for c in completions):
        time.sleep(30)
    return _good(completions)


def returns_nan(completions, **columns):
    return [float("nan") if "BAD" in c else 1.0 for c in completions]


def returns_none(completions, **columns):
    return [None if "BAD" in c else 1.0 for c in completions]


def returns_string(completions, **columns):
    return ["high" if "BAD" in c else 1.0 for c in completions]


def wrong_length(completions, **columns):
    return [1.0 for c in completions if "BAD" not in c]


def crashes(completions, **columns):
    if any("BAD" in c for c in completions):
        os._exit(3)
    return _good(completions)


def not_a_list(completions, **columns):
    return 1.0
