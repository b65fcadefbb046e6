"""Schemathesis against the service's own /openapi.json: no 5xx, responses match the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="session")
def api_schema(service):
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case):
    case.call_and_validate()
