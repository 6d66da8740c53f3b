"""``rlkit inspect``: step dumps written from real advantage estimators, rendered to HTML."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlkit.algorithms import ADVANTAGES, AdvantageInputs, AdvantageOutput, compute_entropy_h
from rlkit.algorithms.spae import find_step_boundaries, pad_steps
from rlkit.cli import main
from rlkit.tools.inspector import (
    available_steps,
    load_step_dump,
    render_html,
    render_inspect,
    write_step_dump,
)

ROOT = Path(__file__).resolve().parents[1]

# Two prompt groups of three responses; responses of a group share prefixes (TEMPO branch points)
# and ".\n\n" step ends (SPAE boundaries). "<b>&" checks HTML escaping, "" an empty token.
PROMPTS = ["What is 2+2?", "Capital of <France>?"]
ANSWERS = ["4", "Paris"]
TEXTS = [
    ["Let", " me", " think", ".\n\n", "<b>&", " 2+2", "=4", ".\n\n", "\\boxed{4}"],
    ["Let", " me", " guess", ".\n\n", "5", "\\boxed{5}"],
    ["Let", " me", " think", ".\n\n", " 2+2", "=4", "\\boxed{4}"],
    ["The", " answer", " is", " Paris", ""],
    ["The", " answer", " is", " Rome"],
    ["I", " think", " Paris"],
]
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
GROUPS = [0, 0, 0, 1, 1, 1]
FINISH = ["stop", "stop", "length", "stop", "stop", "stop"]
T = 10  # one column more than the longest response: padding that the dump must drop
MAP_NAMES = {
    "grpo": ["advantage"],
    "tempo": ["advantage", "tempo/branch", "tempo/td"],
    "spae": ["advantage", "spae/potential", "spae/step_boundary", "spae/sat_factor", "spae/shaping"],
    "hapo_token_mean": ["advantage", "entropy", "hapo/h_hat"],
}


def _token_ids() -> list[list[int]]:
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(t, len(vocab) + 1) for t in row] for row in TEXTS]


def _inputs() -> AdvantageInputs:
    ids = _token_ids()
    mask = torch.zeros(len(ids), T)
    ids_BT = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        mask[i, : len(row)] = 1
        ids_BT[i, : len(row)] = torch.tensor(row)
    bounds = [find_step_boundaries(row) for row in TEXTS]  # [[3, 7], [3], [3], [], [], []]
    acc = [[0.3 + 0.5 * k for k in range(len(b))] for b in bounds]
    conf = [[0.5 + 0.4 * k for k in range(len(b))] for b in bounds]
    g = torch.Generator().manual_seed(0)
    return AdvantageInputs(
        rewards_B=torch.tensor(REWARDS), group_ids_B=torch.tensor(GROUPS), response_mask_BT=mask,
        response_ids_BT=ids_BT, entropy_BT=(torch.rand(len(ids), T, generator=g) * 2 + 0.05) * mask,
        extras={"spae_boundaries_BK": pad_steps(bounds, -1, torch.long),
                "spae_acc_BK": pad_steps(acc, 0.0, torch.float32),
                "spae_conf_BK": pad_steps(conf, 0.0, torch.float32)},
    )


def _dump(run_dir: Path, step: int, maps: dict, meta: dict | None = None) -> Path:
    return write_step_dump(
        run_dir, step, prompts=[PROMPTS[g] for g in GROUPS], answers=[ANSWERS[g] for g in GROUPS],
        rewards=REWARDS, finish_reasons=FINISH, group_ids=GROUPS, token_ids=_token_ids(), token_texts=TEXTS,
        maps=maps, meta=meta or {"advantage": "grpo", "policy_loss": "ppo_clip", "reward/mean": 2 / 3},
    )


def _method_maps(method: str) -> tuple[dict, AdvantageInputs]:
    inp = _inputs()
    extras_keys = set(inp.extras)
    out = AdvantageOutput.of(ADVANTAGES.get(method).fn(inp, ADVANTAGES.build_params(method)))
    assert set(inp.extras) == extras_keys  # diagnostics are returned, the inputs are not modified
    maps = {"advantage": out.advantages_BT, **out.token_maps}
    if method == "hapo_token_mean":
        maps["entropy"] = inp.entropy_BT
    return maps, inp


@pytest.mark.parametrize("method", list(MAP_NAMES))
def test_dump_and_render_each_method(tmp_path: Path, method: str) -> None:
    maps, inp = _method_maps(method)
    path = _dump(tmp_path, 7, maps, {"advantage": method, "policy_loss": "ppo_clip", "actor/kl": 0.0123456})
    assert path == tmp_path / "inspect" / "step_000007.json"
    dump = json.loads(path.read_text())
    for i, r in enumerate(dump["responses"]):  # valid tokens only, values rounded to 5 digits
        n = len(TEXTS[i])
        assert r["tokens"] == TEXTS[i] and len(r["token_ids"]) == n
        for name, value in maps.items():
            assert len(r["maps"][name]) == n
            assert r["maps"][name] == pytest.approx(value[i, :n].tolist(), rel=1e-4, abs=1e-9)
    assert dump["meta"]["actor/kl"] == 0.012346 and dump["groups"][1]["prompt"] == PROMPTS[1]

    page = render_inspect(tmp_path).read_text()
    for name in MAP_NAMES[method]:
        assert f"data-map='{name}'" in page, name
    for text in {t for row in TEXTS for t in row if t}:  # every token, HTML-escaped
        assert text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
            "\n", '<i class="nl">\u21b5</i>\n') in page
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page and "Capital of &lt;France&gt;?" in page
    adv = [v for r in load_step_dump(tmp_path)["responses"] for v in r["maps"]["advantage"]]
    assert f"<td>{max(adv):.4g}</td>" in page and f"<td>{min(adv):.4g}</td>" in page  # summary table
    assert "<span class='badge length'>length</span>" in page and "0.01235" in page  # finish, metric
    assert page.count("class='resp'") == 6 and page.count("class='grp'") == 2


def test_tempo_branch_points_are_marked(tmp_path: Path) -> None:
    maps, _ = _method_maps("tempo")
    branch = maps["tempo/branch"]
    # group 0 splits after "Let me" (think/guess) and after "Let me think.\n\n" (<b>&/ 2+2)
    assert branch[:3].nonzero().tolist() == [[0, 2], [0, 4], [1, 2], [2, 2], [2, 4]]
    _dump(tmp_path, 1, maps)
    page = render_inspect(tmp_path).read_text()
    assert page.count(' m0"') == int(branch.sum())  # one marker class per branch token
    assert "body.mk0 .m0{border-top" in page and "class='mkbox' value='mk0'" in page


def test_spae_step_boundaries_and_potential(tmp_path: Path) -> None:
    maps, _ = _method_maps("spae")
    _dump(tmp_path, 1, maps)
    dump = load_step_dump(tmp_path)
    assert dump["responses"][0]["maps"]["spae/step_boundary"] == [0, 0, 0, 1, 0, 0, 0, 1, 0]
    # Φ = 1.5·acc·conf + 0.5·acc − conf on step 0 of response 0: 1.5·0.3·0.5 + 0.15 − 0.5 = −0.125
    assert dump["responses"][0]["maps"]["spae/potential"][:4] == pytest.approx([-0.125] * 4)
    page = render_inspect(tmp_path).read_text()
    marker = [s["name"] for s in _specs(page) if s["name"] == "spae/step_boundary"]
    assert marker and page.count(' m0"') == 4  # boundaries at 3, 7 (row 0), 3 (row 1), 3 (row 2)


def test_hapo_h_hat_derived_from_entropy(tmp_path: Path) -> None:
    maps, inp = _method_maps("hapo_token_mean")
    _dump(tmp_path, 1, maps)
    dump = load_step_dump(tmp_path)
    assert dump["derived"] == ["hapo/h_hat"]
    ent = torch.zeros(6, T, dtype=torch.float64)  # the dump's (rounded) entropies
    for i, r in enumerate(dump["responses"]):
        ent[i, : len(r["tokens"])] = torch.tensor(r["maps"]["entropy"], dtype=torch.float64)
    want, _ = compute_entropy_h(ent, inp.response_mask_BT, pivot=0.8)
    for i, r in enumerate(dump["responses"]):
        assert r["maps"]["hapo/h_hat"] == pytest.approx(want[i, : len(r["tokens"])].tolist(), abs=1e-4)
    h = [v for r in dump["responses"] for v in r["maps"]["hapo/h_hat"]]
    assert min(h) == pytest.approx(-1.0) and max(h) == pytest.approx(1.0)
    page = render_inspect(tmp_path).read_text()
    assert "Derived at render time from &#x27;entropy&#x27; (pivot 0.8)" in page


def test_explicit_h_hat_is_not_recomputed(tmp_path: Path) -> None:
    maps, inp = _method_maps("hapo_token_mean")
    maps["hapo/h_hat"] = torch.full((6, T), 0.25)
    _dump(tmp_path, 1, maps)
    dump = load_step_dump(tmp_path)
    assert "derived" not in dump and dump["responses"][0]["maps"]["hapo/h_hat"][0] == 0.25


def test_writer_rounding_lists_and_unknown_maps(tmp_path: Path) -> None:
    adv = [[0.123456789, 1.0, float("nan"), -2.5e-7, 123456.7, 0, 0, 0, 0, 9]] + [[0.5] * 9] * 5
    custom = [[float(k) for k in range(9)]] * 6
    edge = torch.tensor([[float("inf"), -float("inf"), 0.0, -0.0, 1e20, 2.0**-1074, -0.99999, 999995.0, 5e-5]] * 6)
    _dump(tmp_path, 3, {"advantage": adv, "custom/credit": custom, "custom/edge": edge})
    r0 = load_step_dump(tmp_path, 3)["responses"][0]
    assert r0["maps"]["advantage"] == [0.12346, 1, None, -2.5e-07, 123460, 0, 0, 0, 0]
    assert r0["maps"]["custom/credit"] == list(range(9))
    assert r0["maps"]["custom/edge"] == [None, None, 0, 0, 1e20, 0, -0.99999, 1000000, 5e-05]
    page = render_inspect(tmp_path).read_text()
    assert "data-map='custom/credit'" in page and "Per-token map written by the advantage estimator" in page
    assert "background:#ddd" in page  # the NaN token is drawn grey, not coloured
    text = (tmp_path / "inspect" / "step_000003.json").read_text()
    assert ", " not in text.split('"tokens"')[0]  # compact separators


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rewards": [1.0]}, "rewards has 1 entries, expected B=6"),
        ({"maps": {"entropy": [[0.0] * 9] * 6}}, "must include 'advantage'"),
        ({"maps": {"advantage": torch.zeros(6, 5)}}, "row 0 has 5 values but the response has 9 tokens"),
        ({"maps": {"advantage": torch.zeros(5, 9)}}, "5 rows, expected B=6"),
        ({"maps": {"advantage": torch.zeros(6 * 9)}}, "must be 2-D"),
        ({"meta": {"advantage": "grpo"}}, "meta must include 'policy_loss'"),
        ({"prompts": ["a", "b", "a", "c", "c", "c"]}, "group 0 disagree on prompt"),
        ({"token_texts": [row[:-1] for row in TEXTS]}, "response 0: 8 token_texts for 9 token_ids"),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, change: dict, match: str) -> None:
    kw = dict(prompts=[PROMPTS[g] for g in GROUPS], answers=[ANSWERS[g] for g in GROUPS], rewards=REWARDS,
              finish_reasons=FINISH, group_ids=GROUPS, token_ids=_token_ids(), token_texts=TEXTS,
              maps={"advantage": torch.zeros(6, T)}, meta={"advantage": "grpo", "policy_loss": "ppo_clip"})
    kw.update(change)
    with pytest.raises(ValueError, match=re.escape(match)):
        write_step_dump(tmp_path, 0, **kw)
    assert not list(tmp_path.glob("inspect/*.json")) and not list(tmp_path.glob("inspect/.step_*"))


def test_steps_latest_and_step_selector(tmp_path: Path) -> None:
    maps, _ = _method_maps("grpo")
    for s in (5, 1, 12):
        _dump(tmp_path, s, maps)
    assert available_steps(tmp_path) == [1, 5, 12]
    assert render_inspect(tmp_path, step=1).name == "step_000001.html"
    latest = render_inspect(tmp_path)
    assert latest == tmp_path / "inspect" / "step_000012.html"
    page = latest.read_text()
    assert "<option value='step_000001.html'>step 1</option>" in page  # rendered: a link
    assert "<option value='' disabled>step 5 (not rendered)</option>" in page
    assert "<option value='step_000012.html' selected>step 12</option>" in page
    assert available_steps(tmp_path / "inspect") == [1, 5, 12]  # the dump dir itself works too


def test_render_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tracking.inspect_groups > 0"):
        render_inspect(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_inspect(tmp_path / "nope")
    _dump(tmp_path, 1, _method_maps("grpo")[0])
    _dump(tmp_path, 5, _method_maps("grpo")[0])
    with pytest.raises(FileNotFoundError, match=r"no inspect dump for step 3 .*available steps: 1, 5"):
        render_inspect(tmp_path, step=3)
    (tmp_path / "inspect" / "step_000009.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an rlkit inspect dump"):
        render_inspect(tmp_path, step=9)
    with pytest.raises(ValueError, match="no responses"):
        render_html({"step": 0, "meta": {}, "groups": [], "responses": []})


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "tracking.inspect_groups" in capsys.readouterr().err
    _dump(tmp_path, 4, _method_maps("tempo")[0])
    out = tmp_path / "sub" / "page.html"
    assert main(["inspect", str(tmp_path), "--step", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and "data-map='tempo/td'" in out.read_text()
    assert main(["inspect", str(tmp_path), "--step", "2"]) == 2
    assert "available steps: 4" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    _dump(tmp_path, 2, _method_maps("grpo")[0])
    proc = subprocess.run([sys.executable, "-m", "rlkit.cli", "inspect", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "inspect" / "step_000002.html"
    assert (tmp_path / "inspect" / "step_000002.html").is_file()


def _specs(page: str) -> list[dict]:
    raw = re.search(r"<script type='application/json' id='rlkit-data'>(.*?)</script>", page, re.S).group(1)
    return json.loads(raw)["maps"]


def test_embedded_data_is_script_safe_and_complete(tmp_path: Path) -> None:
    maps, _ = _method_maps("spae")
    _dump(tmp_path, 1, maps)
    page = render_inspect(tmp_path).read_text()
    raw = re.search(r"<script type='application/json' id='rlkit-data'>(.*?)</script>", page, re.S).group(1)
    assert "<" not in raw and "&" not in raw
    data = json.loads(raw)
    names = ["advantage", "spae/potential", "spae/shaping", "spae/sat_factor", "spae/step_boundary"]
    assert [m["name"] for m in data["maps"]] == names  # KNOWN_MAPS order, advantage first
    assert [m["kind"] for m in data["maps"]] == ["div", "div", "div", "seq", "seq"]
    assert [m["name"] for m in data["markers"]] == ["spae/step_boundary"]
    assert [len(r["ids"]) for r in data["resp"]] == [len(t) for t in TEXTS]
    assert all(math.isfinite(v) for r in data["resp"] for v in r["m"]["advantage"])


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_page_script_parses(tmp_path: Path) -> None:
    _dump(tmp_path, 1, _method_maps("tempo")[0])
    page = render_inspect(tmp_path).read_text()
    js = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(js) == 1
    (tmp_path / "page.js").write_text(js[0])
    proc = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
