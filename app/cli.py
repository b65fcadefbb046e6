"""`imgcls serve | weights pull | weights list | eval | bench`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from app.settings import Settings

    # the settings first: a mistyped variable is refused in a fraction of a second, before
    # torch and the model catalog are imported (seconds) for the checks that need them
    settings = Settings()

    import uvicorn

    from app.limits import server_options
    from app.service import check_startup

    check_startup(settings)
    # Header timeout and size cap, keep-alive, graceful shutdown: one place (app/limits.py).
    uvicorn.run("app.main:app", host=args.host, port=args.port, **server_options(settings))
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _no_less_than_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _counts(text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers of at least 1 (client counts, batch sizes)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one number")
    return tuple(_positive(p) for p in parts)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _weights(args: argparse.Namespace) -> int:
    import signal

    from app import weights

    # stopped mid-download (SIGTERM), the download unwinds and removes its temporary file
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from app.catalog import UnknownModelError, build_catalog
    from app.settings import Settings

    settings = Settings()
    weights_dir = Path(args.dir) if args.dir else settings.weights_dir
    mirror = args.mirror or settings.weights_mirror
    catalog = build_catalog()
    if args.action == "list":
        print(f"{'model':<24} {'status':<8} {'size':>10}  file")
        # and the published int8 variants, which /models lists only when served
        listed = [*catalog.specs(), *(catalog.get(n) for n in catalog.int8_names())]
        for spec in listed:
            st = weights.status(spec, weights_dir)
            if st.file is None:
                print(f"{spec.name:<24} {'-':<8} {'':>10}  (no published weights)")
                continue
            size = f"{st.size_bytes / 1e6:.1f} MB" if st.size_bytes else ""
            print(
                f"{spec.name:<24} {'present' if st.present else 'missing':<8} {size:>10}  {st.file}"
            )
        return 0
    failed = 0
    for name in args.names:
        try:
            spec = catalog.get(name)
            path = weights.pull(spec, weights_dir, mirror=mirror, progress=not args.quiet)
            checked = (
                "sha256 verified"
                if spec.sha256_prefix
                else "not verified: no sha256 is published in its file name"
            )
            print(f"{name}: {path} ({checked})")
        except (UnknownModelError, weights.WeightsError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _eval(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError("--models names no model")
    from app.evaluate import run_eval

    reports = run_eval(
        Path(args.data), models, args.url, args.limit, args.concurrency, Path(args.out)
    )
    for r in reports:
        print(
            f"{r.model:<22} top-1 {r.top1:6.2f}%  top-5 {r.top5:6.2f}%  "
            f"{r.images_per_s:8.1f} img/s  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms"
            + (f"  ({r.skipped} files refused and left out)" if r.skipped else "")
        )
        for example in r.skipped_examples:
            print(f"    refused: {example}")
    print(f"reports written to {args.out}/report.json, report.md, report.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import signal

    from app.benchmarks.common import check_plan

    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    images = Path(args.images) if args.images else None
    # what can be refused without torch is refused before it loads (seconds)
    check_plan(servers, args.max_batch, args.model_seconds, images, Path(args.out))
    from app.benchmarks.harness import run_bench

    # The servers run in sessions of their own (so that they can be stopped whole): stopped by
    # SIGTERM (a time limit), the benchmark unwinds and stops them instead of leaving them up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    run_bench(
        model=args.model,
        device=args.device,
        precision=args.precision,
        concurrency=args.concurrency,
        duration_s=args.duration,
        batch_sizes=args.batch_sizes,
        servers=servers,
        max_batch=args.max_batch,
        api_workers=args.api_workers,
        client_processes=args.client_processes,
        model_seconds=args.model_seconds,
        out=Path(args.out),
        image_sets=tuple(s.strip() for s in args.image_sets.split(",") if s.strip()),
        model_precisions=tuple(p.strip() for p in args.model_precisions.split(",") if p.strip()),
        openvino=not args.no_openvino,
        warmup_s=args.warmup,
        images=images,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgcls", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (configured by IMGCLS_* variables)")
    s.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    # PORT is read here but checked only when serve runs (argparse converts a string default
    # when it is used): a bad PORT does not break `imgcls --help` or `imgcls weights`
    s.add_argument("--port", type=_port, default=os.environ.get("PORT", "8000"))
    s.set_defaults(func=_serve)

    w = sub.add_parser("weights", help="download, verify and list checkpoints")
    wsub = w.add_subparsers(dest="action", required=True)
    pull = wsub.add_parser("pull", help="download and verify checkpoints by model name")
    pull.add_argument("names", nargs="+")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    lst = wsub.add_parser("list", help="show which checkpoints are present and how big")
    for sp in (pull, lst):
        sp.add_argument("--dir", help="weights folder (default IMGCLS_WEIGHTS_DIR or ./weights)")
        sp.add_argument("--mirror", help="base URL to download from instead of the publisher's")
        sp.set_defaults(func=_weights)

    e = sub.add_parser("eval", help="accuracy and latency per model on an ImageFolder tree")
    e.add_argument("--data", required=True, help="one subfolder per class, named by its label")
    e.add_argument("--models", required=True, help="comma-separated model names")
    e.add_argument("--url", help="a running service (default: start one in-process)")
    e.add_argument("--limit", type=_positive, help="at most N images (balanced over classes)")
    e.add_argument("--concurrency", type=_positive, default=8)
    e.add_argument("--out", default="report", help="folder for report.json/.md/.png")
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="model-only ceiling, imgcls, a naive baseline and LitServe")
    b.add_argument("--model", default="resnet50")
    b.add_argument("--device", default="cpu", help="cpu or cuda:N")
    b.add_argument("--precision", default="auto")
    b.add_argument("--concurrency", type=_counts, default="1,4,16,32",
                   help="client counts to sweep")  # fmt: skip
    b.add_argument("--duration", type=_seconds, default=6.0, help="seconds measured per level")
    b.add_argument("--warmup", type=_no_less_than_zero, default=2.0,
                   help="unmeasured seconds per level")  # fmt: skip
    b.add_argument("--batch-sizes", type=_counts, default="1,8,16,32",
                   help="model-only batch sweep")  # fmt: skip
    b.add_argument(
        "--image-sets", default="small,imagenet,phone", help="upload sizes (small ~160 px, "
        "imagenet ~500x375, phone 4032x3024), generated from the photos in --images"
    )  # fmt: skip
    b.add_argument(
        "--images", default=os.environ.get("IMGCLS_BENCH_IMAGES"),
        help="folder of photos the upload sets are made from (default IMGCLS_BENCH_IMAGES, or "
        "../shared/data/images beside a source checkout)",
    )  # fmt: skip
    b.add_argument(
        "--model-precisions", default="", help="more model-only precisions (fp32,bf16,int8)"
    )
    b.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO peer")
    b.add_argument(
        "--servers", default="imgcls,naive,litserve", help="imgcls, imgcls-int8, naive, litserve"
    )
    b.add_argument(
        "--max-batch",
        type=_positive,
        help="service batch limit (default: the best model-only batch of each engine: the "
        "int8 server's is int8's)",
    )
    b.add_argument("--api-workers", type=_positive, default=1, help="imgcls API processes")
    b.add_argument("--client-processes", type=_positive, default=1,
                   help="load generator processes")  # fmt: skip
    b.add_argument("--model-seconds", type=_no_less_than_zero, default=3.0,
                   help="per model-only batch size (0: no model-only sweep)")  # fmt: skip
    b.add_argument("--out", default="bench-results")
    b.set_defaults(func=_bench)
    return p


def _one_line(exc: Exception) -> str:
    """A settings error as the user wrote it: ``IMGCLS_NAME: why (got 'value')``, one line
    (pydantic's own text takes four lines per error, with a link)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    said = []
    for e in exc.errors(include_url=False):
        if e["type"] == "value_error":  # our validators' own words name the variable
            said.append(str(e.get("ctx", {}).get("error", e["msg"])))
            continue
        field = ".".join(str(part) for part in e["loc"])
        name = field if field.startswith("IMGCLS_") else f"IMGCLS_{field.upper()}"
        got = f" (got {e['input']!r})" if isinstance(e.get("input"), str | int | float) else ""
        said.append(f"{name}: {e['msg']}{got}" if field else f"{e['msg']}{got}")
    return "; ".join(said)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TimeoutError) as exc:
        print(f"imgcls: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: what was kept, if anything, not a traceback
        print("imgcls: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
