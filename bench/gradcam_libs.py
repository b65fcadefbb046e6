"""Grad-CAM libraries side by side: ms per explanation, as app/engine/explain.py's docstring cites.

    python bench/gradcam_libs.py [--threads 1] [--repeats 15]

Captum (what imgcls uses, through ``app.engine.explain.explain``) against ``grad-cam``
(jacobgil/pytorch-grad-cam) when it is importable; grad-cam is not an imgcls dependency, so
install it somewhere apart to compare (``pip install --target /tmp/gc grad-cam`` and
``PYTHONPATH`` after the venv's own packages, or a scratch venv). Both produce the top-1 class's
map at the input resolution from the same model and layer, random weights (speed does not depend
on them). Prints the median and the fastest of ``--repeats`` runs after two warm-ups.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.catalog.cifar import cifar_resnet
from app.engine.explain import default_cam_layer, explain


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times)


def cases() -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    r18 = resnet18(weights=None).eval()
    r56 = cifar_resnet(56).eval()
    return [
        ("resnet18 224px x1", r18, default_cam_layer("resnet18", r18), torch.randn(1, 3, 224, 224)),
        ("cifar10_resnet56 32px x1", r56, "layer3", torch.randn(1, 3, 32, 32)),
        ("cifar10_resnet56 32px x200", r56, "layer3", torch.randn(200, 3, 32, 32)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        GradCAM = None
        print("grad-cam not importable: timing captum only")
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32 eager, CPU")
    print(f"{'case':28} {'library':8} {'median ms':>10} {'min ms':>8} {'ms/image':>9}")
    for name, model, layer, x in cases():
        n = x.shape[0]
        for p in model.parameters():  # as in the worker
            p.requires_grad_(False)
        med, low = timed(lambda m=model, x=x, la=layer: explain(m, x, la), args.repeats)
        print(f"{name:28} {'captum':8} {med:10.1f} {low:8.1f} {med / n:9.2f}")
        if GradCAM is not None:
            # grad-cam backpropagates a loss with .backward(): it needs parameters that require
            # gradients (the worker's do not), and then computes every weight's gradient too.
            for p in model.parameters():
                p.requires_grad_(True)
            cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])
            med, low = timed(lambda c=cam, x=x: c(input_tensor=x, targets=None), args.repeats)
            print(f"{name:28} {'grad-cam':8} {med:10.1f} {low:8.1f} {med / n:9.2f}")
            for p in model.parameters():
                p.requires_grad_(False)


if __name__ == "__main__":
    main()
