"""index.html in headless Chromium: sort by a column, filter by text and decision, move with the keyboard;
NOT ASSESSED rows and failed studies stay visible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medhybrid.infer.render import index_html
from tests.test_viewer import driver, severe  # noqa: F401 - the module's Chromium fixture

ROWS = [
    ("s_high", "0.910", "abnormal", "2.10"),
    ("s_mid", "0.620", "abnormal", "0.40"),
    ("s_low", "0.050", "normal", ""),
    ("s_mr", "", "not_assessed", ""),
]


def worklist(tmp_path: Path) -> Path:
    rows = [
        {
            "study_key": k,
            "probability": p,
            "decision": d,
            "lesion_ml": ml,
            "qc_verdict": "ok",
            "source": f"DICOM CT · {k}",
            "thumbnail": "",
        }
        for k, p, d, ml in ROWS
    ]
    failed = [{"study_key": "broken", "source": "x.dcm", "error": "invalid_dicom", "reason": "truncated"}]
    path = tmp_path / "index.html"
    path.write_bytes(index_html(rows, failed, {"model": "demo", "threshold": 0.5, "input": "in"}))
    for k, *_ in ROWS:
        (tmp_path / k).mkdir()
        (tmp_path / k / "report.html").write_text(f"<title>{k}</title>")
    return path


def order(driver: Any) -> list[str]:  # noqa: F811
    return [
        r.find_elements("css selector", "td")[2].text
        for r in driver.find_elements("css selector", "#worklist tbody tr")
        if r.is_displayed()
    ]


def selected(driver: Any) -> str:  # noqa: F811
    row = driver.find_element("css selector", "#worklist tbody tr.sel")
    return str(row.find_elements("css selector", "td")[2].text)


def test_worklist_sorts_filters_and_navigates(driver: Any, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.keys import Keys

    driver.get(worklist(tmp_path).resolve().as_uri())
    assert order(driver) == ["s_high", "s_mid", "s_low", "s_mr"]  # by score; NOT ASSESSED listed, no score
    assert "NOT ASSESSED" in driver.find_element("css selector", "#worklist").text
    assert "truncated" in driver.find_element("tag name", "body").text  # the failed study is on the page
    score = driver.find_elements("css selector", "#worklist thead th")[3]
    score.click()  # descending first
    assert order(driver) == ["s_high", "s_mid", "s_low", "s_mr"]
    score.click()  # ascending: the unscored row first, then by score
    assert order(driver) == ["s_mr", "s_low", "s_mid", "s_high"]
    driver.find_elements("css selector", "#worklist thead th")[2].click()  # by study id, descending
    assert order(driver) == ["s_mr", "s_mid", "s_low", "s_high"]

    box = driver.find_element("id", "filter")
    box.send_keys("mid")
    assert order(driver) == ["s_mid"]
    assert driver.find_element("id", "shown").text == "1 of 4 shown"
    box.send_keys(Keys.ESCAPE)
    assert len(order(driver)) == 4
    driver.execute_script(
        "const s = document.getElementById('decision-filter'); s.value = 'not_assessed';"
        "s.dispatchEvent(new Event('change'));"
    )
    assert order(driver) == ["s_mr"]
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)

    body = driver.find_element("tag name", "body")
    assert selected(driver) == order(driver)[0]
    body.send_keys("j")
    body.send_keys(Keys.ARROW_DOWN)
    assert selected(driver) == order(driver)[2]
    body.send_keys("k")
    assert selected(driver) == order(driver)[1]
    body.send_keys("/")
    assert driver.switch_to.active_element == driver.find_element("id", "filter")
    expected = selected(driver)
    driver.switch_to.active_element.send_keys(Keys.ENTER)  # opens the selected study's report
    assert driver.title == expected
    assert severe(driver) == []
