"""The peer: LitServe serving the same model, with the same precision and engine path as imgcls
(the same Runner), and its own dynamic batching.

    python -m app.benchmarks.litserve_peer --model resnet50 --port 8002
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls
import torch
from PIL import Image

from app.catalog import build_catalog
from app.engine.worker import Runner, WorkerConfig
from app.settings import Settings


class ClassifierAPI(ls.LitAPI):
    def __init__(
        self, model_name: str, precision: str, max_batch_size: int, batch_timeout: float
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/classify"
        )
        self.model_name = model_name
        self.precision = precision

    def setup(self, device: str) -> None:
        self.spec = build_catalog().get(self.model_name)
        # the settings of imgcls's servers in the same run; LitServe forms batches up to its own
        # max_batch_size, so every size keeps its graph
        cfg = WorkerConfig.from_settings(
            Settings(), device, auto_batch=False, precision=self.precision,
            warmup_batch=self.max_batch_size,
        )  # fmt: skip
        self.runner = Runner(cfg)
        self.runner.load(self.spec.load_plan(None))

    def decode_request(self, request: dict[str, str]) -> torch.Tensor:
        # LitServe passes requests to its inference workers through a multiprocessing queue, and
        # a multipart form (an UploadFile) does not pickle there; its way is JSON, so the same
        # JPEG bytes arrive base64-encoded.
        data = base64.b64decode(request["image"])
        # uint8 pixels, normalised by the Runner, as in imgcls
        return self.spec.transform.pixels(Image.open(io.BytesIO(data)).convert("RGB"))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.forward(self.model_name, x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict[str, Any]:
        top = torch.topk(probs, 5)
        return {
            "predictions": [
                {"label": self.spec.labels[i], "score": float(s)}
                for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.005)
    args = p.parse_args()
    api = ClassifierAPI(args.model, args.precision, args.max_batch_size, args.batch_timeout)
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
