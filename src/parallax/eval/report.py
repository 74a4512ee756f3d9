"""A self-contained HTML page of one evaluation: metrics tables, the plots, and a per-token
compute explorer for models that report K.

One file with no network access (plots are base64 PNGs, the script is inline), so it can be
mailed, attached to an issue or opened from a cluster's scratch disk. The explorer shows a
sample of validation text, each token shaded by the iterations K it used; hovering or
focusing a token draws its settling trace (relative change of the raw logits per iteration,
``settle_trace``) as an SVG sparkline against the halting tolerance. All text is escaped:
into HTML with ``html.escape``, into the embedded JSON with ``<``, ``>`` and ``&`` as
``\\u`` escapes, and the script writes it back with ``textContent`` only.

Open ``report.html#selftest`` and the script hovers the first token itself and marks
``<body data-selftest="ok">``; ``data-ready="1"`` says the script ran without an exception
(otherwise the error is shown in ``#script-error``). The browser test reads both.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import torch

SAMPLE_SEQUENCES = 2
MAX_TOKENS = 256  # per sampled sequence, to keep the page small for long text sequences
LEGEND_SWATCHES = 8  # at most this many K values in the colour legend


def token_explorer(
    run_dir: str | Path,
    *,
    overrides: list[str] = (),
    device: str = "auto",
    sequences: int = SAMPLE_SEQUENCES,
    seed: int = 0,
) -> dict[str, Any] | None:
    """K, settling trace, label and outcome of every token of a few validation sequences.

    They are drawn as ``evaluate_run`` draws its first batch (validation split, same seed),
    so the explorer shows the kind of text the metrics scored (the very same sequences where
    a source draws sequence by sequence, as BIND/RECALL does). None for a model that does
    not report ``k_used``. K at position t is what the model spent on input token t while predicting
    target t; ``label`` and ``correct`` are set only where that prediction is scored.
    """
    from parallax.checkpoint import load_run
    from parallax.data.batch import batch_generator
    from parallax.eval.kdof import K_KEY, TRACE_KEY
    from parallax.train.runtime import resolve_device, resolve_precision

    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, overrides=list(overrides))
    batch = run.source.batch("val", sequences, batch_generator(seed, "val", 0)).to(dev)
    autocast = resolve_precision(run.config.train.precision, dev)
    was_training = run.model.training
    run.model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        out = run.model(batch.input_ids, loss_mask=batch.loss_mask)
    run.model.train(was_training)
    if K_KEY not in out.diagnostics:
        return None
    k_used = out.diagnostics[K_KEY].float().cpu()
    trace = out.diagnostics.get(TRACE_KEY)
    trace = trace.float().cpu() if trace is not None else None
    predicted = out.logits.argmax(-1).cpu()
    batch = batch.to("cpu")
    source = run.source

    def token(b: int, t: int) -> dict[str, Any]:
        scored = bool(batch.loss_mask[b, t])
        return {
            "text": source.decode([int(batch.input_ids[b, t])]),
            "k": _finite(k_used[b, t]),
            "trace": [] if trace is None else [_finite(v) for v in trace[b, t]],
            "target": source.decode([int(batch.targets[b, t])]) if scored else None,
            "label": source.label_names[int(batch.labels[b, t])] if scored else None,
            "correct": bool(predicted[b, t] == batch.targets[b, t]) if scored else None,
        }

    cfg = run.model.config
    return {
        "k_min": getattr(cfg, "k_min", 1),
        "k_max": getattr(cfg, "k_max", int(k_used.max())),
        "halt_tol": getattr(cfg, "halt_tol", None),
        # text sources detokenize (pieces carry their own spaces); task symbols need a separator
        "separator": "" if getattr(source, "tokenizer", None) is not None else " ",
        "sequences": [
            [token(b, t) for t in range(min(batch.input_ids.shape[1], MAX_TOKENS))]
            for b in range(batch.input_ids.shape[0])
        ],
    }


def _finite(value) -> float | None:
    """A JSON-safe number: 4 significant digits, None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else None


