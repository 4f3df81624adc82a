"""The web console's cost: page weight, time from load to the first result, and the search hot path
with and without the console mounted.

    python bench/ui_bench.py [--runs 5] [--requests 2000] [--work /tmp/avsearch-ui-bench]

Setup (cached in --work): the ``tiny`` preset trained on its synthetic set (600 clips), exported and
indexed, items annotated with metadata as in tests/service/test_ui.py. Then:

* page weight: the bytes of every static asset of /ui/ (as served, uncompressed), and the JSON the
  page fetches at start (the map's sample dominates: it scales with min(N, 2000) per modality);
* time to first result, in headless Debian Chromium against ``python -m service serve``: navigation
  start to the console being ready (every panel loaded, map drawn), and search submit to the result
  table drawn, both read from ``performance.now()`` in the page, median of --runs fresh loads;
* hot path: search requests (audio id → 10 visual hits) through the full ASGI stack in process
  (httpx ASGITransport: middleware, routing, batcher, index; no network), on the app as built and on
  the same app with the console's routes and mount removed, interleaved rounds, median per request.

Writes bench/results/ui_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.service.browser import annotated_index, chromium_driver, serving  # noqa: E402

RESULTS = REPO / "bench" / "results"


def prepare(work: Path) -> tuple[Path, Path]:
    """Model and annotated index of the tiny preset (cached)."""
    model, index = work / "model", work / "index-meta"
    if not (index / "visual" / "info.json").is_file():
        from index.build import build_indexes
        from training.config import load_config
        from avdata.features import load_features, save_directory
        from training.export import export_run
        from avdata.synthetic import generate
        from training.train import CHECKPOINT_NAME, save_checkpoint, train

        cfg = load_config("tiny")
        data_dir = save_directory(generate(cfg.synthetic), work / "data")
        data = load_features(data_dir)
        save_checkpoint(work / "run" / CHECKPOINT_NAME, cfg, data, train(cfg, data, show_progress=False))
        export_run(work / "run", model)
        build_indexes(model, data_dir, work / "index", progress=False)
        annotated_index(work / "index", data_dir, index)
    return model, index


def page_weight(url: str) -> dict:
    html = urllib.request.urlopen(url + "/ui/").read()
    assets = {"index.html": len(html)}
    for name in re.findall(rb'(?:src|href)="([^"#:]+)"', html):
        assets[name.decode()] = len(urllib.request.urlopen(f"{url}/ui/{name.decode()}").read())
    data = {path: len(urllib.request.urlopen(url + path).read()) for path in ("/v1/access", "/v1/info", "/v1/indexes", "/v1/map", "/v1/stats", "/v1/report")}
    return {"static_bytes": sum(assets.values()), "static": assets, "startup_json_bytes": sum(data.values()), "startup_json": data}


def browser_timings(url: str, runs: int) -> dict:
    driver = chromium_driver()
    ready, search, first = [], [], []
    try:
        for _ in range(runs):
            driver.get("about:blank")
            driver.get(url + "/ui/")
            deadline = time.monotonic() + 60
            while driver.execute_script("return document.body.dataset.ready") != "true":
                if time.monotonic() > deadline:
                    raise RuntimeError("the console did not get ready within 60 s")
                time.sleep(0.005)
            ready_ms = driver.execute_script("return performance.now()")  # since navigation start
            # Submit at once and wait in the page for the table: no WebDriver round trip inside the timing.
            timing = driver.execute_async_script(
                """const done = arguments[arguments.length - 1];
                document.getElementById('query-id').value = 'clip-000003';
                const start = performance.now();
                const body = document.getElementById('results-body');
                new MutationObserver((_, observer) => { if (body.rows.length) { observer.disconnect(); done([start, performance.now()]); } })
                  .observe(body, {childList: true});
                document.getElementById('search-button').click();"""
            )
            ready.append(ready_ms)
            search.append(timing[1] - timing[0])
            first.append(ready_ms + timing[1] - timing[0])
    finally:
        driver.quit()
    return {
        "runs": runs,
        "load_to_ready_ms": statistics.median(ready),
        "submit_to_results_ms": statistics.median(search),
        "load_to_first_result_ms": statistics.median(first),
        "all_load_to_ready_ms": ready,
        "all_submit_to_results_ms": search,
    }


def without_console(app):
    """The same app with the console's routes and the /ui mount removed."""
    from service.routers import console

    # FastAPI >= 0.16x wraps each included router (``original_router``); older versions copy its routes.
    ours = {(r.path, frozenset(r.methods)) for r in console.router.routes}
    kept = []
    for route in app.router.routes:
        key = (getattr(route, "path", None), frozenset(getattr(route, "methods", None) or ()))
        if getattr(route, "original_router", None) is console.router or key in ours or key[0] in ("/ui", "/"):
            continue
        kept.append(route)
    if len(kept) != len(app.router.routes) - 3 and len(kept) != len(app.router.routes) - 2 - len(console.router.routes):
        raise RuntimeError("the console's routes were not all found; the A/B would compare two apps with the console")
    app.router.routes = kept
    return app


