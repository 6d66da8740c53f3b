"""rewards.registry: resolve routes, class/async verifiers, TRL conversational input, plugins."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

import rewards
from rewards.registry import UnknownRewardError, completion_text, lookup, resolve, reward

FIXTURES = os.path.join(os.path.dirname(__file__), "rewards_fixtures.py")


def test_builtins_registered():
    assert {"math", "format", "think_format"} <= set(rewards.list_rewards())


def test_resolve_registered_name():
    assert resolve("format")(["\\boxed{1}", "1"]) == [1.0, 0.0]


def test_resolve_module_function():
    fn = resolve("rewards.format:boxed_format_reward")
    assert fn(["\\boxed{1}"]) == [1.0]


def test_resolve_file_function_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(os.path.dirname(FIXTURES))
    fn = resolve("rewards_fixtures.py:exact")
    assert fn(["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    # Loading the same file again reuses the module instead of executing it twice.
    assert lookup(f"{FIXTURES}:exact") is lookup("rewards_fixtures.py:exact")


def test_unknown_name_lists_registered_and_nearest():
    with pytest.raises(KeyError) as err:
        resolve("maht")
    msg = str(err.value)
    assert "did you mean 'math'" in msg.lower() and "format" in msg
    assert isinstance(err.value, UnknownRewardError)


def test_unknown_attribute_and_missing_file():
    with pytest.raises(KeyError, match="no attribute"):
        resolve("rewards.format:nope")
    with pytest.raises(FileNotFoundError):
        resolve("does/not/exist.py:fn")


def test_duplicate_name_raises():
    @reward("test_dup_name")
    def first(completions, **kw):
        return [0.0] * len(completions)

    reward("test_dup_name")(first)  # same object again: fine

    with pytest.raises(ValueError, match="already registered"):

        @reward("test_dup_name")
        def second(completions, **kw):
            return [1.0] * len(completions)


def test_class_verifier_setup_runs():
    fn = resolve(f"{FIXTURES}:LengthVerifier")
    assert fn(["ab", "abcd"]) == pytest.approx([0.2, 0.4])


def test_async_verifier():
    fn = resolve(f"{FIXTURES}:async_exact")
    assert fn(["1", "2"], answer=["1", "1"]) == [1.0, 0.0]

    async def inside_a_running_loop():
        return fn(["1"], answer=["1"])

    assert asyncio.run(inside_a_running_loop()) == [1.0]


def test_trl_conversational_completions():
    convo = [
        [{"role": "assistant", "content": "thinking..."}, {"role": "assistant", "content": "\\boxed{7}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "7"}]}],
    ]
    assert resolve("math")(convo, answer=["7", "7"]) == [1.0, 1.0]
    assert resolve("format")(convo) == [1.0, 0.0]
    assert completion_text([]) == "" and completion_text({"content": "x"}) == "x"


def test_columns_filtered_for_functions_without_kwargs():
    fn = resolve(f"{FIXTURES}:exact_no_kwargs")
    assert fn(["3"], answer=["3"], question=["1+2?"], trainer_state=None) == [1.0]


def test_load_plugins_from_file(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        textwrap.dedent("""
        from rewards import reward

        @reward("test_plugin_len")
        def plugin_len(completions, **kw):
            return [float(len(c)) for c in completions]
    """)
    )
    rewards.load_plugins([str(plugin)])
    rewards.load_plugins([str(plugin)])  # idempotent
    assert "test_plugin_len" in rewards.list_rewards()
    assert resolve("test_plugin_len")(["abc"]) == [3.0]


def test_import_is_light():
    code = (
        "import sys, rewards; print(sorted(m for m in ('torch', 'rlkit', 'math_verify') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(FIXTURES)))  # fmt: skip
    assert out.stdout.strip() == "[]"