def write_report(
    path: str | Path,
    results: dict,
    *,
    run_dir: str | Path,
    overrides: list[str] = (),
    device: str = "auto",
) -> Path:
    """``results`` of ``evaluate_run`` plus the token explorer of ``run_dir``, as one HTML file."""
    explorer = token_explorer(run_dir, overrides=overrides, device=device) if results.get("kdof") else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(results, explorer), encoding="utf-8")
    return path


def build_report(results: dict, explorer: dict | None) -> str:
    """The page as a string; ``explorer`` as returned by ``token_explorer`` (None: no K)."""
    title = f"{results['model']} on {results['data']}, step {results['step']}"
    sections = [
        f"<h1>parallax eval: {_esc(title)}</h1>",
        f"<p class=\"sub\">run <code>{_esc(results['run_dir'])}</code></p>",
        _metrics_section(results["metrics"]),
    ]
    if results.get("kdof"):
        sections.append(_kdof_section(results["kdof"]))
    sections.append(_explorer_section(explorer))
    sections.append(_plots_section(results.get("plots", [])))
    raw = json.dumps(results, indent=2, default=str)
    sections.append(f"<details><summary>all results (JSON)</summary><pre>{_esc(raw)}</pre></details>")
    body = "\n".join(sections)
    tokens = [tok for sequence in explorer["sequences"] for tok in sequence] if explorer else []
    data = _script_json({"tokens": tokens, "halt_tol": explorer["halt_tol"] if explorer else None})
    return PAGE.format(title=_esc(title), style=STYLE, body=body, data=data, script=SCRIPT)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _script_json(data: dict) -> str:
    """JSON safe inside <script>: no "</script>" or "<!--" can form, whatever the strings hold."""
    text = json.dumps(data, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else _esc(value)
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(str(v) for v in value))
    return _esc(value)


