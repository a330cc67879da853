"""Prometheus metrics, one registry per app (tests build several apps in one process)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swapserve_requests",
            "Generation requests by model (base or adapter), endpoint and outcome.",
            ["model", "endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "swapserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "swapserve_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "swapserve_time_to_first_token_seconds",
            "From request accepted to first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "swapserve_request_seconds",
            "From request accepted to last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "swapserve_decode_tokens_per_second",
            "Completion tokens / decode time, per request.",
            ["model"],
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.adapter_events = Counter(
            "swapserve_adapter_events",
            "Adapter registry events (registered, loaded, evicted, unloaded).",
            ["adapter", "event"],
            registry=r,
        )
        self._engine_gauges: dict[str, Gauge] = {}
        self._engine_stats: Callable[[], dict[str, float]] | None = None

    def watch_engine(self, stats: Callable[[], dict[str, float]]) -> None:
        """Engine numbers are read at scrape time, not pushed."""
        self._engine_stats = stats

    def render(self) -> bytes:
        if self._engine_stats is not None:
            for key, value in self._engine_stats().items():
                gauge = self._engine_gauges.get(key)
                if gauge is None:
                    gauge = Gauge(
                        f"swapserve_engine_{key}", f"Engine: {key}.", registry=self.registry
                    )
                    self._engine_gauges[key] = gauge
                gauge.set(value)
        return generate_latest(self.registry)


class MetricsHistory:
    """The last minutes of the engine's counters, sampled every `interval_s`: what the
    console's Server page draws (tokens/s, queue depth, batch size). Rates are the
    difference between two samples, so nothing is averaged over the process's life."""

    def __init__(self, interval_s: float = 5.0, keep: int = 180):
        self.interval_s = interval_s
        self.samples: deque[dict[str, float]] = deque(maxlen=keep)
        self._last: tuple[float, dict[str, float]] | None = None

    def sample(self, stats: dict[str, float], requests_total: float, now: float) -> None:
        current = {**stats, "requests_total": requests_total}
        if self._last is not None:
            then, prev = self._last
            dt = max(now - then, 1e-6)

            def rate(key: str) -> float:
                return max(0.0, float(current.get(key, 0.0)) - float(prev.get(key, 0.0))) / dt

            self.samples.append(
                {
                    "time": now,
                    "completion_tokens_per_s": round(rate("generated_tokens"), 3),
                    "prompt_tokens_per_s": round(rate("prompt_tokens"), 3),
                    "requests_per_s": round(rate("requests_total"), 4),
                    "queue_depth": float(stats.get("queue_depth", 0.0)),
                    "running": float(stats.get("running", 0.0)),
                    "batch_size": float(stats.get("batch_size", 0.0)),
                }
            )
        self._last = (now, current)

    def view(self) -> dict[str, object]:
        return {
            "object": "metrics.history",
            "interval_s": self.interval_s,
            "data": list(self.samples),
        }


def requests_total(metrics: ServerMetrics) -> float:
    """Generation requests finished so far, every model and outcome."""
    total = 0.0
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                total += s.value
    return total
