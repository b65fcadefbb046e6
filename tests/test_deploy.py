"""Static checks of the container files (no Docker engine runs here): hadolint on the Dockerfile,
the Compose Specification's JSON schema on docker-compose.yml, and the settings they rely on."""

from __future__ import annotations

import json
import shutil
import subprocess

import jsonschema
import yaml

from tests.conftest import COMPOSE_SCHEMA, ROOT, needs_shared


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda:" in text and "ARG VARIANT=cuda" in text  # CUDA base, CPU by build arg
    assert "USER 10001" in text  # non-root
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert 'VOLUME ["/app/weights"]' in text and "BAKE_MODELS" in text
    assert text.count("FROM ") >= 4  # multi-stage


@needs_shared(COMPOSE_SCHEMA)
def test_compose_file_matches_the_compose_spec():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.validate(doc, schema)
    api = doc["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == "all"
    assert "weights:/app/weights" in api["volumes"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert doc["services"]["locust"]["profiles"] == ["loadtest"]
    assert doc["services"]["prometheus"]["profiles"] == ["monitoring"]
    assert (ROOT / "deploy" / "prometheus.yml").is_file()


def test_compose_environment_names_real_settings():
    from app.settings import Settings

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    fields = {f"IMGCLS_{name.upper()}" for name in Settings.model_fields}
    for key in doc["services"]["api"]["environment"]:
        if key.startswith("IMGCLS_"):
            assert key in fields, f"{key} is not a setting"


def test_prometheus_sends_the_api_key_from_the_file_compose_mounts():
    """With IMGCLS_API_KEY set, /metrics needs the key: Prometheus reads it from a credentials
    file, and compose mounts the same key (the api's IMGCLS_API_KEY) there as a secret."""
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "imgcls"]
    auth = job["authorization"]
    assert auth["type"].lower() == "bearer" and "credentials" not in auth
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    secrets = doc["services"]["prometheus"]["secrets"]
    names = [s if isinstance(s, str) else s["source"] for s in secrets]
    targets = {
        f"/run/secrets/{s}"
        if isinstance(s, str)
        else s.get("target", f"/run/secrets/{s['source']}")
        for s in secrets
    }
    assert auth["credentials_file"] in targets
    (name,) = names
    assert doc["secrets"][name] == {"environment": "IMGCLS_API_KEY"}
    assert doc["services"]["api"]["environment"]["IMGCLS_API_KEY"] == "${IMGCLS_API_KEY:-}"