def _table(rows: list[dict], caption: str) -> str:
    """One row per dict, columns the union of their keys in first-seen order."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><caption>{_esc(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scalars(mapping: dict, caption: str) -> str:
    """The plain (non-nested) values of ``mapping`` as a two-column table."""
    rows = "".join(
        f"<tr><th>{_esc(key)}</th><td>{_cell(value)}</td></tr>"
        for key, value in mapping.items() if not isinstance(value, (dict, list))
    )
    return f"<table><caption>{_esc(caption)}</caption><tbody>{rows}</tbody></table>" if rows else ""


def _per_key(mapping: dict[str, dict], key_name: str, caption: str) -> str:
    return _table([{key_name: name, **stats} for name, stats in mapping.items()], caption)


def _metrics_section(metrics: dict) -> str:
    parts = ["<section id=\"metrics\"><h2>Metrics</h2>", _scalars(metrics, "overall")]
    if metrics.get("per_label"):
        parts.append(_per_key(metrics["per_label"], "label", "per difficulty label"))
    return "".join(parts) + "</section>"


def _kdof_section(kdof: dict) -> str:
    parts = ["<section id=\"kdof\"><h2>K-DOF: compute per token</h2>", _scalars(kdof, "overall")]
    if kdof.get("hard_vs_easy"):
        parts.append(_scalars(kdof["hard_vs_easy"], "hard vs easy tokens"))
    if kdof.get("per_label"):
        parts.append(_per_key(kdof["per_label"], "label", "K per label"))
    parts.append(_table(kdof.get("compute_quality", []), "compute-quality curve (same weights, test-time k_max)"))
    parts.append(_table(kdof.get("k_by_surprisal", []), "K by surprisal (equal-count loss bins)"))
    return "".join(parts) + "</section>"


def _plots_section(paths: list[str]) -> str:
    figures = []
    for path in paths:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        name = Path(path).name
        figures.append(
            f"<figure><img alt=\"{_esc(name)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_esc(name)}</figcaption></figure>"
        )
    body = "".join(figures) or "<p>No plots were written for this evaluation.</p>"
    return f"<section id=\"plots\"><h2>Plots</h2>{body}</section>"


def _k_colour(k: float | None, k_min: float, k_max: float) -> tuple[str, str]:
    """(background, text) colours for ``k`` on viridis: dark purple = few, yellow = many."""
    from matplotlib import colormaps, colors

    if k is None:
        return "#dddddd", "#000000"
    fraction = (min(max(k, k_min), k_max) - k_min) / max(k_max - k_min, 1)
    r, g, b, _ = colormaps["viridis"](fraction)
    text = "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#ffffff"  # luma: dark text on light
    return colors.to_hex((r, g, b)), text


def _explorer_section(explorer: dict | None) -> str:
    head = "<section id=\"explorer\"><h2>Per-token compute</h2>"
    if explorer is None:
        note = "This model does not report per-token K, so there is nothing to explore."
        return f"{head}<p class=\"note\">{note}</p></section>"
    k_min, k_max = explorer["k_min"], explorer["k_max"]
    steps = sorted({round(k_min + i * (k_max - k_min) / (LEGEND_SWATCHES - 1)) for i in range(LEGEND_SWATCHES)})
    legend = "".join(
        "<span class=\"swatch\" style=\"background:{};color:{}\">{}</span>".format(*_k_colour(k, k_min, k_max), k)
        for k in steps
    )
    index = 0
    paragraphs = []
    for number, sequence in enumerate(explorer["sequences"]):
        spans = []
        for tok in sequence:
            bg, fg = _k_colour(tok["k"], k_min, k_max)
            scored = " scored" if tok["label"] is not None else ""
            spans.append(
                f"<span class=\"tok{scored}\" tabindex=\"0\" data-i=\"{index}\" title=\"K {_cell(tok['k'])}\" "
                f"style=\"background:{bg};color:{fg}\">{_esc(tok['text'])}</span>"
            )
            index += 1
        paragraphs.append(f"<p class=\"seq\"><span class=\"seqno\">sequence {number}</span>"
                          + _esc(explorer["separator"]).join(spans) + "</p>")
    return (
        head
        + "<p>Validation text, each input token shaded by the iterations K the model spent on it; "
        "underlined tokens are scored (the next token is predicted and counted). Hover or focus "
        "a token for its settling trace: the relative change of the raw logits at each "
        "iteration (log scale), against the halting tolerance (dashed).</p>"
        + f"<p class=\"legend\">K: {legend}</p>"
        + "".join(paragraphs)
        + "<div id=\"trace-panel\" aria-live=\"polite\"><p class=\"note\">Hover over a token.</p></div></section>"
    )


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0; } .sub { color: #666; margin-top: .3em; }
table { border-collapse: collapse; margin: .8em 1.5em .8em 0; display: inline-table; vertical-align: top; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ddd; padding: .2em .6em; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } tbody th, td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #666; font-size: .9em; }
.seq { font-family: ui-monospace, monospace; line-height: 2.1; white-space: pre-wrap; }
.seqno { color: #888; margin-right: .8em; font-family: system-ui, sans-serif; }
.tok { padding: .15em .1em; border-radius: 2px; cursor: default; }
.tok.scored { text-decoration: underline; text-underline-offset: 3px; }
.tok:hover, .tok:focus, .tok.active { outline: 2px solid #e4572e; }
.swatch { padding: .1em .5em; margin-right: 1px; font-family: ui-monospace, monospace; }
#trace-panel { position: sticky; bottom: 0; background: #fff; border-top: 1px solid #ccc; padding: .5em 0;
               min-height: 90px; }
#trace-panel svg { display: block; } .note { color: #666; }
#script-error { color: #b00; white-space: pre-wrap; }
"""

