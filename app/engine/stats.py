"""Per-model inference statistics, as Triton's statistics extension reports them.

One ``ModelStats`` per model's batcher (kept on its event loop: no lock), reset when the model is
loaded again, as Triton's are. The unit is the image: a request of N images counts N, as N
requests of one image would (the batcher sees images, not requests).

- ``success``: images answered, from joining the queue to their answer;
- ``fail``: images that failed after joining the queue (a file the worker could not decode,
  a deadline passed, a client gone, a failed batch), from joining the queue to their failure;
- ``queue``: answered images, from joining the queue to their forward pass starting;
- ``compute_input``: answered images, decoding and preprocessing in the worker (zero for pixels
  that came ready, or decoded in the API process);
- ``compute_infer``: answered images, their batch's forward pass;
- ``compute_output``: answered images, from their batch's answer reaching this process to the
  images' answers being handed on;
- ``batch_stats``: per batch size, batches run and their total compute_input, compute_infer and
  compute_output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    inference_count: int = 0  # images computed
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # ms since the epoch, when the last batch was answered
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def batch_ran(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """A batch of ``size`` computed images (failed decodes not counted)."""
        if size <= 0:
            return
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        b = self.batches.setdefault(size, BatchStats())
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def image_answered(
        self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def image_failed(self, total_ns: int) -> None:
        self.fail.add(total_ns)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` (REST JSON; the gRPC message has the same fields)."""
        none = Duration().as_dict()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": none,  # no response cache
                "cache_miss": none,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
            "response_stats": {},
        }
