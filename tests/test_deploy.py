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


def test_the_cuda_image_matches_the_torch_it_installs_and_can_compile():
    """The CUDA base's major version is the one the pinned torch wheel was built for (torch
    brings its own CUDA libraries; the base's NVIDIA_REQUIRE_CUDA makes the container toolkit
    refuse a driver too old for them), and it has Python's headers, which torch.compile's
    inductor and Triton include (without them every compile fails and the models run eager)."""
    import re

    import torch

    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+ AS base-cuda", text)
    assert base, "no nvidia/cuda base"
    if torch.version.cuda:  # this machine's wheel is the registry's default (CUDA) build
        assert base[1] == torch.version.cuda.split(".")[0], (base[0], torch.version.cuda)
    cuda_stage = text.split("AS base-cuda", 1)[1].split("FROM ", 1)[0]
    assert "python3-dev" in cuda_stage


def test_grpc_is_reachable_from_outside_the_container():
    """The gRPC server listens on 127.0.0.1 unless told otherwise: the image binds it to all
    interfaces and exposes its port, and compose publishes it."""
    from app.settings import Settings

    text = (ROOT / "Dockerfile").read_text()
    assert "IMGCLS_GRPC_HOST=0.0.0.0" in text
    grpc_port = Settings.model_fields["grpc_port"].default
    (expose,) = [line for line in text.splitlines() if line.startswith("EXPOSE ")]
    assert str(grpc_port) in expose.split()[1:]
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    port = api["environment"]["IMGCLS_GRPC_PORT"]
    assert api["environment"]["IMGCLS_GRPC_HOST"] == "0.0.0.0"
    assert f"{port}:{port}" in [p.split("#")[0].strip() for p in api["ports"]]


def test_compose_gives_a_stop_the_time_shutdown_takes():
    """On SIGTERM the service gives requests IMGCLS_SHUTDOWN_GRACE_S, then the batches at the
    workers and their exit the same again (README, reliability): Docker must wait longer before
    its SIGKILL."""
    from app.settings import Settings

    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    grace = float(api["environment"].get("IMGCLS_SHUTDOWN_GRACE_S",
                                         Settings.model_fields["shutdown_grace_s"].default))  # fmt: skip
    assert api["stop_grace_period"].endswith("s")
    assert float(api["stop_grace_period"][:-1]) > 2 * grace


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
    # Prometheus's image runs as a non-root user; compose writes a secret 0400 owned by root
    (secret,) = secrets
    assert isinstance(secret, dict) and secret["mode"] & 0o004, "the secret must be world-readable"
    # the load test sends the same key
    locust = doc["services"]["locust"]["environment"]
    assert locust["IMGCLS_API_KEY"] == "${IMGCLS_API_KEY:-}"
