"""The HTML report: self-contained, every section present, images labelled by their file
names, and it renders in headless Chromium (Debian's `chromium`, installed by the README's
test command) without console errors, with every image loaded, the gallery re-sortable and
every Chinese character drawn with a real glyph (no tofu: a CJK font is installed)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from mmcn.data.eval_files import read_caption_scores
from mmcn.data.manifest import manifest_path, read_manifest
from mmcn.eval.report import ReportConfig, build_report, image_names

CHROMIUM = os.environ.get("MMCN_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(chain_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "index.html"
    counts = build_report(out, chain_project / "lmdb/test", chain_project / "reports/caption",
                          chain_project / "reports/retrieval",
                          {t: chain_project / f"metrics/{t}.json" for t in ("caption", "retrieval", "absent")},
                          sorted((chain_project / "plots").glob("*.csv")), ReportConfig(max_images=10, queries=4),
                          image_names(manifest_path(chain_project / "tsv", "test")))
    assert counts["caption_images"] == 10 and counts["retrieval_queries"] == 4
    return out


def test_the_report_is_self_contained_and_complete(report, chain_project):
    page = report.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no network assets
    assert page.count('class="card"') == 10 and page.count('class="query"') == 4
    assert page.count('<img class="curve"') == 4  # train/valid curves of both tasks
    assert "<rect " in page and "CIDEr" in page and 'class="tags"' in page
    rows = sorted(read_caption_scores(chain_project / "reports/caption/per_image.jsonl"), key=lambda r: r["CIDEr"])
    cards = re.findall(r'data-cider="([^"]+)"', page)
    assert [float(c) for c in cards] == [r["CIDEr"] for r in rows[:10]]  # worst first
    assert rows[0]["caption"] in page and rows[0]["references"][0] in page
    metrics = json.loads((chain_project / "metrics/retrieval.json").read_text())
    assert f"{metrics['mean_recall']:.4g}" in page
    # each card and each retrieval thumbnail names its file (the raw layout's path under images/)
    sources = {e.image_id: e.source for e in read_manifest(chain_project / "tsv/test_manifest.jsonl")}
    files = re.findall(r'data-id="(\d+)">.*?<p class="file">([^<]+)</p>', page)
    assert len(files) == 10 and all(name == sources[int(i)] and name.endswith(".jpg") for i, name in files)
    assert len(re.findall(r'<span class="file">[^<]+\.jpg</span>', page)) == 4 * 5


def launch(p, **options):
    """Debian's chromium under Playwright."""
    return p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   "--disable-component-update", "--disable-sync", "--no-first-run"], **options)


# Each distinct CJK character of the page drawn alone on a canvas in the captions' font, as
# a hash of its pixels, and two code points no font has (a private-use one and an unassigned
# one), which Chromium draws as the missing-glyph box ("tofu"). A character drawn like them,
# or like another character, has no glyph in any installed font.
GLYPHS = """() => {
  const chars = Array.from(new Set(Array.from(document.body.innerText).filter(c => /[\u4e00-\u9fff]/.test(c))));
  const canvas = document.createElement('canvas'); canvas.width = canvas.height = 48;
  const g = canvas.getContext('2d');
  const family = getComputedStyle(document.querySelector('.pred')).fontFamily;
  const draw = ch => {
    g.clearRect(0, 0, 48, 48); g.font = '36px ' + family; g.fillText(ch, 4, 38);
    const d = g.getImageData(0, 0, 48, 48).data; let h = 0, ink = 0;
    for (let i = 3; i < d.length; i += 4) { h = (Math.imul(h, 31) + d[i]) | 0; ink += d[i] > 0; }
    return h + ':' + ink;
  };
  return {chars: chars, shots: chars.map(draw), missing: ['\ue000', '\u0378'].map(draw)};
}"""


def tofu(page) -> list[str]:
    """The page's Chinese characters that render as the missing-glyph box."""
    got = page.evaluate(GLYPHS)
    assert len(got["chars"]) >= 20  # the captions, references and tags of the demo test split
    boxes = set(got["missing"])
    seen: dict[str, str] = {}
    bad = []
    for char, shot in zip(got["chars"], got["shots"]):
        if shot in boxes or shot in seen or shot.endswith(":0"):
            bad.append(char)
        seen[shot] = char
    return bad


