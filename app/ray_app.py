"""imgcls on Ray Serve: the same /classify, /compare and /models contract past one machine.

One deployment per backbone, batched by ``@serve.batch`` and running the same engine (the
worker's Runner: precision, channels_last, compile), with replicas that take ``num_gpus`` and
autoscale; a FastAPI ingress with the same catalog, upload limits, decoding, preprocessing and
response building as the single-process service.

    serve run app.ray_app:build_app models=resnet18,resnet50 device=cuda
    # or, with a config file: serve run deploy/ray-serve.yaml
"""

import asyncio
import time
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from app import errors
from app import weights as weights_mod
from app.api.deps import read_pixels
from app.catalog import ModelSpec
from app.catalog.custom import catalog_for
from app.engine import fastpath
from app.engine.batcher import Prediction
from app.engine.worker import Runner, WorkerConfig
from app.errors import ModelNotServedError
from app.middleware import RequestIdMiddleware
from app.responses import classify_result, compare_response, parse_models
from app.schemas import ClassifyResponse, CompareResponse, ModelsResponse
from app.settings import Settings

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
        self.spec: ModelSpec = catalog_for(self.settings.model_config_file).get(name)
        path = weights_mod.resolve(
            self.spec,
            self.settings.weights_dir,
            auto_download=self.settings.auto_download,
            allow_random=self.settings.allow_random_weights,
            mirror=self.settings.weights_mirror,
        )
        self.weights_label = "random" if path is None else (
            self.spec.weights_name if self.spec.source == "torchvision" else path.name
        )  # fmt: skip
        self.device = _device(self.settings)
        fast = fastpath.resolve(
            self.settings.precision, self.settings.channels_last, self.settings.compile, self.device
        )
        self.runner = Runner(
            WorkerConfig(0, self.device, fast.precision, fast.channels_last, fast.compile,
                         self.settings.threads_per_worker, self.settings.max_batch_size)
        )  # fmt: skip
        self.backend = self.runner.load(self.spec.load_plan(str(path) if path else None))
        self.precision = fast.precision
        batcher: Any = self.predict_batch  # the @serve.batch wrapper
        batcher.set_max_batch_size(self.settings.max_batch_size)
        batcher.set_batch_wait_timeout_s(self.settings.max_batch_wait_ms / 1000.0)

    def info(self) -> dict[str, Any]:
        return {"weights": self.weights_label, "device": self.device,
                "precision": self.precision, "backend": self.backend}  # fmt: skip

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[torch.Tensor, float]]) -> list[Prediction]:
        start_wall = time.time()
        t0 = time.perf_counter()
        batch = torch.stack([t for t, _ in items])
        probs = await asyncio.to_thread(self.runner.forward, self.spec.name, batch)
        ms = (time.perf_counter() - t0) * 1000.0
        return [
            Prediction(
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

    async def __call__(self, tensor: torch.Tensor, submitted: float) -> Prediction:
        result: Prediction = await self.predict_batch((tensor, submitted))
        return result


api = FastAPI(title="imgcls (Ray Serve)", description="The imgcls contract on Ray Serve.")
errors.install(api)
api.add_middleware(RequestIdMiddleware)
TopK = Annotated[int, Query(ge=1, le=20)]


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, backbones: dict[str, DeploymentHandle], settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        self.catalog = catalog_for(self.settings.model_config_file)
        self.backbones = backbones
        self.info: dict[str, dict[str, Any]] = {}

    async def _info(self, name: str) -> dict[str, Any]:
        if name not in self.info:
            self.info[name] = await self.backbones[name].info.remote()
        return self.info[name]

    def _served(self, name: str) -> ModelSpec:
        spec: ModelSpec = self.catalog.get(name)  # unknown names: 404 with the list
        if name not in self.backbones:
            raise ModelNotServedError(
                f"model {name!r} is in the catalog but not deployed; deployed: "
                f"{', '.join(self.backbones)}"
            )
        return spec

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(
        self, request: Request, model: str | None = None, top_k: TopK = 5
    ) -> ClassifyResponse:
        started = time.perf_counter()
        name = model or self.settings.default
        spec = self._served(name)
        pixels = await read_pixels(request, self.settings, [spec])
        pred = await self.backbones[name].remote(pixels.of(spec), time.time())
        info = await self._info(name)
        return classify_result(spec, info["weights"], pred, top_k, decode_ms=pixels.decode_ms,
                               preprocess_ms=pixels.preprocess_ms, started=started,
                               request_id=request.state.request_id)  # fmt: skip

    @api.post("/compare", response_model=CompareResponse)
    async def compare(
        self, request: Request, models: str | None = None, top_k: TopK = 5
    ) -> CompareResponse:
        started = time.perf_counter()
        names = parse_models(models, list(self.backbones))
        specs = [self._served(n) for n in names]
        pixels = await read_pixels(request, self.settings, specs)

        async def one(spec: ModelSpec) -> tuple[Prediction, float]:
            pred = await self.backbones[spec.name].remote(pixels.of(spec), time.time())
            return pred, time.perf_counter()

        done = await asyncio.gather(*(one(s) for s in specs))
        results = [
            classify_result(s, (await self._info(s.name))["weights"], p, top_k,
                            decode_ms=pixels.decode_ms, preprocess_ms=pixels.preprocess_ms,
                            started=started, finished=f,
                            request_id=request.state.request_id)
            for s, (p, f) in zip(specs, done, strict=True)
        ]  # fmt: skip
        return compare_response(specs, [p for p, _ in done], results, top_k,
                                decode_ms=pixels.decode_ms, started=started,
                                request_id=request.state.request_id)  # fmt: skip

    @api.get("/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        entries = []
        for spec in self.catalog.specs():
            entry = spec.catalog_entry()
            if spec.name in self.backbones:
                info = await self._info(spec.name)
                entry.update(status="ready", reason=None, **info)
            else:
                entry.update(status="not-loaded", reason="not deployed", device=None,
                             weights=None, precision=None, backend=None)  # fmt: skip
            entries.append(entry)
        return ModelsResponse.model_validate({"models": entries})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


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
        ).bind(name, shared)
        for name in settings.model_names
    }
    return Ingress.bind(backbones, shared)  # type: ignore[attr-defined]
