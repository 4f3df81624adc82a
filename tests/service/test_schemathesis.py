"""Property-based fuzzing of every operation in the OpenAPI spec: no input makes the server answer 5xx.

A small version of ``bench/fuzz.py`` (10^4 requests against a real server): every route, console and
admin included, with and without keys, in-process.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
from store.collection import Collection
from service.settings import Settings
from tests.service.conftest import copy_index

# schemathesis's in-process client names itself "testserver" and comes from "testclient" (not an
# address): the Host allow-list names it, and anonymous writes are allowed, so writes are reached.
KEYS = {"rw": "Bearer fuzz-rw", "ro": "Bearer fuzz-ro", "none": None}


def _schema(tiny, tmp_path_factory, **overrides):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("fuzz") / "index")
    config = Settings(model_dir=tiny.model_dir, index_dir=index_dir, max_vectors=16, allowed_hosts="testserver", **overrides)
    app = create_app(config, Collection.load(config.model_dir, config.index_dir, device="cpu"))
    return schemathesis.openapi.from_asgi("/openapi.json", app), app


@pytest.fixture(scope="module")
def open_api(tiny, tmp_path_factory):
    return _schema(tiny, tmp_path_factory, allow_anonymous_writes=True)


@pytest.fixture(scope="module")
def keyed_api(tiny, tmp_path_factory):
    return _schema(tiny, tmp_path_factory, api_key="fuzz-rw", read_api_key="fuzz-ro")


def _wait_ready(schema) -> None:
    """schemathesis ends the app's lifespan after each test (closing its version); the next request
    starts it again, and the version loads again in the background."""
    readyz = schema["/readyz"]["GET"]
    deadline = time.monotonic() + 60
    while readyz.Case().call().status_code != 200:
        assert time.monotonic() < deadline, "not ready after 60 s"
        time.sleep(0.05)


def _fuzz(schema, examples: int, header: str | None) -> int:
    _wait_ready(schema)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route is fuzzed, the console's and the admin's included
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(headers={"Authorization": header} if header else None, checks=[not_a_server_error])

        run()
    return calls


def test_the_schema_states_each_modalitys_width_and_the_limits(open_api):
    schema, app = open_api
    components = app.openapi()["components"]["schemas"]
    variants = components["SearchRequest"]["anyOf"]
    widths = {v["properties"]["modality"]["enum"][0]: v["properties"]["vectors"]["items"]["maxItems"] for v in variants if "vectors" in v["properties"]}
    assert widths == {"audio": 128, "visual": 1024}
    assert sorted(v["required"] for v in variants) == [["ids", "modality"]] * 2 + [["modality", "vectors"]] * 2  # exactly one of them
    assert all(v["properties"]["top_k"]["maximum"] == 1000 for v in variants)
    assert [v["minItems"] for v in components["ItemIn"]["properties"]["vector"]["anyOf"]] == [128, 1024]
    assert components["UpsertRequest"]["properties"]["items"]["maxItems"] == 16


def test_no_input_makes_a_server_error(open_api):
    """Each operation gets generated requests (valid and invalid); each answer must be below 500."""
    schema, app = open_api
    assert _fuzz(schema, 60, None) > 500
    assert app.state.avsearch.collection.sizes()["audio"] >= 600  # still serving


@pytest.mark.parametrize("key", KEYS)
def test_no_input_makes_a_server_error_with_keys(keyed_api, key):
    schema, _ = keyed_api
    assert _fuzz(schema, 20, KEYS[key]) > 200
