"""Token-level credit inspector: per-step dumps of sampled responses and a self-contained HTML view.

The trainer calls :func:`write_step_dump` with the responses of a few prompt groups (config
``tracking.inspect_groups``); ``rlkit inspect RUN_DIR [--step N] [--out FILE]`` calls
:func:`render_inspect`, which writes one HTML page (inline CSS/JS, no network) where every token is
coloured by its advantage or by any other per-token map (entropy, HAPO ĥ, TEMPO branch points and
TD terms, SPAE step potentials and boundaries, or any map an estimator writes to
``extras["token_maps"]``), with a hover tooltip listing every value of the token.

The page: responses grouped by prompt (prompt, gold answer, reward, finish reason, length; groups
whose rewards are all equal are flagged), a map selector (buttons, keys 1-9, or a click on the stats
table), three colour scales (batch p99 of |v| (default), batch max, per response) with a numeric
legend, toggleable markers for 0/1 maps (TEMPO branch points, SPAE step boundaries), a per-response
overview strip (click to jump), click-to-pin tooltips, a step selector, and per-map statistics
including mean |v| over five position slices (where along the responses the credit went).

Dump format, ``RUN_DIR/inspect/step_{N:06d}.json`` (compact JSON; floats rounded to 5 significant
digits, non-finite values stored as ``null``; only each response's valid tokens are kept)::

    {"format": "rlkit-inspect/1", "step": N, "meta": {"advantage": ..., "policy_loss": ..., ...},
     "groups": [{"id": g, "prompt": str, "answer": any}],
     "responses": [{"group": g, "reward": r, "finish_reason": str,
                    "token_ids": [int], "tokens": [str], "maps": {name: [float | null]}}]}

When a dump has ``entropy`` but no ``hapo/h_hat`` the renderer derives ĥ with
:func:`rlkit.algorithms.hapo.compute_entropy_h` (pivot 0.8) over the dump's own tokens; training
computes ĥ over the whole batch, so the statistics (hence values) can differ slightly.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from rlkit.tools.inspect_dump import (  # noqa: F401  (re-exported)
    DUMP_DIR,
    FORMAT,
    H_HAT_PIVOT,
    _dump_dir,
    _resolve_step,
    available_steps,
    load_step_dump,
    write_step_dump,
)

__all__ = ["available_steps", "load_step_dump", "render_html", "render_inspect", "write_step_dump"]

# name -> (button label, description); maps not listed are rendered generically under their name
KNOWN_MAPS: dict[str, tuple[str, str]] = {
    "advantage": ("advantage", "Per-token advantage the policy loss used (meta.advantage)."),
    "entropy": ("entropy H", "Policy entropy at the token (nats)."),
    "hapo/h_hat": ("ĥ HAPO", "HAPO normalised entropy ĥ ∈ [-1, 1], 0 at the pivot quantile (§3.1)."),
    "tempo/td": ("TD TEMPO", "TEMPO prefix-value TD term added at branch tokens (docs/algorithms.md §1.3)."),
    "tempo/branch": ("branch TEMPO", "TEMPO branch points: tokens where the group's prefix tree splits."),
    "spae/potential": ("Φ SPAE", "SPAE step potential Φ of the token's step (docs/algorithms.md §2.3)."),
    "spae/shaping": ("ξ·g SPAE", "SPAE potential-difference shaping term ξ·g(ΔΦ) (docs/algorithms.md §2.4)."),
    "spae/sat_factor": ("f SPAE", "SPAE saturation factor f: damps credit once the answer is known."),
    "spae/step_boundary": ("steps SPAE", "SPAE step boundaries: last token of each reasoning step."),
}
SIGNED = {"advantage", "hapo/h_hat", "tempo/td", "spae/potential", "spae/shaping"}  # always diverging
# marker styles of binary maps: known ones get their own, any other 0/1 map a dashed outline
MARKER_STYLES = {  # CSS with SEL (the token selector) and COL (the marker colour) placeholders
    "tempo/branch": ("#e08214", "SEL{border-top:2px solid COL}"
                                "SEL::before{content:'⑂';color:COL;font-size:.75em;vertical-align:super}"),
    "spae/step_boundary": ("#1b7837", "SEL{box-shadow:inset 0 -3px 0 COL}"),
}
MARKER_LABELS = {"tempo/branch": "branch points", "spae/step_boundary": "step boundaries"}
GENERIC_MARKER_COLORS = ("#762a83", "#01665e", "#8c510a", "#c51b7d")
DIVERGING = ("#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7",  # ColorBrewer RdBu: red < 0 < blue
             "#d1e5f0", "#92c5de", "#4393c3", "#2166ac")
SEQUENTIAL = ("#fcfbfd", "#dadaeb", "#bcbddc", "#9e9ac8", "#756bb1", "#54278f")


def _pct(sorted_vals: list[float], q: float) -> float:
    return sorted_vals[round(q * (len(sorted_vals) - 1))] if sorted_vals else 0.0


def _map_specs(dump: dict) -> list[dict]:
    """Per map: kind (div/seq), marker flag, scales and summary stats over all valid tokens."""
    resps = dump["responses"]
    names: list[str] = []
    for r in resps:
        names += [n for n in r["maps"] if n not in names]
    order = list(KNOWN_MAPS)
    first = {n: i for i, n in enumerate(names)}
    names = sorted(names, key=lambda n: (order.index(n) if n in order else len(order), first[n]))
    specs = []
    for name in names:
        rows = [r["maps"].get(name, []) for r in resps]
        buckets = [[0.0, 0] for _ in range(5)]  # |v| sum, count per fifth of each response
        for row in rows:
            for q in range(5):
                seg = [v for v in row[q * len(row) // 5:(q + 1) * len(row) // 5] if v is not None]
                buckets[q][0] += sum(map(abs, seg))
                buckets[q][1] += len(seg)
        s = sorted(v for row in rows for v in row if v is not None)
        n = len(s)
        a = sorted(map(abs, s))
        mean = math.fsum(s) / n if n else 0.0
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in s) / n) if n else 0.0
        # marker maps: the known 0/1 maps, and any other map holding both 0s and 1s and nothing else
        binary = name in MARKER_STYLES or (name not in KNOWN_MAPS and n > 0 and set(s) == {0, 1})
        kind = "div" if name in SIGNED or (n and s[0] < 0) else "seq"
        label, desc = KNOWN_MAPS.get(name, (name, "Per-token map written by the advantage estimator."))
        if name == "advantage":
            desc = desc.replace("meta.advantage", str(dump["meta"].get("advantage", "?")))
        if name in dump.get("derived", []):
            desc += (f" Derived at render time from 'entropy' (pivot {H_HAT_PIVOT}) over this dump's tokens;"
                     " training uses the whole batch, so values can differ slightly.")
        specs.append({
            "name": name, "label": label, "desc": desc, "kind": kind, "binary": binary, "n": n,
            "mean": mean, "std": std, "min": s[0] if n else 0.0, "median": _pct(s, 0.5),
            "max": s[-1] if n else 0.0, "nonzero": sum(v != 0 for v in s) / n if n else 0.0,
            "pos": sum(v for v in s if v > 0), "neg": sum(v for v in s if v < 0),
            "amax": a[-1] if n else 0.0, "p99": _pct(a, 0.99), "q99": _pct(s, 0.99),
            "quintiles": [b[0] / b[1] if b[1] else 0.0 for b in buckets],
        })
    return specs


def _g(x: Any) -> str:
    """4 significant digits; ``None`` -> 'n/a'."""
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _ramp(u: float, anchors: tuple[str, ...]) -> str:
    """``#rrggbb`` at ``u`` in [0, 1] on the piecewise-linear colour map through ``anchors``."""
    u = min(1.0, max(0.0, u)) * (len(anchors) - 1)
    i = min(int(u), len(anchors) - 2)
    f = u - i
    a, b = (bytes.fromhex(anchors[j][1:]) for j in (i, i + 1))
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