SCRIPT = """
function sparkline(trace, haltTol) {
  // trace[i] is the change at iteration i+1 (null before the first change and after halting)
  var NS = "http://www.w3.org/2000/svg", W = 260, H = 64, P = 6;
  var pts = [];
  trace.forEach(function (v, i) { if (v !== null && v > 0) pts.push([i, Math.log10(v)]); });
  var ys = pts.map(function (p) { return p[1]; });
  if (haltTol) ys.push(Math.log10(haltTol));
  var lo = Math.min.apply(null, ys), hi = Math.max.apply(null, ys);
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  var x = function (i) { return P + i * (W - 2 * P) / Math.max(trace.length - 1, 1); };
  var y = function (v) { return H - P - (v - lo) * (H - 2 * P) / (hi - lo); };
  var svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("role", "img");
  function add(tag, attrs) {
    var el = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (a) { el.setAttribute(a, attrs[a]); });
    return svg.appendChild(el);
  }
  add("rect", {x: 0, y: 0, width: W, height: H, fill: "#fafafa", stroke: "#ddd"});
  if (haltTol) add("line", {x1: P, x2: W - P, y1: y(Math.log10(haltTol)), y2: y(Math.log10(haltTol)),
                            stroke: "#999", "stroke-dasharray": "4 3"});
  add("polyline", {points: pts.map(function (p) { return x(p[0]) + "," + y(p[1]); }).join(" "),
                   fill: "none", stroke: "#3b528b", "stroke-width": 1.5});
  pts.forEach(function (p) { add("circle", {cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: "#3b528b"}); });
  return svg;
}

function show(tok, data, panel) {
  var t = data.tokens[Number(tok.getAttribute("data-i"))];
  document.querySelectorAll(".tok.active").forEach(function (el) { el.classList.remove("active"); });
  tok.classList.add("active");
  var line = document.createElement("p");
  var what = "token " + JSON.stringify(t.text) + " · K " + t.k;
  if (t.label !== null) {
    what += " · predicts " + JSON.stringify(t.target) + " (" + t.label + ", " + (t.correct ? "right" : "wrong") + ")";
  }
  line.textContent = what;
  if (!t.trace.length) { panel.replaceChildren(line); return; }  // K without a recorded trace
  var values = document.createElement("p");
  values.className = "note";
  values.textContent = "change per iteration: "
    + t.trace.map(function (v) { return v === null ? "-" : v.toPrecision(3); }).join("  ");
  panel.replaceChildren(line, sparkline(t.trace, data.halt_tol), values);
}

function fail(err) {
  var box = document.getElementById("script-error");
  box.textContent += "script error: " + (err && err.stack ? err.stack : err) + "\\n";
  box.hidden = false;
  document.body.setAttribute("data-ready", "error");
}
// errors inside event handlers (a hover) do not reach the try below
window.addEventListener("error", function (event) { fail(event.error || event.message); });

try {
  var data = JSON.parse(document.getElementById("token-data").textContent);
  var panel = document.getElementById("trace-panel");
  document.querySelectorAll(".tok").forEach(function (tok) {
    tok.addEventListener("mouseover", function () { show(tok, data, panel); });
    tok.addEventListener("focus", function () { show(tok, data, panel); });
  });
  if (location.hash === "#selftest") {
    var first = document.querySelector(".tok");
    if (first) {
      first.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
      if (!first.classList.contains("active")) throw new Error("selftest: hovering did not select the token");
      if (data.tokens[0].trace.length && !panel.querySelector("svg polyline")) {
        throw new Error("selftest: hovering drew no sparkline");
      }
    }
    document.body.setAttribute("data-selftest", first ? "ok" : "no-tokens");
  }
  document.body.setAttribute("data-ready", "1");
} catch (err) {
  fail(err);
}
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<pre id="script-error" hidden></pre>
{body}
<script type="application/json" id="token-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
