"""Prometheus metrics, one registry per app (tests build several apps in one process)."""

from __future__ import annotations

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