async def hot_path(model: Path, index: Path, requests: int, rounds: int) -> dict:
    import httpx

    from service.app import create_app
    from store.collection import Collection
    from service.settings import Settings

    settings = Settings(model_dir=model, index_dir=index)
    # One collection per app (a lifespan's end closes its collection), both apps started once for all rounds.
    load = lambda: Collection.load(model, index, device="cpu", intra_op_threads=1)  # noqa: E731
    apps = {"with_console": create_app(settings, load()), "without_console": without_console(create_app(settings, load()))}
    body = json.dumps({"modality": "audio", "ids": ["clip-000003"], "top_k": 10}).encode()
    per_request: dict[str, list[float]] = {name: [] for name in apps}
    async with contextlib.AsyncExitStack() as running:
        clients = {}
        for name, app in apps.items():
            await running.enter_async_context(app.router.lifespan_context(app))
            clients[name] = await running.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost"))
        for round_number in range(rounds):
            order = list(clients.items()) if round_number % 2 == 0 else list(clients.items())[::-1]  # neither always runs first
            for name, client in order:
                for _ in range(50):  # warm-up
                    await client.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
                start = time.perf_counter()
                for _ in range(requests // rounds):
                    answer = await client.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
                    assert answer.status_code == 200, (answer.status_code, answer.text[:300])
                per_request[name].append((time.perf_counter() - start) / (requests // rounds) * 1e6)
    median = {name: statistics.median(v) for name, v in per_request.items()}
    return {
        "requests": requests,
        "rounds": rounds,
        "median_us_per_search": median,
        "rounds_us_per_search": per_request,
        "with_over_without": median["with_console"] / median["without_console"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="searches per app for the hot-path A/B")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-ui-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, index = prepare(args.work)
    with serving(model, index) as url:
        weight = page_weight(url)
        timings = browser_timings(url, args.runs)
    hot = asyncio.run(hot_path(model, index, args.requests, args.rounds))
    results = {"items_per_modality": 600, "page_weight": weight, "browser": timings, "hot_path": hot}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ui_bench.json").write_text(json.dumps(results, indent=1))
    print(f"page weight: {weight['static_bytes']} bytes of static assets {weight['static']}; {weight['startup_json_bytes']} bytes of JSON at start")
    print(f"load to ready {timings['load_to_ready_ms']:.0f} ms, submit to results {timings['submit_to_results_ms']:.1f} ms, load to first result {timings['load_to_first_result_ms']:.0f} ms (median of {args.runs})")
    m = hot["median_us_per_search"]
    print(f"search hot path (in-process ASGI): {m['with_console']:.0f} us with the console, {m['without_console']:.0f} us without ({hot['with_over_without']:.3f}x)")


if __name__ == "__main__":
    main()
