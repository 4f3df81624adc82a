"""The web console in a real browser: Debian's headless Chromium (Selenium, system chromedriver)
against a real ``python -m service serve`` process. A missing browser fails these tests: no skip."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.service.browser import annotated_index, chromium_driver, fetch_json, serving
from avdata.features import load_features

RW_KEY, RO_KEY = "console-rw-key", "console-ro-key"
WAIT_S = 30


@pytest.fixture(scope="module")
def meta_index(tiny, tmp_path_factory):
    return annotated_index(tiny.index_dir, tiny.data_dir, tmp_path_factory.mktemp("ui") / "index")


@pytest.fixture(scope="module")
def server(tiny, meta_index, tmp_path_factory):
    index_dir = shutil.copytree(meta_index, tmp_path_factory.mktemp("ui-open") / "index")
    with serving(tiny.model_dir, index_dir) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tiny, meta_index, tmp_path_factory):
    index_dir = shutil.copytree(meta_index, tmp_path_factory.mktemp("ui-keys") / "index")
    with serving(tiny.model_dir, index_dir, env={"AVSEARCH_API_KEY": RW_KEY, "AVSEARCH_READ_API_KEY": RO_KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def search_api(url: str, body: dict, key: str | None = None) -> list[dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/search", data=json.dumps(body).encode(), headers=headers)
    return json.loads(urllib.request.urlopen(request, timeout=10).read())["results"][0]


def open_console(driver, url: str, clear_key: bool = True) -> None:
    driver.get(url + "/ui/")
    if clear_key:
        driver.execute_script("sessionStorage.clear()")
        driver.get(url + "/ui/")


def wait_ready(driver) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def search_by_id(driver, item_id: str, top_k: int, direction: str = "audio:visual") -> list[str]:
    Select(driver.find_element(By.ID, "direction")).select_by_value(direction)
    driver.find_element(By.ID, "kind-id").click()
    for field, value in (("query-id", item_id), ("top-k", str(top_k))):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "search-button").click()
    return wait_rows(driver, top_k, item_id)


def wait_rows(driver, count: int, mention: str) -> list[str]:
    WebDriverWait(driver, WAIT_S).until(
        lambda d: mention in d.find_element(By.ID, "results-caption").text and len(d.find_elements(By.CSS_SELECTOR, "#results-body tr")) == count
    )
    return [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "#results-body td.id")]


def test_search_by_id_shows_k_ranked_results_with_links_and_curl(browser, server):
    open_console(browser, server)
    wait_ready(browser)
    assert browser.find_element(By.ID, "access-badge").text == "no API keys configured"
    query = browser.find_element(By.ID, "query-id")
    query.send_keys("clip-00002")
    WebDriverWait(browser, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#id-suggestions option")) == 10)
    suggested = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#id-suggestions option")]
    assert suggested == [f"clip-0000{n}" for n in range(20, 30)]

    shown = search_by_id(browser, "clip-000020", 20)
    expected = search_api(server, {"modality": "audio", "ids": ["clip-000020"], "top_k": 20, "target": "visual"})
    assert shown == [hit["id"] for hit in expected]
    assert "20 visual hits for audio item clip-000020" in browser.find_element(By.ID, "results-caption").text
    values = [float(v.text) for v in browser.find_elements(By.CSS_SELECTOR, "#results-body .score .value")]
    np.testing.assert_allclose(values, [hit["score"] for hit in expected], atol=5e-4)
    widths = [f.value_of_css_property("width") for f in browser.find_elements(By.CSS_SELECTOR, "#results-body .fill")]
    assert [float(w.removesuffix("px")) for w in widths] == sorted((float(w.removesuffix("px")) for w in widths), reverse=True)
    youtube = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#results-body a[href*='youtube.com']")]
    with_ids = [h["metadata"] for h in expected if "youtube_id" in h["metadata"]]
    assert youtube == [f"https://www.youtube.com/watch?v={m['youtube_id']}&t={m['start']}s" for m in with_ids] and youtube
    pages = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#results-body a[href^='https://example.org']")]
    assert pages == [h["metadata"]["page"] for h in expected if "page" in h["metadata"]]
    curl = browser.find_element(By.ID, "curl-text").text
    assert curl.startswith(f"curl -s -X POST '{server}/v1/search'") and '"ids":["clip-000020"]' in curl and '"top_k":20' in curl


def test_switching_direction_searches_the_other_way_and_same_modality(browser, server):
    open_console(browser, server)
    wait_ready(browser)
    shown = search_by_id(browser, "clip-000005", 6, direction="visual:audio")
    assert shown == [h["id"] for h in search_api(server, {"modality": "visual", "ids": ["clip-000005"], "top_k": 6})]
    assert "6 audio hits for visual item clip-000005" in browser.find_element(By.ID, "results-caption").text
    assert browser.find_element(By.ID, "query-modality").text == "visual"
    same = search_by_id(browser, "clip-000005", 4, direction="visual:visual")
    assert same[0] == "clip-000005"  # a same-modality search finds the query item first
    assert "4 visual hits" in browser.find_element(By.ID, "results-caption").text


def test_upload_npy_and_json_vectors(browser, server, tiny, tmp_path):
    test_split = load_features(tiny.data_dir).subset("test")
    query = test_split.audio[3].astype(np.float32)
    npy_path, json_path = tmp_path / "query.npy", tmp_path / "query.json"
    np.save(npy_path, query[None, :])
    json_path.write_text(json.dumps(query.tolist()))
    expected = [h["id"] for h in search_api(server, {"modality": "audio", "vectors": [query.tolist()], "top_k": 8})]
    open_console(browser, server)
    wait_ready(browser)
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("8")
    browser.find_element(By.ID, "kind-file").click()
    for path in (npy_path, json_path):
        browser.find_element(By.ID, "query-file").send_keys(str(path))
        WebDriverWait(browser, WAIT_S).until(lambda d: path.name in d.find_element(By.ID, "file-note").text)
        assert "1 vector(s) of 128 values" in browser.find_element(By.ID, "file-note").text
        browser.find_element(By.ID, "search-button").click()
        assert wait_rows(browser, 8, path.name) == expected
        curl = browser.find_element(By.ID, "curl-text").text
        assert ("application/x-npy" in curl and "--data-binary @'query.npy'" in curl) if path.suffix == ".npy" else '"vectors":[[' in curl
    assert browser.find_element(By.ID, "add-item-form").is_displayed()  # open service: writes allowed


def test_map_draws_both_modalities_highlights_hits_and_searches_on_click(browser, server):
    open_console(browser, server)
    wait_ready(browser)
    canvas = browser.find_element(By.ID, "map")
    assert canvas.get_attribute("data-points") == "1200"  # 600 audio + 600 visual, under the 2000-per-modality bound
    Select(browser.find_element(By.ID, "color-by")).select_by_visible_text("label")
    legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
    assert legend[:5] == ["0", "1", "2", "3", "4"]  # the tiny preset's classes
    search_by_id(browser, "clip-000007", 5)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script("return avsearchConsole.highlight && avsearchConsole.highlight.hits.length") == 5)
    assert browser.execute_script("return avsearchConsole.highlight.query") is not None
    point = browser.execute_script("return avsearchConsole.screenPoints.find(p => p.modality === 'visual')")
    box = browser.execute_script("const b = arguments[0].getBoundingClientRect(); return [b.width, b.height]", canvas)
    x, y = point["x"] * box[0] / 900 - box[0] / 2, point["y"] * box[1] / 460 - box[1] / 2
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, round(x), round(y)).click().perform()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "query-id").get_attribute("value") == point["id"])
    assert Select(browser.find_element(By.ID, "direction")).first_selected_option.get_attribute("value") == "visual:audio"
    wait_rows(browser, 5, point["id"])


def test_model_panel_and_accessibility(browser, server, tiny):
    open_console(browser, server)
    wait_ready(browser)
    manifest = json.loads((tiny.model_dir / "manifest.json").read_text())
    facts = dict(zip((e.text for e in browser.find_elements(By.CSS_SELECTOR, "#manifest dt")), (e.text for e in browser.find_elements(By.CSS_SELECTOR, "#manifest dd"))))
    assert facts["ONNX opset"] == str(manifest["opset"]) and facts["embedding width"] == str(manifest["embedding_dim"])
    assert f"avg {manifest['evaluation']['val']['avg']:.3f}" in facts["mAP, val split"]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in browser.find_elements(By.CSS_SELECTOR, "#index-body tr")]
    assert rows == [["audio", "Flat", "600", str(manifest["embedding_dim"]), "defaults", "cpu"], ["visual", "Flat", "600", str(manifest["embedding_dim"]), "defaults", "cpu"]]
    search_by_id(browser, "clip-000001", 3)
    WebDriverWait(browser, WAIT_S).until(lambda d: "searches since start" in d.find_element(By.ID, "live").text and int(d.execute_script(
        "return [...document.querySelectorAll('#live dt')].find(e => e.textContent === 'searches since start').nextSibling.textContent")) >= 1)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')].filter(e => !e.closest('[hidden]') && e.type !== 'hidden')"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !(e.tagName === 'BUTTON' && e.textContent.trim())).map(e => e.id)"
    )
    assert unlabelled == []
    external = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith(location.origin))")
    assert external == []


def enter_key(driver, key: str) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "key-dialog").is_displayed())
    field = driver.find_element(By.ID, "key-input")
    assert driver.switch_to.active_element == field  # the dialog takes the focus
    field.send_keys(key)
    driver.find_element(By.ID, "key-submit").click()


def test_read_only_key_is_asked_once_and_sees_no_write_controls(browser, keyed_server):
    open_console(browser, keyed_server)
    enter_key(browser, "not-a-key")
    WebDriverWait(browser, WAIT_S).until(lambda d: "not accepted" in d.find_element(By.ID, "key-error").text)
    browser.find_element(By.ID, "key-input").send_keys(RO_KEY)
    browser.find_element(By.ID, "key-submit").click()
    wait_ready(browser)
    assert browser.find_element(By.ID, "access-badge").text == "read-only key"
    shown = search_by_id(browser, "clip-000011", 7)
    assert shown == [h["id"] for h in search_api(keyed_server, {"modality": "audio", "ids": ["clip-000011"], "top_k": 7}, key=RO_KEY)]
    assert browser.find_elements(By.CSS_SELECTOR, ".write-control, #reload, #add-item-form, button.danger") == []
    assert browser.execute_script("return sessionStorage.getItem('avsearch.apiKey')") == RO_KEY
    open_console(browser, keyed_server, clear_key=False)  # a reload in the same session: not asked again
    wait_ready(browser)
    assert not browser.find_element(By.ID, "key-dialog").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "canvas#map").get_attribute("data-points") == "1200"


def test_read_write_key_sees_write_controls_and_deletes(browser, keyed_server):
    open_console(browser, keyed_server)
    enter_key(browser, RW_KEY)
    wait_ready(browser)
    assert browser.find_element(By.ID, "access-badge").text == "read-write key"
    assert browser.find_element(By.ID, "reload").is_displayed()
    shown = search_by_id(browser, "clip-000012", 4)
    deletes = browser.find_elements(By.CSS_SELECTOR, "#results-body button.danger")
    assert len(deletes) == 4
    deletes[-1].click()
    browser.switch_to.alert.accept()
    WebDriverWait(browser, WAIT_S).until(lambda d: f"Deleted visual item {shown[-1]}" in d.find_element(By.ID, "status").text)
    with pytest.raises(urllib.error.HTTPError) as gone:
        fetch_json(f"{keyed_server}/v1/items/visual/{shown[-1]}", key=RW_KEY)
    assert gone.value.code == 404