def test_the_report_renders_in_headless_chromium(report):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        if os.environ.get("MMCN_SKIP_BROWSER"):
            pytest.skip("MMCN_SKIP_BROWSER is set")
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as the README's "
                    "test command does, or set MMCN_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(report.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, "
                               "i.getBoundingClientRect().width])")
        assert len(images) == 10 + 4 * 5 + 4 and all(ok and width > 0 for ok, width in images)
        assert page.locator("#gallery svg rect").count() > 0 and page.locator("#gallery .card").first.is_visible()
        first = page.locator("#gallery .card").first.get_attribute("data-cider")
        page.select_option("#sort", "cider-desc")
        ciders = [float(c) for c in page.eval_on_selector_all("#gallery .card", "cs => cs.map(c => c.dataset.cider)")]
        assert ciders == sorted(ciders, reverse=True) and float(first) == min(ciders)
        missing = tofu(page)
        assert not missing, (f"Chinese drawn as empty boxes (no CJK font: apt-get install fonts-noto-cjk, as the "
                             f"README's test command does): {''.join(missing)}")
        browser.close()
    assert problems == []


def test_the_tofu_check_catches_a_missing_cjk_font(report, tmp_path):
    """The same page with a font configuration of Latin fonts only: every Chinese character is tofu."""
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip("no chromium (test_the_report_renders_in_headless_chromium says what to install)")
    latin = Path("/usr/share/fonts/truetype/dejavu")
    if not latin.is_dir():
        pytest.skip(f"{latin} missing: no Latin-only font set to run with")
    conf = tmp_path / "fonts.conf"
    conf.write_text(f'<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig><dir>{latin}</dir>'
                    f'<cachedir>{tmp_path / "cache"}</cachedir></fontconfig>')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, env={**os.environ, "FONTCONFIG_FILE": str(conf), "HOME": str(tmp_path)})
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri(), wait_until="load")
        chars = page.evaluate(GLYPHS)["chars"]
        missing = tofu(page)
        browser.close()
    assert missing and len(missing) >= len(chars) - 1  # all but at most one (the first of equal boxes) flagged


def test_missing_inputs_are_reported_not_silently_dropped(chain_project, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mmcn.eval.report"):
        counts = build_report(tmp_path / "index.html", chain_project / "lmdb/test", chain_project / "reports/caption",
                              tmp_path / "no-retrieval", {"absent": tmp_path / "absent.json"}, [tmp_path / "none.csv"])
    assert "retrieval_queries" not in counts and counts["caption_images"] == 12
    for missing in ("absent.json", "none.csv", "t2i_predictions.jsonl"):
        assert missing in caplog.text


def test_dvc_plots_show_works_offline(tmp_path):
    """The repository's DVC config names an HTML template with Vega inlined (.dvc/plots_template.html):
    `dvc plots show` writes a page that loads nothing from the network and draws every plot in
    Chromium with every request refused."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for name in ("config", "plots_template.html"):
        shutil.copy(root / ".dvc" / name, repo / ".dvc" / name)
    (repo / "loss.csv").write_text("step,loss\n" + "".join(f"{k},{1 / (k + 1):.4f}\n" for k in range(20)))
    (repo / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (repo / "out/index.html").read_text(encoding="utf-8")
    assert not re.search(r'<script[^>]+src=', page) and "cdn.jsdelivr" not in page  # Vega inline, no CDN
    assert page.count("vegaEmbed('#") == 1
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip("no chromium (test_the_report_renders_in_headless_chromium says what to install)")
    from playwright.sync_api import sync_playwright

    problems, requests = [], []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                   else (requests.append(route.request.url), route.abort()))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto((repo / "out/index.html").as_uri(), wait_until="load")
        page.wait_for_selector("div[id] canvas, div[id] svg", timeout=20_000)  # vega-embed drew the plot
        browser.close()
    assert problems == [] and requests == []
