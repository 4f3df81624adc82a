"""Property-based fuzzing of every operation in the OpenAPI spec: no input makes the server answer 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.engine import Engine
from service.settings import Settings
from tests.service.conftest import copy_index


@pytest.fixture(scope="module")
def api_schema(tiny, tmp_path_factory):
    index_dir = copy_index(tiny, tmp_path_factory.mktemp("fuzz") / "index")
    config = Settings(model_dir=tiny.model_dir, index_dir=index_dir, max_vectors=16)
    app = create_app(config, Engine.load(config.model_dir, config.index_dir, device="cpu"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_input_makes_a_server_error(api_schema):
    """Each operation gets generated requests (valid and invalid); each answer must be below 500."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9  # every route is fuzzed
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        run()