_LEVELS = 256
_PALETTES = {name: [_ramp(j / _LEVELS, anchors) for j in range(_LEVELS + 1)]
             for name, anchors in (("div", DIVERGING), ("seq", SEQUENTIAL))}


def _scale(spec: dict) -> tuple[float, float]:
    """Colour range under the default scale: ±(p99 of |v|) if diverging, [min, p99] if sequential."""
    if spec["kind"] == "div":
        s = spec["p99"] or spec["amax"] or 1.0
        return -s, s
    return spec["min"], spec["q99"] if spec["q99"] > spec["min"] else spec["max"]


def _color(v: float | None, spec: dict) -> str:
    """Inline style of a token under the default scale; the same mapping as the page's JS."""
    if v is None:
        return "background:#ddd"
    lo, hi = _scale(spec)
    if spec["kind"] == "div":
        u = (v / hi + 1) / 2
        strong = abs(2 * u - 1) > 0.72
    else:
        u = (v - lo) / (hi - lo) if hi > lo else 0.0
        strong = u > 0.72
    bg = _PALETTES[spec["kind"]][round(min(1.0, max(0.0, u)) * _LEVELS)]  # 1/256 steps: invisible
    return f"background:{bg}" + (";color:#fff" if strong else "")


def _row_stats(vals: list) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "no values"
    return f"mean {_g(sum(v) / len(v))} · Σ {_g(float(sum(v)))} · min {_g(min(v))} · max {_g(max(v))}"


