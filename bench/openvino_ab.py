"""imgcls on OpenVINO's runtime against OpenVINO alone, model-only, in alternating blocks within
one process (the bench table measures them minutes apart, on machines whose speed drifts).

- imgcls: ``app.engine.openvino.OpenVINOModel`` as a CPU worker runs it: one batch at a time,
  uint8 pixels in, softmax out, split in halves over two streams where it pays;
- OpenVINO alone: the bench table's peer (app/benchmarks/openvino_peer.py): the same converted
  graph at a static batch size, THROUGHPUT hint, an async queue of the size OpenVINO recommends.

resnet50 with random weights, per batch size; prints the medians and writes every block as JSON.

    .venv/bin/python bench/openvino_ab.py --precision bf16 --out docs/bench/x.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import openvino as ov
import torch
from torchvision.models import resnet50

from app.benchmarks.openvino_peer import best_precision, queue_rate, throughput_queue
from app.engine.openvino import OpenVINOModel
from app.engine.worker import NormalizingModel

HINTS = {"fp32": "f32", "bf16": "bf16"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", choices=sorted(HINTS), default="bf16")
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="openvino-ab.json")
    args = p.parse_args()
    torch.manual_seed(0)
    net = NormalizingModel(resnet50().eval(), MEAN, STD, torch.float32, False).eval()
    core = ov.Core()
    precision = args.precision
    if precision == "bf16" and best_precision(core) != "bf16":
        precision = "fp32"  # what either would run here
    mine = OpenVINOModel(net, 224, precision, args.threads)
    with torch.no_grad():
        graph = ov.convert_model(net, example_input=torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    result: dict[str, object] = {"precision": precision, "openvino": ov.__version__}
    for batch in [int(b) for b in args.batches.split(",")]:
        static = graph.clone()
        static.reshape([batch, 3, 224, 224])
        queue = throughput_queue(core, static, HINTS[precision])
        x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)

        alone = functools.partial(queue_rate, queue, x.numpy(), args.seconds)

        def imgcls(x: torch.Tensor = x) -> float:
            """Images/s of imgcls's model on ``x``, one batch at a time, after one warm-up."""
            with torch.inference_mode():
                mine(x)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    mine(x)
                    n += len(x)
            return n / (time.perf_counter() - start)

        rates: dict[str, list[float]] = {"imgcls": [], "openvino": []}
        for rnd in range(args.rounds):
            order = [("imgcls", imgcls), ("openvino", alone)]
            for name, fn in order if rnd % 2 == 0 else reversed(order):
                rates[name].append(round(fn(), 1))
        medians = {name: float(np.median(v)) for name, v in rates.items()}
        ratio = medians["imgcls"] / medians["openvino"]
        print(
            f"batch {batch}: images/s median {medians}, imgcls / OpenVINO {ratio:.3f}", flush=True
        )
        result[f"batch_{batch}"] = {
            "images_per_s": rates,
            "median": medians,
            "ratio": round(ratio, 3),
        }
        del alone, queue
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
