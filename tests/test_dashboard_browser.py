"""The feature dashboard in a real headless browser (Debian's chromium): it loads from disk, lists the
features, renders a feature view with highlighted tokens, and logs no console errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.interpret.synthetic import TOKEN_FEATURE, write_planted_world
from pipeline.params import load_params
from pipeline.testing import default_params, write_params
from stages.interpret import run_interpret

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`apt-get install -y chromium`; .ci/run installs it)")


def browse(url: str, profile: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages) of ``url`` in headless chromium, offline."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return r.stdout, console


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_llama):
    world = write_planted_world(tmp_path_factory.mktemp("dash"), tiny_llama)
    path = world.root / "params.yaml"
    write_params(path, default_params(model={"name": str(tiny_llama)}, extract={"hooks": [world.hook]},
                                      interpret={"encode_dtype": "float32"}))
    run_interpret(load_params(path), world.root)
    return world, world.root / "reports" / "features"


def test_console_errors_are_caught(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, console = browse(page.as_uri(), tmp_path / "profile")
    assert any("Uncaught ReferenceError" in c for c in console)  # so an empty list below means something


def test_index_lists_features(dashboard, tmp_path):
    world, root = dashboard
    dom, console = browse((root / world.hook / "index.html").as_uri(), tmp_path / "profile")
    assert console == []
    rows = re.findall(r'<tr class="row" data-feature="(\d+)"', dom)
    assert sorted(map(int, rows)) == list(range(world.d_sae))
    assert 'id="search"' in dom
    top, console = browse((root / "index.html").as_uri(), tmp_path / "profile2")
    assert console == [] and world.hook in top


def test_feature_view_highlights_tokens(dashboard, tmp_path):
    world, root = dashboard
    dom, console = browse((root / world.hook / "index.html").as_uri() + f"#f={TOKEN_FEATURE}", tmp_path / "profile")
    assert console == []
    assert f'id="feature-title">Feature {TOKEN_FEATURE}<' in dom
    assert len(re.findall(r'class="tok hl"', dom)) >= 8  # one highlighted token per top example at least
    assert "Logit lens" in dom and "Topic alignment" in dom and "fires on" in dom


def _index_rows(dom: str) -> list[list[str]]:
    """The index table's visible cells, row by row, in the order shown."""
    body = dom[dom.index('<tr class="row"'):]
    return [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in re.findall(r'<tr class="row"[^>]*>(.*?)</tr>', body)]


def test_first_screen_opens_on_the_interpretability_ranking(dashboard, tmp_path):
    import polars as pl

    from pipeline.feature_ranking import MIN_SUPPORT

    world, root = dashboard
    dom, console = browse((root / world.hook / "index.html").as_uri(), tmp_path / "profile")
    assert console == []
    head = re.findall(r'<th data-col="(\w+)"', dom)
    assert head[:3] == ["feature", "rank", "fires"] and "tier" not in head and "why" not in head  # hidden columns
    rows = _index_rows(dom)
    assert [int(r[1]) for r in rows] == list(range(1, len(rows) + 1))  # opens sorted by rank
    feats = pl.read_parquet(world.root / "data" / "interpret" / world.hook / "features.parquet")
    fire = dict(zip(feats["feature"].to_list(), feats["fire_count"].to_list(), strict=True))
    assert fire[int(rows[0][0])] >= MIN_SUPPORT and int(rows[0][2]) == fire[int(rows[0][0])]
    assert rows[0][5] != ""  # the first row has a detection score
    # The rows without enough support come after every supported one.
    supported = [fire[int(r[0])] >= MIN_SUPPORT for r in rows]
    assert supported == sorted(supported, reverse=True)
    # A blank detection cell says why instead.
    for r in rows:
        if fire[int(r[0])] == 0:
            assert r[5] == "dead: never fired"
    assert "ranked by interpretability" in dom
    # The topic AUROC comes with its 95% interval where the feature fired.
    assert any(re.fullmatch(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", r[8]) for r in rows)
    # Example tokens: distinct, in order, repeats counted.
    for r in rows:
        toks = r[9].split("  ") if r[9] else []
        assert len(toks) == len({t.split(" \u00d7")[0] for t in toks}), r[9]
    assert any(" \u00d7" in r[9] for r in rows)  # the planted token feature fires on one token in every example


def test_feature_view_has_histogram_ticks_and_visible_spaces(dashboard, tmp_path):
    world, root = dashboard
    dom, console = browse((root / world.hook / "index.html").as_uri() + f"#f={TOKEN_FEATURE}", tmp_path / "profile")
    assert console == []
    assert len(re.findall(r'class="tick"', dom)) >= 5 and ">1e0</text>" in dom and "log scale" in dom
    assert "rank " in dom and "detection balanced accuracy" in dom
    lens = dom[dom.index("Logit lens"):dom.index("Nearest")]
    cells = re.findall(r"<tr><td>([^<]*)</td><td>-?\d", lens)
    assert cells and not any(c.startswith(" ") for c in cells)  # a leading space is drawn as U+2423
    import polars as pl

    feats = pl.read_parquet(world.root / "data" / "interpret" / world.hook / "features.parquet")
    lens_tokens = feats.filter(pl.col("feature") == TOKEN_FEATURE)["top_tokens"][0].to_list()
    spaced = [t for t in lens_tokens if t.startswith(" ")]
    assert len([c for c in cells if c.startswith("\u2423")]) >= len(spaced) > 0


PROBE = """<script>
// What a reader sees on the first screen: every probed element's text and whether its top is inside the viewport.
const out = [...document.querySelectorAll("%s")].map(e => [e.textContent.trim().slice(0, 80),
  e.getBoundingClientRect().top < window.innerHeight]);
const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def first_screen(page: Path, selector: str, profile: Path) -> list[tuple[str, bool]]:
    """(text, on the first screen of a 1280x800 window) of each ``selector`` match of ``page``, in page order."""
    import html
    import json

    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE % selector + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
           "--window-size=1280,800", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stdout[-2000:]
    return [tuple(x) for x in json.loads(html.unescape(found.group(1)))]


def test_dashboard_first_screen_shows_supported_latents(dashboard, tmp_path):
    import polars as pl

    from pipeline.feature_ranking import MIN_SUPPORT

    world, root = dashboard
    rows = first_screen(root / world.hook / "index.html", "tr.row td:nth-child(3)", tmp_path / "p")
    visible = [int(text) for text, on_screen in rows if on_screen]
    assert len(visible) >= 5  # the table starts on the first screen
    feats = pl.read_parquet(world.root / "data" / "interpret" / world.hook / "features.parquet")
    supported = int((feats["fire_count"] >= MIN_SUPPORT).sum())
    assert all(v >= MIN_SUPPORT for v in visible[:supported])  # "fires on" of the first rows shown


def test_report_first_screen_leads_with_results(tmp_path):
    from tracking_fixtures import HOOK, fabricate_workspace

    from pipeline.report import build_document, gather, write_report

    ws = fabricate_workspace(tmp_path / "ws")
    write_report(build_document(gather(ws, {}, [HOOK], top_n=5), top_n=5), ws / "reports")
    heads = first_screen(ws / "reports" / "summary.html", "h2, summary", tmp_path / "p")
    on_screen = [text for text, seen in heads if seen]
    assert on_screen[:4] == ["Results", "l0", "fvu", "ce_loss_recovered"]  # headline names, definitions folded
    assert "Configuration" in [t for t, _ in heads] and "Configuration" not in on_screen
    assert [t for t, _ in heads].index("Configuration") > [t for t, _ in heads].index("Top features")