# --------------------------------------------------------------------------------------- HTML

from rlkit.tools.inspector_assets import CSS, JS  # noqa: E402  (page assets)


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can end the element or start markup."""
    s = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _tok_html(text: str, classes: str, style: str) -> str:
    if text == "":
        return f'<span class="t e{classes}" style="{style}">∅</span>'
    body = html.escape(text, quote=False)
    if "\n" in body:
        body = body.replace("\n", '<i class="nl">\u21b5</i>\n')
    return f'<span class="t{classes}" style="{style}">{body}</span>'


def _fmt_answer(answer: Any) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def _h(x: Any) -> str:
    return html.escape(str(x))


def _header(dump: dict, specs: list[dict], title: str, step_options: list[tuple[int, str | None]]
            ) -> list[str]:
    """Title, step selector, step metrics, and the sticky control bar (map buttons, scale, legend)."""
    meta, resps = dump["meta"], dump["responses"]
    n_tok = sum(len(r["token_ids"]) for r in resps)
    out = [f"<header><h1>{_h(title)}</h1><div class='mut'>advantage <b>{_h(meta.get('advantage'))}</b> · "
           f"policy loss <b>{_h(meta.get('policy_loss'))}</b> · {len(resps)} responses in "
           f"{len(dump['groups'])} groups · {n_tok} tokens"]
    if step_options:
        opts = "".join(
            f"<option value='{_h(href or '')}'{' selected' if s == dump['step'] else ''}"
            f"{'' if href else ' disabled'}>step {s}{'' if href else ' (not rendered)'}</option>"
            for s, href in step_options)
        out.append(" · <label>step <select id='step' title='steps with a dump; render the others with "
                   f"rlkit inspect RUN_DIR --step N'>{opts}</select></label>")
    out.append("</div>")
    extra = {k: v for k, v in meta.items() if k not in ("advantage", "policy_loss")}
    if extra:
        shown = {k: json.dumps(v) if isinstance(v, (dict, list)) else _g(v) for k, v in sorted(extra.items())}
        rows = "".join(f"<tr><td>{_h(k)}</td><td>{_h(v)}</td></tr>" for k, v in shown.items())
        out.append(f"<details><summary class='mut'>step metrics ({len(extra)})</summary>"
                   f"<table>{rows}</table></details>")
    out.append("</header>")
    buttons = "".join(
        f"<button data-map='{_h(s['name'])}' title='{_h(s['name'])}: {_h(s['desc'])}"
        f"{f' (key {i + 1})' if i < 9 else ''}'>{_h(s['label'])}</button>" for i, s in enumerate(specs))
    markers = "".join(
        f"<label title='{_h(s['desc'])}'><input type='checkbox' class='mkbox' value='mk{i}' checked> "
        f"<span style='color:{s['color']}'>■</span> {_h(MARKER_LABELS.get(s['name'], s['name']))}</label>"
        for i, s in enumerate(m for m in specs if m["binary"]))
    adv = specs[0]
    lo, hi = _scale(adv)
    ticks = "".join(f"<span>{_g(lo + (hi - lo) * i / 4)}</span>" for i in range(5))
    grad = ",".join(DIVERGING if adv["kind"] == "div" else SEQUENTIAL)
    out.append(
        f"<div class='bar'><div id='maps'>colour by: {buttons}</div>"
        "<label>scale <select id='scale'><option value='p99'>batch p99 |v|</option>"
        "<option value='max'>batch max</option><option value='row'>per response</option></select></label>"
        f"{('<span>markers: ' + markers + '</span>') if markers else ''}"
        "<label><input type='checkbox' id='full'> expand responses</label>"
        f"<div class='legend'><div class='grad' style='background:linear-gradient(to right,{grad})'></div>"
        f"<div class='ticks'>{ticks}</div></div>"
        f"<div id='mdesc' class='mut'>{_h(adv['name'])}: {_h(adv['desc'])}</div></div>")
    return out


def _summary(specs: list[dict]) -> str:
    """Table of per-map statistics with a 5-bar 'mean |v| along the response' sparkline."""
    cols = ("map", "tokens", "mean", "std", "min", "median", "max", "≠0", "Σ+", "Σ−")
    head = "".join(f"<th>{c}</th>" for c in cols) + (
        "<th title='mean |v| by position: 5 equal slices of each response'>|v| along response</th>"
        "<th>about</th>")
    rows = []
    for s in specs:
        top = max(s["quintiles"]) or 1.0
        spark = "".join(f"<i style='height:{max(1, round(16 * q / top))}px' title='{_g(q)}'></i>"
                        for q in s["quintiles"])
        nums = "".join(f"<td>{_g(float(s[k]))}</td>" for k in ("mean", "std", "min", "median", "max"))
        rows.append(
            f"<tr data-map='{_h(s['name'])}'><td><b>{_h(s['name'])}</b></td><td>{s['n']}</td>{nums}"
            f"<td>{s['nonzero']:.0%}</td><td>{_g(float(s['pos']))}</td><td>{_g(float(s['neg']))}</td>"
            f"<td><span class='spark'>{spark}</span></td><td class='desc'>{_h(s['desc'])}</td></tr>")
    return ("<section id='summary'><h2>Per-token maps <span class='mut'>(all valid tokens of this dump; "
            f"click a row to colour by it)</span></h2><table><tr>{head}</tr>{''.join(rows)}</table>"
            "</section>")


def _response(i: int, j: int, r: dict, adv: dict, marker_names: list[str]) -> str:
    toks = []
    for k, text in enumerate(r["tokens"]):
        cls = "".join(f" m{m}" for m, name in enumerate(marker_names) if r["maps"][name][k] == 1)
        toks.append(_tok_html(text, cls, _color(r["maps"]["advantage"][k], adv)))
    fr = _h(r["finish_reason"])
    return (f"<div class='resp' data-r='{i}'><div class='rh'><b>#{j}</b><span>reward <b>{_g(r['reward'])}</b>"
            f"</span><span class='badge {fr}'>{fr}</span><span>{len(r['token_ids'])} tokens</span>"
            f"<span class='rs'>{_h(adv['label'])}: {_row_stats(r['maps']['advantage'])}</span></div>"
            "<canvas class='strip' title='overview of the whole response: click to jump'></canvas>"
            f"<div class='toks'>{''.join(toks)}</div></div>")


def _groups(dump: dict, specs: list[dict]) -> list[str]:
    """One section per prompt group: prompt, gold answer, reward summary, then its responses."""
    marker_names = [s["name"] for s in specs if s["binary"]]
    info = {g["id"]: g for g in dump["groups"]}
    members: dict[int, list[int]] = {}
    for i, r in enumerate(dump["responses"]):
        members.setdefault(r["group"], []).append(i)
    out = []
    for gid, idx in members.items():
        ok = [x for x in (dump["responses"][i]["reward"] for i in idx) if x is not None]
        mean = sum(ok) / len(ok) if ok else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in ok) / len(ok)) if ok else 0.0
        flat = (" · <span class='warn' title='every response got the same reward: zero outcome advantage'>"
                "all rewards equal</span>") if len(ok) > 1 and std == 0 else ""
        g = info.get(gid, {"prompt": "", "answer": None})
        out.append(
            f"<section class='grp'><div class='gh'><h2>group {gid} <span class='mut'>· {len(idx)} responses"
            f" · reward mean {_g(float(mean))} ± {_g(float(std))}{flat}</span></h2>"
            f"<div class='kv'>prompt</div><div class='prompt'>{_h(g['prompt'])}</div>"
            "<div class='kv'>gold answer</div>"
            f"<div class='answer'>{_h(_fmt_answer(g['answer']))}</div></div>")
        out += [_response(i, j, dump["responses"][i], specs[0], marker_names) for j, i in enumerate(idx)]
        out.append("</section>")
    return out


def render_html(
    dump: dict, *, title: str = "", step_options: list[tuple[int, str | None]] | None = None
) -> str:
    """The inspector page of one loaded dump (see :func:`load_step_dump`).

    ``step_options``: ``(step, href or None)`` pairs for the step selector (None: not rendered).
    """
    if not dump["responses"]:
        raise ValueError("the dump holds no responses")
    for i, r in enumerate(dump["responses"]):
        if "advantage" not in r["maps"]:
            raise ValueError(f"response {i} of the dump has no 'advantage' map")
    specs = _map_specs(dump)
    marker_specs = [s for s in specs if s["binary"]]
    css = [CSS]
    for i, s in enumerate(marker_specs):
        generic = (GENERIC_MARKER_COLORS[i % len(GENERIC_MARKER_COLORS)], "SEL{outline:1px dashed COL}")
        c, rule = MARKER_STYLES.get(s["name"], generic)
        css.append(rule.replace("SEL", f"body.mk{i} .m{i}").replace("COL", c))
        s["color"] = c
    data = {"maps": [{k: s[k] for k in ("name", "label", "desc", "kind", "min", "max", "amax", "p99", "q99")}
                     for s in specs],
            "markers": [{"name": s["name"], "color": s["color"]} for s in marker_specs],
            "cmap": {"div": DIVERGING, "seq": SEQUENTIAL},
            "resp": [{"ids": r["token_ids"], "m": r["maps"]} for r in dump["responses"]]}
    title = title or f"rlkit inspect · step {dump['step']}"
    body_cls = " ".join(f"mk{i}" for i in range(len(marker_specs)))
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>{html.escape(title)}</title>"
             f"<style>{''.join(css)}</style></head><body class='{body_cls}'>",
             *_header(dump, specs, title, step_options or []), "<main>", _summary(specs),
             *_groups(dump, specs), "</main><div id='tip'></div>",
             f"<script type='application/json' id='rlkit-data'>{_script_json(data)}</script>",
             f"<script>{JS}</script></body></html>"]
    return "".join(parts)


def render_inspect(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Render the dump of ``step`` (None = latest) to ``out`` (default ``RUN_DIR/inspect/step_N.html``).

    Raises:
        FileNotFoundError: the run dir has no dumps (``tracking.inspect_groups`` must be > 0) or no
            dump for ``step`` (the message lists the available steps).
    """
    step, steps = _resolve_step(run_dir, step)
    dump = load_step_dump(run_dir, step)
    out_path = Path(out) if out is not None else _dump_dir(run_dir) / f"step_{step:06d}.html"
    options = []
    for s in steps:
        name = f"step_{s:06d}.html"
        rendered = s == step or (out_path.parent / name).is_file()
        options.append((s, (out_path.name if s == step else name) if rendered else None))
    run = Path(run_dir).resolve()
    run_name = run.parent.name if run.name == DUMP_DIR else run.name
    page = render_html(dump, title=f"rlkit inspect · {run_name} · step {step}", step_options=options)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8", errors="replace")
    return out_path
