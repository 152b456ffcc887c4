"""Property-based fuzzing of the OpenAPI schema: no input may cause a server error.

Schemathesis generates requests from the app's own OpenAPI document, valid and
invalid, for every operation, with auth on and a real key; any 5xx fails, and
every 4xx must carry the JSON error shape.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

import migrations
from api.app import create_app
from core import keys
from core.db import session_scope
from core.settings import Settings
from tests.conftest import RecordingQueue


def _app_and_key() -> tuple[object, str]:
    # Built at import: schemathesis reads the schema when the module is collected.
    tmp = Path(tempfile.mkdtemp(prefix="genq-fuzz-"))
    url = f"sqlite:///{tmp / 'genq.db'}"
    migrations.upgrade(url)
    with session_scope(url) as session:
        _, secret = keys.create_key(session, name="fuzzer")
    settings_ = Settings(data_dir=tmp, database_url=url, model="fake")
    return create_app(settings_, queue=RecordingQueue()), secret


APP, SECRET = _app_and_key()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_causes_a_server_error(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {SECRET}"})
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"code", "message", "param"}, body
