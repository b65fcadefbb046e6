"""All configuration, read once from ``IMGCLS_*`` environment variables."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTO_BATCH_CAP = 32


def _not_a(kind: Literal["file", "folder"], path: Path) -> str | None:
    """Why ``path`` is not a regular file (or a folder), or None if it is one."""
    try:
        if path.is_file() if kind == "file" else path.is_dir():
            return None
        if not path.exists():
            return f"no such {kind}"
        if kind == "file":
            return "is a folder" if path.is_dir() else "not a regular file"
        return "not a folder"
    except OSError as exc:  # a folder above it that cannot be searched, a name too long
        return f"cannot be read ({exc.strerror or exc})"


class Settings(BaseSettings):
    # inf passes gt=0 and then overflows where a number of bytes or seconds is made of it
    model_config = SettingsConfigDict(
        env_prefix="IMGCLS_", extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    models: str = Field(
        "alexnet,vgg16,resnet18,resnet50",
        description="Comma-separated backbones to load at startup (name or name:WEIGHTS_ENUM).",
    )
    default_model: str | None = None
    model_config_file: Path | None = Field(
        None,
        validation_alias="IMGCLS_MODEL_CONFIG",
        description="TOML file declaring extra (custom) models.",
    )

    weights_dir: Path = Path("weights")
    auto_download: bool = True
    allow_random_weights: bool = False
    weights_mirror: str | None = Field(
        None, description="Base URL that replaces each checkpoint's public download folder."
    )

    device: str = "auto"
    workers_per_device: int = Field(1, ge=1, le=16)
    threads_per_worker: int | None = Field(None, ge=1)
    precision: Precision = Field(
        "auto", description="auto: fp16 on CUDA, bf16 on CPUs with AVX512-BF16/AMX, else fp32"
    )
    channels_last: bool | None = Field(
        None, description="default: on for bf16/fp16 and for auto on CPUs"
    )
    compile: bool | None = Field(
        None,
        description="torch.compile; default: on with bf16/fp16 and auto on CPUs, at warm-up",
    )

    cpp_wrapper: bool = Field(
        False,
        description="CPU: compiled graphs call their kernels from compiled C++ instead of Python "
        "(resnet50 on a 2-core AMD EPYC: 1-5% less time per batch; compiling takes 1.6-2.3x as "
        "long)",
    )

    cpu_runtime: Literal["torch", "openvino"] = Field(
        "torch",
        description="what runs the models on CPU workers: torch (eager or torch.compile), or "
        "OpenVINO's CPU plugin (pip install 'imgcls[openvino]'; resnet50 on a 2-core AMD EPYC, "
        "two runs: int8 1.15-1.17x torch's images/s model-only and 1.13-1.16x over HTTP, bf16 "
        "1.00-1.09x and 1.09-1.10x); a model OpenVINO cannot convert is served by torch, and "
        "explanations run in torch either way",
    )

    decode: Literal["api", "worker"] = Field(
        "worker",
        description="where /classify uploads are decoded and resized: in the device worker "
        "(Pillow on its threads; nvjpeg for JPEGs on CUDA), or in the API process",
    )

    int8_calibration: Path | None = Field(
        None,
        description="folder of images: models listed as NAME:int8 without published int8 "
        "weights are quantized at load time, calibrated on them (opt-in)",
    )

    jpeg_draft: bool = Field(
        True,
        description="decode JPEGs at the smallest DCT scale that keeps 3x the model's resize "
        "target (phone photos ~4x cheaper), and box-reduce other formats by the integer factor "
        "that keeps 6x before the resize; off: the exact, torchvision-identical decode",
    )

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="a batch closes at this size; auto: each model's workers time batch sizes "
        f"1, 2, 4, ... up to {AUTO_BATCH_CAP} at warm-up and use the fastest",
    )
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    # a batch that waited for a busy worker waits up to this share of the last forward pass
    # (at most 50 ms) for the clients the last batch answered: closed-loop clients otherwise
    # settle into half-full batches (engine/batcher.py, ModelBatcher._merge); 0: off
    batch_merge_share: float = Field(0.1, ge=0, le=1)
    max_queue: int = Field(1024, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    worker_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a worker whose oldest batch has run this long, or whose heartbeat has been "
        "silent this long, is killed and restarted (watchdog)",
    )
    worker_startup_timeout_s: float = Field(
        900.0,
        gt=0,
        description="the watchdog's limit while a worker starts or loads (compiles) a model",
    )

    explain_concurrency: int = Field(
        1, ge=1, le=64, description="Grad-CAM explanations computed at once by this service"
    )
    explain_queue: int = Field(
        8, ge=0, description="explanations waiting for their turn; beyond it 503 + Retry-After"
    )
    explain_timeout_s: float = Field(
        120.0, gt=0, description="the watchdog's limit for one explanation in a worker"
    )

    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)

    api_key: str | None = None
    cors_origins: str | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"

    # Connection limits and the upload budget (issue 16, issue 11 point 7): see app/limits.py.
    header_timeout_s: float = Field(
        10.0, gt=0, description="time to receive a request's headers (connection open or the "
        "previous response sent, to the end of the headers); then 408 and close"
    )  # fmt: skip
    body_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for the next bytes of a request body (408)"
    )
    body_min_rate_kb_s: float = Field(
        32.0, ge=0, description="slowest average body rate accepted after body_timeout_s (408)"
    )
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after")
    max_header_kb: int = Field(16, ge=1, description="request line and headers, in KiB (431)")
    max_inflight_mb: float = Field(
        256.0, gt=0, description="request bodies held at once, in MiB; beyond, 503 + Retry-After"
    )
    decode_memory_mb: float = Field(
        1024.0,
        gt=0,
        description="decoded pixels the API process holds at once, in MiB (/compare, /explain, "
        "IMGCLS_DECODE=api); beyond, decodes wait their turn",
    )

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, v: str) -> str:
        if not [m for m in v.split(",") if m.strip()]:
            raise ValueError("IMGCLS_MODELS must name at least one model")
        return v

    @field_validator("model_config_file", "int8_calibration", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, v: object) -> object:
        # `IMGCLS_MODEL_CONFIG=` (a compose file's empty default) means none, not the folder "."
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("model_config_file")
    @classmethod
    def _config_is_a_file(cls, v: Path | None) -> Path | None:
        # refused with the settings (a fraction of a second), not after torch and the catalog
        # have loaded; what the file says is checked as the catalog reads it
        if v is not None:
            why = _not_a("file", v)
            if why:
                raise ValueError(f"IMGCLS_MODEL_CONFIG: {why}: {v} (a TOML file of [models.NAME])")
        return v

    @field_validator("int8_calibration")
    @classmethod
    def _calibration_is_a_folder(cls, v: Path | None) -> Path | None:
        # otherwise every NAME:int8 it serves fails at load, minutes after start-up; whether the
        # folder holds images is checked as a model is quantized
        if v is not None:
            why = _not_a("folder", v)
            if why:
                raise ValueError(f"IMGCLS_INT8_CALIBRATION: {why}: {v} (a folder of images)")
        return v

    @field_validator("weights_dir", mode="before")
    @classmethod
    def _weights_dir_named(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            raise ValueError(
                "IMGCLS_WEIGHTS_DIR must name a folder (empty, it is the working directory)"
            )
        return v

    @field_validator("api_key")
    @classmethod
    def _key_stripped(cls, v: str | None) -> str | None:
        # clients' tokens are stripped of spaces; a key with a trailing newline (from a file or
        # a secret) could never match. Blank is no key, as unset.
        key = (v.strip() or None) if v is not None else None
        if key is not None and not all(" " <= c <= "~" for c in key):
            # an HTTP header carries it: browsers send Latin-1 at most, most clients ASCII
            raise ValueError("IMGCLS_API_KEY must be printable ASCII (a header carries it)")
        return key

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        v = v.strip().lower()
        if v in {"auto", "cpu", "cuda"} or re.fullmatch(r"cuda:[0-9]{1,3}", v):
            return v
        raise ValueError("IMGCLS_DEVICE must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _openvino_installed(self) -> Settings:
        # checked where CPU workers can run (a GPU host set to cuda never makes one)
        cpu = not self.device.startswith("cuda")
        if self.cpu_runtime == "openvino" and cpu and importlib.util.find_spec("openvino") is None:
            raise ValueError(
                "IMGCLS_CPU_RUNTIME=openvino needs the openvino package: "
                "pip install 'imgcls[openvino]'"
            )
        return self

    @model_validator(mode="after")
    def _default_in_models(self) -> Settings:
        if self.default_model and self.default_model not in self.model_names:
            raise ValueError(
                f"IMGCLS_DEFAULT_MODEL={self.default_model!r} is not in IMGCLS_MODELS "
                f"({', '.join(self.model_names)})"
            )
        return self

    @property
    def model_names(self) -> list[str]:
        names: list[str] = []
        for m in self.models.split(","):
            m = m.strip()
            if m and m not in names:
                names.append(m)
        return names

    @property
    def default(self) -> str:
        return self.default_model or self.model_names[0]

    @property
    def batch_cap(self) -> int:
        """The configured batch size, or the largest one ``auto`` may pick."""
        return AUTO_BATCH_CAP if self.max_batch_size == "auto" else self.max_batch_size

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    # ---- Open Inference Protocol (KServe v2 / Triton): REST under /v2, gRPC on its own port ----
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port of the Open Inference Protocol; 0 turns it off"
    )
    grpc_host: str = Field(
        "127.0.0.1", description="address the gRPC server listens on (0.0.0.0 in a container)"
    )
    oip_max_request_mb: float = Field(
        64.0,
        gt=0,
        le=2047,  # gRPC takes its message limit as a C int
        description="largest /v2 infer request (REST body or gRPC message), in MB",
    )
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description="explicit: the model repository's load and unload (REST /v2/repository/models"
        "/NAME/load|unload, gRPC RepositoryModelLoad|Unload) start and stop models at run time, "
        "as Triton's --model-control-mode=explicit; none: they answer 403, and the models served "
        "are IMGCLS_MODELS (a client cannot make the service download weights or take it out of "
        "readiness)",
    )
    grpc_max_concurrent_rpcs: int | None = Field(
        None,
        ge=1,
        description="gRPC calls served at once; beyond, RESOURCE_EXHAUSTED before the call is "
        "handled, so the messages held stay under this times oip_max_request_mb (default: no "
        "limit)",
    )

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1024 * 1024)

    @property
    def decode_memory_bytes(self) -> int:
        return int(self.decode_memory_mb * 1024 * 1024)
