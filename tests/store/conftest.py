"""Store fixtures: the service's (a private copy of the tiny index, clients over it), shared."""

from tests.service.conftest import features  # noqa: F401 - a fixture, found by pytest through this import
