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


# ----------------------------------------------------------------------------- plug-in routes

EP_MODULE = """
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


class Scaled:
    def __init__(self, scale=1.0):
        self.scale, self.ready = scale, False

    def setup(self):
        self.ready = True

    def __call__(self, completions, **kwargs):
        assert self.ready, "setup() must run first"
        return [self.scale * len(c) for c in completions]
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real installed distribution (module + .dist-info with entry_points.txt) on sys.path."""
    (tmp_path / "rlkit_ep_demo.py").write_text(EP_MODULE)
    info = tmp_path / "rlkit_ep_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlkit-ep-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[rlkit.rewards]\nep_len = rlkit_ep_demo:length_reward\nep_scaled = rlkit_ep_demo:Scaled\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rlkit_ep_demo", raising=False)
    return tmp_path


def test_entry_point_route(installed_plugin):
    from rewards.registry import entry_point_names

    assert {"ep_len", "ep_scaled"} <= set(entry_point_names())
    assert "rlkit_ep_demo" not in sys.modules  # listing names imports nothing
    assert resolve("ep_len")(["abc", ""]) == [3.0, 0.0]
    assert resolve("ep_scaled", {"scale": 2.0})(["ab"]) == [4.0]  # class: params, then setup()


def test_entry_point_in_workers_sandbox_and_config(installed_plugin):
    from rlkit.config import ConfigError, load_config

    specs = [
        rewards.VerifierSpec("ep_len"),
        rewards.VerifierSpec("ep_scaled", sandbox=True, params={"scale": 3}),
    ]
    with rewards.RewardManager(specs, num_workers=1) as rm:  # spawned workers find it too
        _, _, per = rm.score(["ab", "c"])
    assert per["ep_len"] == [2.0, 1.0] and per["ep_scaled"] == [6.0, 3.0]
    cfg = load_config(None, ["reward.verifiers=[{name: ep_len}, {name: format, label: fmt}]"])
    assert [v.name for v in cfg.reward.verifiers] == ["ep_len", "format"]
    with pytest.raises(ConfigError, match="did you mean 'ep_len'"):
        load_config(None, ["reward.verifiers=[{name: ep_lne}]"])
    with pytest.raises(ConfigError, match="duplicate metric names"):
        load_config(None, ["reward.verifiers=[{name: format}, {name: format}]"])


def test_params_for_functions(tmp_path):
    module = tmp_path / "param_verifiers.py"
    module.write_text(
        "def scaled(completions, scale=1.0, **kw):\n    return [scale * len(c) for c in completions]\n\n"
        "def strict(completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
    )
    assert resolve(f"{module}:scaled", {"scale": 2})(["abc"], scale=[9]) == [6.0]  # param beats column
    with pytest.raises(TypeError, match=r"does not accept params \['scale'\]"):
        resolve(f"{module}:strict", {"scale": 2})


def test_trl_reward_functions_work_unchanged():
    """TRL calls reward_func(prompts=..., completions=..., completion_ids=..., **columns) by keyword,
    so TRL functions may put `completions` anywhere and ask for `prompts` or `trainer_state`."""

    def trl_style(prompts, completions, ground_truth, **kwargs):
        return [float(g in c) + 0.5 * ("?" in p) for p, c, g in zip(prompts, completions, ground_truth)]

    def trl_format(completions, **kwargs):  # TRL's docs example shape
        return [1.0 if c.startswith("<think>") else 0.0 for c in completions]

    reward("test_trl_style")(trl_style)
    convo = [[{"role": "assistant", "content": "it is 4"}], [{"role": "assistant", "content": "<think>5"}]]
    columns = {
        "prompts": ["2+2?", "2+3"],
        "ground_truth": ["4", "4"],
        "trainer_state": None,
        "completion_ids": [[1], [2]],
    }
    assert resolve("test_trl_style")(convo, **columns) == [1.5, 0.0]
    assert rewards.registry._wrap(trl_format, "x", {})(convo, **columns) == [0.0, 1.0]


def test_example_recipe_validates_and_scores(monkeypatch, capsys):
    """recipes/examples/custom_verifiers.yaml: `rlkit config` accepts it and every route it uses
    (registered name + params, built-in, file class + label, sandboxed TRL-style function) scores."""
    from rlkit.cli import main
    from rlkit.config import load_config

    monkeypatch.chdir(os.path.dirname(os.path.dirname(FIXTURES)))  # the repo root, as documented
    recipe = "recipes/examples/custom_verifiers.yaml"
    assert main(["config", recipe]) == 0 and "concise_correct" in capsys.readouterr().out
    cfg = load_config(recipe)
    completions = ["<think>2+2</think> so \\boxed{4}", "go go go go go go \\boxed{5}"]
    with rewards.RewardManager.from_config(cfg.reward, mode="inline") as rm:
        total, metrics, per = rm.score(completions, {"answer": ["4", "4"]})
    assert per["concise_correct"] == [1.0, 0.0] and per["format"] == [1.0, 1.0]
    assert per["think_budget"] == [0.0, 0.0] and metrics["reward/think_budget/none"] == 1
    assert per["no_repetition"] == pytest.approx([1.0, 1 / 3])  # ran in the sandbox
    assert total == pytest.approx([1.0 + 0.1 + 0.2, 0.1 + 0.2 / 3])
    assert rm.sandbox_limits.max_output_bytes == 256 * 1024 and rm.batch_deadline_s == 120


def test_config_refuses_a_param_a_registered_function_does_not_take():
    from rlkit.compose import ConfigError
    from rlkit.config import load_config

    @reward("cfg_check_strict_fn")
    def strict(completions, answer):  # no **kwargs: only the columns it names
        return [1.0] * len(completions)

    with pytest.raises(ConfigError, match=r"reward.verifiers.0.params: cfg_check_strict_fn takes no keyword argument"):
        load_config(None, ["reward.verifiers=[{name: cfg_check_strict_fn, params: {scale: 2}}]"])
