"""The HTML report of `parallax eval --report`: one self-contained file, text escaped, and a
per-token explorer whose script runs without error in headless Chromium."""

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from parallax.cli.main import main
from parallax.eval.report import build_report

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
HOSTILE = '</script><img src=x onerror="alert(1)">&amp;'
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium, chromium-browser or google-chrome on PATH (apt-get install -y chromium)"
)


class Page(HTMLParser):
    """Every start tag as (tag, attrs), and the text inside each <script>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def with_class(self, name):
        return [a for _, a in self.tags if name in (a.get("class") or "").split()]


def render(url: str, tmp_path, *flags: str) -> str:
    """stdout of headless Chromium on ``url`` (the DOM after scripts ran, with --dump-dom)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
         *flags, url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def cws_report(tmp_path_factory):
    """A 2-step CWS run at toy size and its report (K and settling traces are recorded)."""
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    assert main(["train", "--out", str(run), "--model", "cws", "model.d_model=16", "model.n_heads=2",
                 "model.probe_head_dim=8", "model.mlp_hidden=16", "model.siren_hidden=16", "model.k_max=4",
                 "data.n_bindings=4", "data.n_queries=3", "train.steps=2", "train.eval_every=2",
                 "train.eval_batches=1", "train.batch_size=4", "train.progress=false"]) == 0
    report = root / "report.html"
    assert main(["eval", str(run), "model.halt_tol=0.3", "--batches", "1", "--report", str(report)]) == 0
    return report


def test_report_is_one_self_contained_file(cws_report):
    text = cws_report.read_text(encoding="utf-8")
    page = Page(text)
    for section in ("metrics", "kdof", "explorer", "plots"):
        assert page.find("section", id=section), section
    images = page.find("img")
    assert len(images) == 4  # K per token, K per label, settling traces, compute-quality curve
    for image in images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(PNG_HEADER)
    external = [a for _, a in page.tags if a.get("href") or not (a.get("src") or "data:").startswith("data:")]
    assert not page.find("link") and not external

    data = json.loads(page.scripts[0])
    tokens = page.with_class("tok")
    assert len(tokens) == len(data["tokens"]) > 0
    assert [t["data-i"] for t in tokens] == [str(i) for i in range(len(tokens))]
    assert all(t["style"].startswith("background:#") for t in tokens)
    assert all(len(t["trace"]) == 4 and 1 <= t["k"] <= 4 for t in data["tokens"])
    assert data["halt_tol"] == 0.3


def test_text_is_escaped_everywhere(tmp_path):
    results = {"run_dir": HOSTILE, "step": 1, "model": "cws", "data": HOSTILE,
               "metrics": {"loss": float("nan"), "per_label": {HOSTILE: {"tokens": 1, "accuracy": 1.0}}},
               "kdof": {"per_label": {}, "compute_quality": []}, "plots": []}
    token = {"text": HOSTILE, "k": 2.0, "trace": [None, 0.5], "target": HOSTILE, "label": HOSTILE, "correct": False}
    explorer = {"k_min": 1, "k_max": 2, "halt_tol": None, "separator": " ", "sequences": [[token, token]]}
    text = build_report(results, explorer)
    assert HOSTILE not in text and "<img src=x" not in text
    page = Page(text)
    assert len(page.find("script")) == 2 and not page.find("img")
    assert json.loads(page.scripts[0])["tokens"][0]["text"] == HOSTILE


def test_report_without_k_says_there_is_no_explorer():
    results = {"run_dir": "runs/t", "step": 3, "model": "transformer", "data": "sort",
               "metrics": {"loss": 0.1, "token_accuracy": 0.9}, "plots": []}
    text = build_report(results, None)
    assert "does not report per-token K" in text
    assert not Page(text).with_class("tok")


@needs_chromium
def test_explorer_script_runs_and_draws_a_trace_in_chromium(cws_report, tmp_path):
    dom = render(cws_report.as_uri() + "#selftest", tmp_path, "--dump-dom")
    page = Page(dom)
    body = page.find("body")[0]
    error = dom.split('id="script-error"', 1)[1].split("</pre>", 1)[0]
    assert body.get("data-ready") == "1", error
    assert body.get("data-selftest") == "ok"
    assert page.with_class("tok") and page.with_class("active")
    panel = dom.split('id="trace-panel"', 1)[1]
    assert "<svg" in panel and "<polyline" in panel and "K " in panel

    shot = tmp_path / "report.png"
    render(cws_report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.read_bytes().startswith(PNG_HEADER)


@needs_chromium
def test_page_without_k_runs_cleanly_in_chromium(tmp_path):
    report = tmp_path / "report.html"
    report.write_text(build_report({"run_dir": "r", "step": 1, "model": "transformer", "data": "sort",
                                    "metrics": {"loss": 0.1}, "plots": []}, None), encoding="utf-8")
    body = Page(render(report.as_uri() + "#selftest", tmp_path, "--dump-dom")).find("body")[0]
    assert body.get("data-ready") == "1" and body.get("data-selftest") == "no-tokens"
