"""Schemathesis against the service's own /openapi.json: no 5xx, responses match the schema;
and real error answers against the schemas the document gives them.

Runs the schemathesis CLI against the session's real server (its pytest plugin does not support
the pytest version used here).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema

from tests import images
from tests.test_errors import MODEL, post


def test_openapi_contract(service, tmp_path: Path):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    r = subprocess.run(
        # Every check but positive_data_acceptance: the schema can say "binary" but not "an image",
        # nor "names from the catalog", so schema-valid random bytes rightly get a 400 or 404.
        # /v2 (the Open Inference Protocol) has its own runs in tests/test_oip.py: schemathesis
        # would load and unload models there, and a catalog model that is not loaded is a 503.
        [st, "run", f"{service.url}/openapi.json", "--exclude-path-regex", "^/v2",
         "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--max-examples", "40",
         "--workers", "2", "--request-timeout", "60", "--report", "junit",
         "--report-dir", str(tmp_path), "--no-color"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in r.stdout.lower()


def test_error_answers_match_the_schemas_the_openapi_documents(client):
    """Every error status the OpenAPI documents for the app's own routes carries its body's
    schema (a generated client can read the message), and real error answers validate against
    the schema documented for their route and status: string details, and FastAPI's list of
    field errors for a 422."""
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path.startswith("/v2"):
            continue  # the protocol's own error form, tested in tests/test_oip.py
        for method, op in ops.items():
            for status, doc in op["responses"].items():
                if int(status) >= 400:
                    assert "schema" in doc.get("content", {}).get("application/json", {}), (
                        path, method, status)  # fmt: skip

    def check(r: httpx.Response, path: str, method: str = "post") -> None:
        doc = spec["paths"][path][method]["responses"].get(str(r.status_code))
        assert doc is not None, (path, r.status_code, "not documented")
        schema = {**doc["content"]["application/json"]["schema"], "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(r.json())

    png = images.encode(images.photo(), "PNG")
    answers = [
        (post(client, b""), "/classify", 400),
        (post(client, png, model="no-such-model"), "/classify", 404),
        (client.post("/classify", json={"file": "x"}), "/classify", 415),
        (client.post("/classify", files={"other": ("x.png", png)}), "/classify", 422),
        (post(client, png, model=MODEL, top_k="many"), "/classify", 422),  # FastAPI's list
        (post(client, png, path="/compare", models="tiny3,nope"), "/compare", 404),
        (post(client, png, path="/explain", model=MODEL, method="lime"), "/explain", 422),
        (client.get("/models/no-such-model"), "/models/{name}", 404),
    ]
    for r, path, status in answers:
        assert r.status_code == status, (path, r.status_code, r.text)
        check(r, path, "get" if path.startswith("/models") else "post")
    # both forms of 422 were checked: FastAPI's field errors and the route's own message
    assert isinstance(answers[4][0].json()["detail"], list)
    assert isinstance(answers[6][0].json()["detail"], str)
