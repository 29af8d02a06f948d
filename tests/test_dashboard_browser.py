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
