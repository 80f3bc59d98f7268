"""Fixtures for the search tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg_server import MISSING_MESSAGE, find_bin_dir, start_postgres


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of a throwaway PostgreSQL server, shared by the whole session.

    Skips when PostgreSQL's server binaries are missing, unless
    ``SOUP_REQUIRE_POSTGRES=1`` is set (CI), in which case the test fails.
    """
    if find_bin_dir() is None:
        if os.environ.get("SOUP_REQUIRE_POSTGRES") == "1":
            pytest.fail(MISSING_MESSAGE, pytrace=False)
        pytest.skip(MISSING_MESSAGE)
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server.url
    finally:
        server.stop()
