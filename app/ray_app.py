"""imgcls on Ray Serve: the same /classify, /compare, /explain and /models contract past one
machine.

One deployment per backbone, batched by ``@serve.batch`` and running the same engine (the
worker's Runner: precision, channels_last, compile), with replicas that take ``num_gpus`` and
autoscale; a FastAPI ingress with the same catalog, upload limits, decoding, preprocessing and
response building as the single-process service.

    serve run app.ray_app:build_app models=resnet18,resnet50 device=cuda
    # or, with a config file: serve run deploy/ray-serve.yaml
"""

import asyncio
import dataclasses
import importlib
import time
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app import weights as weights_mod
from app.api import docs, page
from app.api import errors as api_errors
from app.api.deps import MAX_TOP_K
from app.catalog import ModelSpec
from app.catalog.custom import catalog_for
from app.core import GateSlot, InferenceCore, ServedModel, parse_models
from app.engine import fastpath
from app.engine.batcher import ImageResult, NoWorkerError, QueueFullError
from app.engine.decoding import Item
from app.engine.pool import ExplainResult, ModelUnavailableError
from app.engine.worker import CheckpointChangedError, Runner, WorkerConfig
from app.errors import ModelNotReadyError, ModelNotServedError
from app.limits import BodyLimitsMiddleware, InflightBudget, body_timeouts
from app.middleware import ApiKeyMiddleware, HeadAsGetMiddleware, RequestIdMiddleware
from app.schemas import (
    ClassifyResponse,
    CompareResponse,
    ExplainResponse,
    Info,
    ModelDetail,
    ModelsResponse,
    Readiness,
)
from app.settings import Settings
from app.upload import FORM_OVERHEAD, read_upload

AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}


def _device(settings: Settings) -> str:
    if settings.device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if settings.device.startswith("cuda") else settings.device


@serve.deployment(max_ongoing_requests=64)
class Backbone:
    """One backbone's replica: loads its weights and runs batches formed by @serve.batch."""

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.spec: ModelSpec = catalog_for(
            self.settings.model_config_file, self.settings.int8_calibration
        ).get(name)
        path = weights_mod.resolve(
            self.spec,
            self.settings.weights_dir,
            auto_download=self.settings.auto_download,
            allow_random=self.settings.allow_random_weights,
            mirror=self.settings.weights_mirror,
        )
        self.weights_label = weights_mod.weights_label(self.spec, path)
        self.device = _device(self.settings)
        # Uploads are decoded in the ingress; with IMGCLS_MAX_BATCH_SIZE=auto the replica times
        # batch sizes at load, as the service's workers do, and batches close at its pick.
        self.runner = Runner(
            WorkerConfig.from_settings(
                self.settings, self.device, threads=self.settings.threads_per_worker
            )
        )
        self.backend = self.runner.load(self.spec.load_plan(str(path) if path else None))
        self.precision = self.runner.precisions[self.spec.name]  # what ran (OpenVINO: its own)
        batcher: Any = self.predict_batch  # the @serve.batch wrapper
        self.batch_size = (
            self.runner.batch_sizes[self.spec.name]  # measured at load
            if self.settings.max_batch_size == "auto"
            else self.settings.batch_cap
        )
        batcher.set_max_batch_size(self.batch_size)
        batcher.set_batch_wait_timeout_s(self.settings.max_batch_wait_ms / 1000.0)
        self.explaining = asyncio.Lock()

    def info(self) -> dict[str, Any]:
        return {"weights": self.weights_label, "device": self.device, "precision": self.precision,
                "backend": self.backend, "batch_size": self.batch_size,
                "cpu_features": fastpath.cpu_features().names()}  # fmt: skip

    async def explain(self, pixels: torch.Tensor, target: int | None) -> ExplainResult:
        """Grad-CAM of uint8 pixels (3, S, S) on the replica's fp32 eager copy of the model (built
        on the first explanation, as in the service's workers)."""
        async with self.explaining:  # Captum hooks the one fp32 copy: one job at a time
            t0 = time.perf_counter()
            heatmaps, targets, scores, overlays = await asyncio.to_thread(
                self.runner.explain, self.spec.name, pixels.unsqueeze(0), target
            )
            ms = (time.perf_counter() - t0) * 1000.0
        # ``start`` is this replica's clock; the ingress puts it on its own (another node's
        # monotonic clock means nothing there)
        return ExplainResult(heatmaps, targets, scores, overlays, time.monotonic() - ms / 1000,
                             ms, self.device)  # fmt: skip

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[torch.Tensor, float]]) -> list[ImageResult]:
        start_wall = time.time()
        t0 = time.perf_counter()
        batch = torch.stack([t for t, _ in items])
        probs = await asyncio.to_thread(self.runner.forward, self.spec.name, batch)
        ms = (time.perf_counter() - t0) * 1000.0
        return [
            ImageResult(
                probs=probs[i].numpy(),
                batch_size=len(items),
                queue_ms=max(0.0, (start_wall - submitted) * 1000.0),
                inference_ms=ms,
                device=self.device,
                precision=self.precision,
                backend=self.backend,
            )
            for i, (_, submitted) in enumerate(items)
        ]

    async def __call__(self, tensor: torch.Tensor, submitted: float) -> ImageResult:
        result: ImageResult = await self.predict_batch((tensor, submitted))
        return result


