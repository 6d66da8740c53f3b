"""Registry behaviour and import hygiene of rlkit.algorithms."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

import rlkit.algorithms as alg
from rlkit.algorithms import registry as reg


@dataclass(frozen=True)
class FooParams:
    alpha: float = 1.0
    beta: int = 2


def _fresh() -> reg.Registry:
    r = reg.Registry("thing")

    @r.register("foo", params=FooParams, aliases=("foo_alias",))
    def foo(x: int, p: FooParams) -> float:
        return x * p.alpha

    @r.register("bar")
    def bar(x: int, p: reg.NoParams) -> int:
        return x

    return r


def test_register_and_get() -> None:
    r = _fresh()
    entry = r.get("foo")
    assert entry.name == "foo" and entry.params is FooParams
    assert entry.fn(3, r.build_params("foo", {"alpha": 2.0})) == 6.0
    assert r.get("foo_alias") is entry
    assert r.get("bar").params is reg.NoParams
    assert r.build_params("bar", {}) == reg.NoParams()
    assert r.names() == ["bar", "foo"]
    assert "foo" in r and "foo_alias" in r and "baz" not in r
    assert len(r) == 2 and list(r) == ["bar", "foo"]


def test_duplicate_name_raises() -> None:
    r = _fresh()
    with pytest.raises(ValueError, match="'foo' is already registered"):
        r.register("foo")(lambda x, p: x)
    with pytest.raises(ValueError, match="'foo_alias' is already registered"):
        r.register("other", aliases=("foo_alias",))(lambda x, p: x)


def test_unknown_name_lists_valid_and_nearest() -> None:
    r = _fresh()
    with pytest.raises(KeyError) as exc:
        r.get("fooo")
    msg = str(exc.value)
    assert "unknown thing 'fooo'" in msg
    assert "Did you mean 'foo'?" in msg
    assert "bar, foo, foo_alias" in msg


def test_build_params_unknown_kwarg_names_key_and_nearest() -> None:
    r = _fresh()
    with pytest.raises(ValueError) as exc:
        r.build_params("foo", {"alpah": 3.0})
    msg = str(exc.value)
    assert "'alpah'" in msg and "Did you mean 'alpha'?" in msg and "alpha, beta" in msg
    assert r.build_params("foo", {"beta": 5}) == FooParams(alpha=1.0, beta=5)
    assert r.build_params("foo", None) == FooParams()


def test_params_must_be_dataclass() -> None:
    r = reg.Registry("thing")
    with pytest.raises(TypeError):
        r.register("x", params=dict)


def test_builtin_registries() -> None:
    assert {"brpo", "dr_grpo", "grpo", "hapo_token_mean", "rloo", "spae", "tempo"} <= set(alg.ADVANTAGES.names())
    assert {"gspo", "hapo", "ppo_clip"} <= set(alg.POLICY_LOSSES.names())
    assert alg.AGGREGATIONS.names() == [
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "token-mean",
    ]
    assert set(alg.KL_ESTIMATORS.names()) == {"k1", "k2", "k3", "abs"}
    assert alg.KL_ESTIMATORS.get("low_var_kl").name == "k3"
    assert alg.KL_ESTIMATORS.get("mse").name == "k2"
    assert alg.ADVANTAGES.get("grpo").params is alg.GRPOParams
    assert alg.POLICY_LOSSES.build_params("ppo_clip", {"clip_high": 0.28}) == alg.PPOClipParams(
        clip_low=0.2, clip_high=0.28, clip_c=3.0
    )
    with pytest.raises(ValueError, match="Did you mean 'clip_high'"):
        alg.POLICY_LOSSES.build_params("ppo_clip", {"clip_hgh": 0.28})
    with pytest.raises(KeyError, match="Did you mean 'grpo'"):
        alg.ADVANTAGES.get("gpro")


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="clip_c"):
        alg.PPOClipParams(clip_c=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        alg.PPOClipParams(clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high"):
        alg.GSPOParams(clip_high=-1.0)
    with pytest.raises(ValueError, match="eps"):
        alg.GRPOParams(eps=-1.0)
    assert alg.PPOClipParams(clip_c=None).clip_c is None


def test_imports_only_torch_and_stdlib() -> None:
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import rlkit.algorithms\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "bad = sorted(m for m in new if m != 'rlkit' and m.lstrip('_') not in sys.stdlib_module_names"
        " and m not in sys.stdlib_module_names)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
