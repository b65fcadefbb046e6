"""The command line refuses bad settings and arguments in one line (``imgcls: ...``, exit 2),
before any server starts: no traceback, no server on the wrong port, no worker restarting
forever on a device that is not there."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys

import torch

from app.limits import server_options
from app.settings import Settings
from tests.conftest import ROOT

# A CUDA index past the last visible device: invalid on any machine, with a GPU or without.
MISSING_GPU = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"

# (environment, arguments, what stderr must say)
CASES = {
    "log level": ({"IMGCLS_LOG_LEVEL": "loud"}, ["serve"], "IMGCLS_LOG_LEVEL: Input should be"),
    "infinite upload limit": ({"IMGCLS_MAX_UPLOAD_MB": "inf"}, ["serve"], "finite number"),
    "infinite grace": ({"IMGCLS_SHUTDOWN_GRACE_S": "inf"}, ["serve"], "finite number"),
    "infinite in-flight": ({"IMGCLS_MAX_INFLIGHT_MB": "inf"}, ["serve"], "finite number"),
    "device text": ({"IMGCLS_DEVICE": "cuda:abc"}, ["serve"], "imgcls: IMGCLS_DEVICE must be"),
    "device digits not ASCII": ({"IMGCLS_DEVICE": "cuda:\u0661"}, ["serve"], "cuda or cuda:N"),
    "gRPC message over a C int": ({"IMGCLS_OIP_MAX_REQUEST_MB": "4096"}, ["serve"], "2047"),
    "device missing": (
        {"IMGCLS_DEVICE": MISSING_GPU},
        ["serve"],
        f"IMGCLS_DEVICE={MISSING_GPU} but",
    ),
    "unknown model": ({"IMGCLS_MODELS": "nope"}, ["serve"], "unknown model 'nope'"),
    "API key not ASCII": ({"IMGCLS_API_KEY": "secr\u20act"}, ["serve"], "printable ASCII"),
    "PORT text": ({"PORT": "abc"}, ["serve"], "not a port number: 'abc'"),
    "port range": ({}, ["serve", "--port", "99999"], "a port is 0 to 65535"),
    "eval concurrency": (
        {},
        ["eval", "--data", ".", "--models", "resnet18", "--concurrency", "0"],
        "--concurrency: must be at least 1",
    ),
    "eval limit": (
        {},
        ["eval", "--data", ".", "--models", "resnet18", "--limit", "0"],
        "--limit: must be at least 1",
    ),
    "eval no models": ({}, ["eval", "--data", ".", "--models", ","], "--models names no model"),
    # found before the evaluation runs, not after it (the server at port 9 is never asked)
    "eval out not a folder": (
        {},
        [
            "eval",
            "--data",
            ".",
            "--models",
            "resnet18",
            "--url",
            "http://127.0.0.1:9",
            "--out",
            "/dev/null/reports",
        ],
        "--out /dev/null/reports: cannot make the folder (Not a directory)",
    ),
    "bench unknown model": ({}, ["bench", "--model", "nope"], "--model: unknown model 'nope'"),
    "bench device missing": (
        {},
        ["bench", "--model", "resnet18", "--device", MISSING_GPU],
        f"--device {MISSING_GPU}: ",
    ),
    "bench device unknown": ({}, ["bench", "--device", "tpu"], "--device tpu: Expected one of"),
    "bench out not a folder": (
        {},
        ["bench", "--model", "resnet18", "--out", "/dev/null/bench"],
        "--out /dev/null/bench: cannot make the folder",
    ),
    # counts and times that cannot be measured, and names checked before anything runs
    "bench no time": ({}, ["bench", "--duration", "0"], "must be more than 0 seconds"),
    "bench no clients": ({}, ["bench", "--concurrency", "0,2"], "must be at least 1, got 0"),
    "bench negative batch": ({}, ["bench", "--batch-sizes=-1"], "must be at least 1, got -1"),
    "bench unknown server": (
        {},
        ["bench", "--model", "resnet18", "--servers", "imgcls,bogus"],
        "--servers: unknown bogus; choose from imgcls, imgcls-int8, naive, litserve",
    ),
    "bench no photos": (
        {},
        ["bench", "--model", "resnet18", "--images", "/nonexistent/photos"],
        "--images: no folder of photos at /nonexistent/photos",
    ),
    "bench no model-only, no batch": (
        {},
        ["bench", "--model", "resnet18", "--model-seconds", "0"],
        "--model-seconds 0 (no model-only sweep) needs --max-batch",
    ),
    "model config a folder": (
        {"IMGCLS_MODEL_CONFIG": "app"},
        ["serve"],
        "imgcls: IMGCLS_MODEL_CONFIG: is a folder: app",
    ),
    "model config missing": (
        {"IMGCLS_MODEL_CONFIG": "/nonexistent/models.toml"},
        ["serve"],
        "imgcls: IMGCLS_MODEL_CONFIG: no such file: /nonexistent/models.toml",
    ),
    "calibration folder missing": (
        {"IMGCLS_INT8_CALIBRATION": "/nonexistent/photos", "IMGCLS_MODELS": "resnet34:int8"},
        ["serve"],
        "imgcls: IMGCLS_INT8_CALIBRATION: no such folder: /nonexistent/photos",
    ),
    "model config name too long": (
        {"IMGCLS_MODEL_CONFIG": "m" * 5000},
        ["serve"],
        "imgcls: IMGCLS_MODEL_CONFIG: cannot be read (File name too long)",
    ),
    "calibration folder a file": (
        {"IMGCLS_INT8_CALIBRATION": "pyproject.toml"},
        ["serve"],
        "imgcls: IMGCLS_INT8_CALIBRATION: not a folder: pyproject.toml",
    ),
    "default model not served": (
        {"IMGCLS_DEFAULT_MODEL": "nope"},
        ["serve"],
        "imgcls: IMGCLS_DEFAULT_MODEL='nope' is not in IMGCLS_MODELS",
    ),
    "weights folder empty": (
        {"IMGCLS_WEIGHTS_DIR": ""},
        ["serve"],
        "imgcls: IMGCLS_WEIGHTS_DIR must",
    ),
}


def _run(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
    # grpc off and a free-ish port: should a case wrongly start a server, it cannot collide
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLS_") and k != "PORT"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**clean, "IMGCLS_GRPC_PORT": "0", **env},
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_bad_settings_and_arguments_exit_2_in_one_line():
    with cf.ThreadPoolExecutor(4) as ex:
        runs = {name: ex.submit(_run, env, args) for name, (env, args, _) in CASES.items()}
        results = {name: f.result() for name, f in runs.items()}
    for name, r in results.items():
        said = CASES[name][2]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert said in r.stderr, (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        # one line, after argparse's usage for an argument's error
        *usage, last = r.stderr.strip().splitlines()
        assert last.startswith("imgcls") and said in last, (name, r.stderr[-2000:])
        assert all(u.startswith(("usage:", " ")) for u in usage), (name, r.stderr[-2000:])


# refused from the arguments or the settings alone: torch (seconds to import) is never loaded
BEFORE_TORCH = [
    "log level",
    "API key not ASCII",
    "port range",
    "eval no models",
    "bench unknown server",
    "bench no photos",
    "bench no model-only, no batch",
    "bench out not a folder",
    "model config a folder",
    "model config missing",
    "model config name too long",
    "calibration folder missing",
    "calibration folder a file",
]


def test_mistakes_found_in_the_arguments_are_refused_before_torch_loads():
    """Every case here in one process, each through ``main`` as the command runs it: each exits
    2, and torch is still not imported at the end."""
    script = (
        "import json, os, sys\n"
        "from app.cli import main\n"
        "codes = []\n"
        "for env, args in json.loads(sys.argv[1]):\n"
        "    os.environ.update(env)\n"
        "    try:\n"
        "        codes.append(main(args))\n"
        "    except SystemExit as exc:  # argparse's own refusals\n"
        "        codes.append(exc.code)\n"
        "    for k in env: os.environ.pop(k)\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    cases = [CASES[name][:2] for name in BEFORE_TORCH]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLS_") and k != "PORT"}
    r = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env=clean, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    said = json.loads(r.stdout.strip().splitlines()[-1])
    assert said["codes"] == [2] * len(cases), (said, r.stderr[-2000:])
    assert not said["torch"], "torch was imported to refuse a mistake in the arguments"
    for name in BEFORE_TORCH:
        assert CASES[name][2] in r.stderr, (name, r.stderr[-2000:])


def test_a_refused_bench_leaves_no_reports_folder(tmp_path, capsys):
    """A bench refused for its arguments makes no --out folder (each mistake found before the
    folder would be made, the model's too), and an --out that cannot be made is still refused."""
    from app.cli import main

    term = signal.getsignal(signal.SIGTERM)  # the bench sets its own before the model's check
    try:
        for mistake in (["--model", "nope"], ["--servers", "bogus"], ["--images", "/nowhere"]):
            assert main(["bench", *mistake, "--out", str(tmp_path / "a" / "reports")]) == 2
            assert not (tmp_path / "a").exists(), mistake
    finally:
        signal.signal(signal.SIGTERM, term)
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # mkdir would fail only at the end
    assert main(["bench", "--out", str(tmp_path / "file" / "reports")]) == 2
    assert main(["bench", "--out", str(tmp_path / "file")]) == 2
    assert main(["bench", "--out", str(tmp_path / "dangling")]) == 2
    assert main(["bench", "--out", str(tmp_path / "dangling" / "reports")]) == 2
    said = capsys.readouterr().err.splitlines()
    assert "cannot make the folder (Not a directory)" in said[-4], said
    assert "cannot make the folder (File exists)" in said[-3], said
    assert "cannot make the folder (File exists)" in said[-2], said
    assert "cannot make the folder (Not a directory)" in said[-1], said


def test_a_bad_port_in_the_environment_does_not_break_other_commands():
    r = _run({"PORT": "abc"}, ["--help"])
    assert r.returncode == 0 and "serve" in r.stdout, r.stderr


def test_calibrated_int8_names_pass_the_startup_check(tmp_path):
    """``NAME:int8`` without published int8 weights is a model once IMGCLS_INT8_CALIBRATION
    names a folder, for the command's check as for the service."""
    from app.service import check_startup

    check_startup(Settings(models="cifar10_resnet20:int8", int8_calibration=tmp_path))


def test_an_empty_path_setting_is_unset():
    """``IMGCLS_MODEL_CONFIG=`` (as a compose file's empty default writes it) is no config, not
    the working directory read as one; the same for the calibration folder."""
    s = Settings(model_config_file="", int8_calibration=" ")
    assert s.model_config_file is None and s.int8_calibration is None


def test_grace_keeps_fractions_of_a_second():
    """uvicorn waits for in-flight work with asyncio.wait_for: 0.9 s is 0.9 s (int() made it no
    grace at all)."""
    assert server_options(Settings(shutdown_grace_s=0.9))["timeout_graceful_shutdown"] == 0.9
    assert Settings(log_level="DEBUG").log_level == "debug"
