"""Prometheus text-format metrics of the service: request counts by status, verdicts, latency and batch-size
histograms, queue depth, in-flight requests and readiness."""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """A Prometheus histogram: per-bucket counts (rendered cumulative), sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket`` (cumulative, ``+Inf`` last), ``_sum`` and ``_count`` lines."""
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {cum}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    """Prometheus counters/histograms, updated only from the event loop thread (no locking needed)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.verdicts = {"OK": 0, "NG": 0, "review": 0}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def count_request(self, status: int, seconds: float) -> None:
        """One finished ``/v1/inspect`` request."""
        key = str(status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.observe(seconds)

    def render(self, queue_depth: int, inflight: int, ready: bool) -> str:
        """Text exposition format 0.0.4."""

        def head(name: str, kind: str, text: str) -> list[str]:
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

        lines = head("imganom_requests_total", "counter", "Inspection requests by HTTP status.")
        lines += [f'imganom_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += head("imganom_verdicts_total", "counter", "Inspected images by verdict.")
        lines += [f'imganom_verdicts_total{{verdict="{v}"}} {n}' for v, n in self.verdicts.items()]
        lines += head("imganom_request_latency_seconds", "histogram", "Inspection request latency.")
        lines += self.latency.lines("imganom_request_latency_seconds")
        lines += head("imganom_batch_size", "histogram", "Images per device batch.")
        lines += self.batch_size.lines("imganom_batch_size")
        lines += head("imganom_queue_depth", "gauge", "Decoded images waiting for the device.")
        lines.append(f"imganom_queue_depth {queue_depth}")
        lines += head("imganom_inflight_requests", "gauge", "Inspection requests being handled.")
        lines.append(f"imganom_inflight_requests {inflight}")
        lines += head("imganom_ready", "gauge", "1 when the model is loaded and warmed up.")
        lines.append(f"imganom_ready {int(ready)}")
        return "\n".join(lines) + "\n"
