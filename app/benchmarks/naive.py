"""The naive baseline: the typical hand-written service. One request runs one fp32 eager forward
in a thread; no batching, no worker process, no reduced precision.

    python -m app.benchmarks.naive --model resnet50 --port 8001
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from app.catalog import build_catalog


def make_app(model_name: str, device: str) -> FastAPI:
    spec = build_catalog().get(model_name)
    model = spec.builder().eval().to(device)
    app = FastAPI()

    def predict(data: bytes) -> list[dict[str, object]]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        x = spec.transform(img).unsqueeze(0).to(device)
        with torch.inference_mode():
            probs = torch.softmax(model(x), 1)[0].cpu()
        top = torch.topk(probs, 5)
        return [
            {"label": spec.labels[i], "score": float(s)}
            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/classify")
    async def classify(file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008
        data = await file.read()
        return {"predictions": await run_in_threadpool(predict, data), "batch_size": 1}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    uvicorn.run(
        make_app(args.model, args.device), host="127.0.0.1", port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