# How long /models and /readyz wait for a backbone to say what it runs: a deployment still
# starting (or failing) is reported as such, not waited for.
INFO_WAIT_S = 2.0
# /readyz and /models ask a backbone that answered before again at most this often (a busy
# one answers late: probes are not held up by it every time).
RECHECK_S = 5.0
# Ray's answers for a backbone that cannot take a request now, as the service's 503s.
UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, RayActorError)


def _unavailable(name: str, exc: Exception) -> Exception:
    """The service's own error (503 with Retry-After) for a Ray failure to reach ``name``."""
    if isinstance(exc, BackPressureError):
        return QueueFullError(
            f"model {name!r} has IMGCLS_MAX_QUEUE requests waiting for its replicas; retry shortly"
        )
    if isinstance(exc, DeploymentUnavailableError):
        return ModelNotReadyError(f"model {name!r} failed to deploy on Ray: {exc}", retry_after=5)
    return NoWorkerError(f"a replica of {name!r} died ({type(exc).__name__}); retry shortly")


class RayCore(InferenceCore):
    """The inference core (app/core.py) with models run by Ray deployment handles; uploads are
    decoded here, in the ingress, and pixels go to the replicas."""

    def __init__(self, backbones: dict[str, DeploymentHandle], settings: Settings) -> None:
        self.settings = settings
        self.catalog = catalog_for(settings.model_config_file, settings.int8_calibration)
        self.backbones = backbones
        self.served = {name: ServedModel(self.catalog.get(name)) for name in backbones}
        self.info: dict[str, dict[str, Any]] = {}
        self.checked: dict[str, float] = {}  # name -> when its deployment was last asked

    async def refresh(self, names: list[str], wait_s: float, again: bool = False) -> dict[str, str]:
        """Learn the weights, device, precision and backend of the deployments ``names`` (once
        each; every time with ``again``), waiting at most ``wait_s`` for them together; returns
        why each that could not tell is not ready (one backbone that fails or still starts
        never holds up the others). Asked again, a backbone that answered before and is slow
        now (busy) stays ready; one that fails (no replica left, failed to deploy) does not."""

        async def one(name: str) -> None:
            self.checked[name] = time.monotonic()
            try:
                self.info[name] = await self.backbones[name].info.remote()
            except (BackPressureError, RayActorError) as exc:
                if name in self.info:  # busy, or one replica died while others serve: ready
                    return
                raise _unavailable(name, exc) from None
            except DeploymentUnavailableError as exc:  # no replica can run: not ready
                self.info.pop(name, None)
                raise _unavailable(name, exc) from None
            except Exception:
                self.info.pop(name, None)
                raise
            self.served[name].weights_label = self.info[name]["weights"]

        now = time.monotonic()
        asked = [
            n
            for n in dict.fromkeys(names)
            if n in self.served
            and (n not in self.info or (again and now - self.checked.get(n, 0.0) > RECHECK_S))
        ]
        if not asked:
            return {}
        tasks = {n: asyncio.ensure_future(one(n)) for n in asked}
        await asyncio.wait(tasks.values(), timeout=max(0.001, wait_s))
        why: dict[str, str] = {}
        for name, task in tasks.items():
            if not task.done():
                task.cancel()
                if name not in self.info:
                    why[name] = "loading: its replicas are still starting"
            elif task.exception() is not None:
                why[name] = f"failed: {task.exception()}"
        return why

    async def ready(self, names: list[str]) -> None:
        """``names`` deployed and answering, within the request's deadline: else 503."""
        why = await self.refresh(names, self.settings.request_timeout_s)
        if why:
            name, reason = next(iter(why.items()))
            raise ModelNotReadyError(f"model {name!r} is not ready: {reason}", retry_after=5)

    def ready_models(self) -> list[str]:
        """The deployments that have answered (``refresh``)."""
        return [name for name in self.served if name in self.info]

    def servable(self, name: str) -> ServedModel:
        spec: ModelSpec = self.catalog.get(name)  # unknown names: 404 with the list
        if name not in self.served:
            raise ModelNotServedError(
                f"model {spec.name!r} is in the catalog but not deployed; deployed: "
                f"{', '.join(self.backbones)}"
            )
        return self.served[name]

    async def run(self, name: str, payload: Item, deadline: float) -> ImageResult:
        remaining = max(0.001, deadline - time.monotonic())
        try:
            result: ImageResult = await asyncio.wait_for(
                self.backbones[name].remote(payload, time.time()), remaining
            )
        except UNAVAILABLE as exc:
            raise _unavailable(name, exc) from None
        return result

    async def run_explain(
        self,
        name: str,
        pixels: torch.Tensor,
        target: int | None,
        deadline: float,
        slot: GateSlot | None = None,
    ) -> ExplainResult:
        """Grad-CAM on one of ``name``'s replicas. ``slot``: the ingress's explain gate place,
        held until the replica's job ends, not when the client stops waiting."""
        sent = time.monotonic()

        async def call() -> ExplainResult:
            # the service's watchdog limit for one explanation: a replica that hangs gives the
            # gate's place back after it, not never
            try:
                result: ExplainResult = await asyncio.wait_for(
                    self.backbones[name].explain.remote(pixels, target),
                    self.settings.explain_timeout_s,
                )
            except UNAVAILABLE as exc:
                raise _unavailable(name, exc) from None
            except CheckpointChangedError as exc:  # raised on the replica: Ray re-raises it
                raise ModelUnavailableError(str(getattr(exc, "cause", exc))) from None
            # queued from the ingress's view: everything but the replica's own Grad-CAM time
            result.start = max(sent, time.monotonic() - result.explain_ms / 1000)
            return result

        job = asyncio.ensure_future(call())
        # read by the caller, or here once nobody waits for it (no "exception never retrieved")
        job.add_done_callback(lambda j: j.cancelled() or j.exception())
        return await self.explain_job(name, job, deadline, slot)


