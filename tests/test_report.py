"""The HTML report: self-contained, every section present, and it renders in headless
Chromium (Debian's `chromium`, installed by the README's test command) without console
errors, with every image loaded and the gallery re-sortable."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from mmcn.data.eval_files import read_caption_scores
from mmcn.eval.report import ReportConfig, build_report

CHROMIUM = os.environ.get("MMCN_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(chain_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "index.html"
    counts = build_report(out, chain_project / "lmdb/test", chain_project / "reports/caption",
                          chain_project / "reports/retrieval",
                          {t: chain_project / f"metrics/{t}.json" for t in ("caption", "retrieval", "absent")},
                          sorted((chain_project / "plots").glob("*.csv")), ReportConfig(max_images=10, queries=4))
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


def test_the_report_renders_in_headless_chromium(report):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        if os.environ.get("MMCN_SKIP_BROWSER"):
            pytest.skip("MMCN_SKIP_BROWSER is set")
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as the README's "
                    "test command does, or set MMCN_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
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
        browser.close()
    assert problems == []


def test_missing_inputs_are_reported_not_silently_dropped(chain_project, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mmcn.eval.report"):
        counts = build_report(tmp_path / "index.html", chain_project / "lmdb/test", chain_project / "reports/caption",
                              tmp_path / "no-retrieval", {"absent": tmp_path / "absent.json"}, [tmp_path / "none.csv"])
    assert "retrieval_queries" not in counts and counts["caption_images"] == 12
    for missing in ("absent.json", "none.csv", "t2i_predictions.jsonl"):
        assert missing in caplog.text
