"""OpenVINO's CPU plugin inside a worker: one stream on the worker's two threads against the
same batch split over two one-thread streams (two infer requests of one compiled model, as
OpenVINO's THROUGHPUT hint runs), resnet50, per batch size, in alternating blocks within one
process. IMGCLS_CPU_RUNTIME=openvino compiles both and splits the batches that
``app.engine.openvino.in_halves`` names; this measures where the split pays.
``--graph imgcls`` (the default) converts the model as imgcls does (``NormalizingModel``: uint8
pixels in, softmax out); ``--graph plain`` torchvision's model alone, float input.
``--precision int8``: torchvision's quantizable resnet50, quantized (random weights), converted
as imgcls converts ``resnet50:int8``, its float parts at bf16 (imgcls graph only). Prints
images/s per block and writes them as JSON (docs/PERFORMANCE.md, the AMX section).

    .venv/bin/python bench/openvino_streams.py --precision bf16 --out streams.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import openvino as ov
import torch
from torchvision.models import resnet50

from app.engine.quantize import published_int8
from app.engine.worker import NormalizingModel

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}  # int8: its float parts at bf16


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", choices=sorted(HINTS), default="bf16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batches", default="1,3,4,6,8,16,32")
    p.add_argument("--graph", choices=["imgcls", "plain"], default="imgcls")
    p.add_argument("--out", default="openvino-streams.json")
    args = p.parse_args()
    if args.precision == "int8" and args.graph != "imgcls":
        p.error("--precision int8 runs imgcls's graph only")
    core = ov.Core()
    torch.manual_seed(0)
    if args.graph == "imgcls":
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        # int8: torchvision's quantizable resnet50 (random weights, quantized as published
        # weights are), converted as IMGCLS_CPU_RUNTIME=openvino converts resnet50:int8
        body = published_int8("resnet50") if args.precision == "int8" else resnet50().eval()
        net = NormalizingModel(body, mean, std, torch.float32, False).eval()
        example = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    else:
        net, example = resnet50().eval(), torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        model = ov.convert_model(net, example_input=example)
    model.reshape([-1, 3, 224, 224])

    def compiled(streams: int) -> list:
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[args.precision],
            "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": 2,
            "ENABLE_CPU_PINNING": False,
        }
        c = core.compile_model(model, "CPU", config)
        return [c.create_infer_request() for _ in range(streams)]

    one, two = compiled(1), compiled(2)

    def run_one(x: np.ndarray) -> np.ndarray:
        return one[0].infer({0: x})[0]

    def run_two(x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:
            return two[0].infer({0: x})[0]
        for request, part in zip(two, np.array_split(x, 2), strict=True):
            request.start_async({0: part})
        outs = []
        for request in two:
            request.wait()
            outs.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(outs)

    runs = {"one stream, 2 threads": run_one, "two streams, 1 thread each": run_two}
    result: dict[str, object] = {
        "precision": args.precision,
        "graph": args.graph,
        "openvino": ov.__version__,
    }
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        if args.graph == "imgcls":
            x = rng.integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
        else:
            x = rng.random((batch, 3, 224, 224), dtype=np.float32)
        diff = float(np.abs(run_one(x) - run_two(x)).max())
        rates: dict[str, list[float]] = {name: [] for name in runs}
        passes = max(10, 80 // batch)
        for rnd in range(args.rounds):
            order = list(runs.items()) if rnd % 2 == 0 else list(reversed(runs.items()))
            for name, fn in order:
                for _ in range(2):
                    fn(x)
                t0 = time.perf_counter()
                for _ in range(passes):
                    fn(x)
                rates[name].append(round(batch * passes / (time.perf_counter() - t0), 1))
        medians = {name: float(np.median(v)) for name, v in rates.items()}
        print(f"batch {batch}: max abs difference {diff:.2e}; images/s median {medians}")
        result[f"batch_{batch}"] = {"max_abs_difference": diff, "images_per_s": rates}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