class Guards:
    """The service's guards in front of the ingress's routes (app/main.py): IMGCLS_API_KEY,
    and the body limits (the body timeouts, the budget of uploads in flight, the largest body),
    set up from the deployment's settings once the ingress is built (``configure``). Not here:
    the header timeout and size cap, which live in imgcls's uvicorn protocol (Ray's proxy runs
    its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.guarded: ASGIApp | None = None

    def configure(self, settings: Settings) -> None:
        max_body = settings.max_upload_bytes + FORM_OVERHEAD
        inner: ASGIApp = BodyLimitsMiddleware(
            HeadAsGetMiddleware(self.app),
            budget=InflightBudget(settings.max_inflight_bytes),
            max_body=max_body,
            **body_timeouts(settings),
        )
        if settings.api_key:
            inner = ApiKeyMiddleware(inner, api_key=settings.api_key, max_body=max_body)
        self.guarded = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan (it runs before the ingress is built)
            await self.app(scope, receive, send)
            return
        if self.guarded is None:
            settings = _INGRESS.get("settings")
            if settings is None:  # the ingress is not built yet: never serve unguarded
                response = JSONResponse({"detail": "the ingress is starting"}, 503)
                await response(scope, receive, send)
                return
            self.configure(settings)
            assert self.guarded is not None
        await self.guarded(scope, receive, send)


# The ingress's settings, for its Guards (set when the ingress is built, in its process).
_INGRESS: dict[str, Settings] = {}


api = FastAPI(
    title="imgcls (Ray Serve)",
    description="The imgcls contract on Ray Serve.",
    docs_url=None,  # served by docs.install, without a CDN
    redoc_url=None,
)
docs.install(api, api_key=False)  # the key is known once the ingress is built
page.install(api)  # open, as the service's: the page asks for the key when refused
api_errors.install(api)
api.add_middleware(Guards)
# Ray's proxy passes the client's X-Request-ID (or one it made) and echoes it on the answer
api.add_middleware(RequestIdMiddleware, echo=False)
TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K)]


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, backbones: dict[str, DeploymentHandle], settings: dict[str, Any]) -> None:
        # this actor only decodes and resizes: one intra-op thread, as in imgcls's API process
        # (torch's resize would start OpenMP teams on the decode threads, spinning beside the
        # replicas)
        torch.set_num_threads(1)
        self.core = RayCore(backbones, Settings(**settings))
        # through the imported module: Ray ships this class by value, with copies of the
        # globals it names (``_INGRESS`` here would be a copy), and Guards by reference
        importlib.import_module(__name__)._INGRESS["settings"] = self.core.settings

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(
        self, request: Request, model: str | None = None, top_k: TopK = 5
    ) -> ClassifyResponse:
        name = (model or "").strip() or self.core.default_model
        self.core.admit(name)
        await self.core.ready([name])
        upload = await read_upload(request, self.core.settings.max_upload_bytes)
        return await self.core.classify(
            upload.data, model, top_k, request.state.request_id, upload.received
        )

    @api.post("/compare", response_model=CompareResponse)
    async def compare(
        self,
        request: Request,
        models: str | None = None,
        top_k: TopK = 5,
        explain: Annotated[str | None, Query(max_length=32)] = None,
    ) -> CompareResponse:
        if models is None:  # every model ready now: those that answer within a few seconds
            await self.core.refresh(list(self.core.served), INFO_WAIT_S)
        names = parse_models(models, self.core.ready_models())
        for name in names:
            self.core.admit(name)
        if explain is not None:
            self.core.explain_gate.check(len(names))  # first: more than it can ever hold: 422
            for name in names:
                self.core.admit_explain(name, explain)
        await self.core.ready(names)
        upload = await read_upload(request, self.core.settings.max_upload_bytes)
        return await self.core.compare(
            upload.data, models, top_k, request.state.request_id, explain=explain,
            received=upload.received,
        )  # fmt: skip

    @api.post("/explain", response_model=ExplainResponse, response_model_exclude_none=True)
    async def explain(
        self,
        request: Request,
        model: Annotated[str | None, Query(max_length=128)] = None,
        method: Annotated[str, Query(max_length=32)] = "gradcam",
        target: Annotated[str, Query(max_length=16)] = "top1",
        heatmap: bool = True,
    ) -> ExplainResponse:
        name = (model or "").strip() or self.core.default_model
        self.core.admit_explain(name, method, target)
        await self.core.ready([name])
        upload = await read_upload(request, self.core.settings.max_upload_bytes)
        return await self.core.explain(
            upload.data, name, method, target, heatmap, request.state.request_id,
            received=upload.received,
        )  # fmt: skip

    def _entry(self, spec: ModelSpec, why: dict[str, str]) -> dict[str, Any]:
        entry = spec.catalog_entry()
        if spec.name in self.core.info:
            said = {k: v for k, v in self.core.info[spec.name].items() if k != "cpu_features"}
            entry.update(status="ready", reason=None, **said)
        else:
            status, reason = "not-loaded", "not deployed"
            if spec.name in why:
                status, _, reason = why[spec.name].partition(": ")
            entry.update(status=status, reason=reason, device=None, weights=None,
                         precision=None, backend=None)  # fmt: skip
        return entry

    @api.get("/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        why = await self.core.refresh(list(self.core.served), INFO_WAIT_S, again=True)
        entries = [self._entry(spec, why) for spec in self.core.catalog.specs()]
        return ModelsResponse.model_validate({"models": entries})

    @api.get("/models/{name}", response_model=ModelDetail)
    async def model(self, name: str) -> ModelDetail:
        spec = self.core.catalog.get(name)  # unknown names: 404 with the list
        why = await self.core.refresh([spec.name], INFO_WAIT_S, again=True)
        entry = self._entry(spec, why)
        return ModelDetail.model_validate({**entry, "labels": list(spec.labels)})

    @api.get("/info", response_model=Info)
    async def info(self) -> Info:
        """The service's /info: limits and defaults from the ingress's settings; devices and
        CPU features from the replica of each backbone that answered ``refresh`` (the flags
        all of those have: replicas may run on other nodes than the ingress)."""
        await self.core.refresh(list(self.core.served), INFO_WAIT_S)
        s, told = self.core.settings, list(self.core.info.values())
        flags = [set(i.get("cpu_features", ())) for i in told]  # a replica's, where it says
        order = [f.name for f in dataclasses.fields(fastpath.CpuFeatures)]
        common = [f for f in order if flags and all(f in x for x in flags)]
        return Info(
            version=__version__,
            default_model=s.default,
            models=list(self.core.served),
            max_upload_mb=s.max_upload_mb,
            max_pixels=s.max_pixels,
            max_top_k=MAX_TOP_K,
            devices=sorted({i["device"] for i in told}),
            cpu_features=common,
        )

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", response_model=Readiness)
    async def readyz(self) -> JSONResponse:
        """200 when every deployed backbone answers, asked each time (one that answered before
        may be busy for a while), else 503 naming those that do not, as the service's
        /readyz."""
        why = await self.core.refresh(list(self.core.served), INFO_WAIT_S, again=True)
        body = Readiness(ready=not why, not_ready=[f"{n}: {w}" for n, w in why.items()])
        return JSONResponse(body.model_dump(), status_code=503 if why else 200,
                            headers={"Retry-After": "5"} if why else None)  # fmt: skip


def build_app(args: dict[str, str]) -> Any:
    """Application builder for `serve run app.ray_app:build_app key=value ...`.

    Keys are Settings fields (models, device, precision, weights_dir, max_batch_size, ...);
    anything not given comes from the IMGCLS_* environment of the process that builds the app.
    Replicas ask for one GPU each when the device is CUDA.
    """
    settings = Settings(**args)  # type: ignore[arg-type]
    shared = settings.model_dump(mode="json", exclude_none=True)
    gpus = 1 if _device(settings).startswith("cuda") else 0
    backbones = {
        name: Backbone.options(  # type: ignore[attr-defined]
            name=f"backbone-{name.replace(':', '-')}",
            ray_actor_options={"num_gpus": gpus, "num_cpus": 1},
            autoscaling_config=AUTOSCALING,
            # requests waiting for a replica, per ingress: beyond, 503 as the service's queue
            max_queued_requests=settings.max_queue,
        ).bind(name, shared)
        for name in settings.model_names
    }
    return Ingress.bind(backbones, shared)  # type: ignore[attr-defined]
