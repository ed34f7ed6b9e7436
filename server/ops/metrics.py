"""``GET /metrics``: the status board and this process's fan-out counters in Prometheus format.

Rendered by ``prometheus-client`` from a collector that reads the figures at scrape time, so the
numbers are the ones ``GET /status`` shows (the deployment's, as of the last status round) plus
this web process's own counters, which are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.live.hub import Hub
from server.ops.board import StatusBoard
from server.ops.judges import DEGRADED, DOWN, UP

STATES = (UP, DEGRADED, DOWN)


class TickpipeCollector(Collector):
    def __init__(self, board: StatusBoard, hub: Hub) -> None:
        self.board = board
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub, c = self.hub, self.hub.counters
        yield from _gauges(
            ("tickpipe_ws_connections", "Open WebSocket connections", len(hub.subscribers)),
            (
                "tickpipe_ws_subscriptions",
                "Symbol subscriptions over all connections",
                sum(len(s.symbols) for s in hub.subscribers),
            ),
            ("tickpipe_redis_pubsub_up", "1 if the pub/sub connection is up", int(hub.redis_up)),
        )
        for name, doc, value in (
            ("tickpipe_ws_frames_out", "WebSocket frames sent", c.frames_out),
            ("tickpipe_ws_ticks_out", "Tick events sent", c.ticks_out),
            ("tickpipe_ws_events_out", "Events and fragments sent", c.events_out),
            ("tickpipe_ws_conflations", "Times a connection began conflating", c.conflations),
            ("tickpipe_ws_conflated_quotes", "Quotes replaced before they were sent", c.conflated),
            ("tickpipe_ws_slow_consumer_closes", "Slow consumers closed (4008)", c.slow_closes),
            ("tickpipe_redis_pubsub_reconnects", "Pub/sub reconnects after a loss", hub.reconnects),
            ("tickpipe_redis_messages_in", "Pub/sub messages received", hub.messages_in),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        report = self.board.report
        if report is None:
            return
        state = GaugeMetricFamily(
            "tickpipe_service_state",
            "1 for the state each part is in (up, degraded, down)",
            labels=["service", "kind", "state"],
        )
        for part in report["services"]:
            for s in STATES:
                state.add_metric([part["id"], part["kind"], s], float(part["state"] == s))
        yield state
        yield from self._parts(report["services"])
        yield from self._symbols(report["symbols"])

    def _parts(self, parts: list[dict[str, Any]]) -> Iterator[Metric]:
        redis_latency = GaugeMetricFamily("tickpipe_redis_latency_seconds", "PING round trip")
        redis_memory = GaugeMetricFamily("tickpipe_redis_used_memory_bytes", "Redis used_memory")
        feed_rate = GaugeMetricFamily(
            "tickpipe_feed_ticks_per_second", "Ticks published per second", labels=["feed"]
        )
        feed_published = CounterMetricFamily(
            "tickpipe_feed_published", "Ticks published since the feed started", labels=["feed"]
        )
        feed_rejected = CounterMetricFamily(
            "tickpipe_feed_rejected", "Ticks rejected, by reason", labels=["feed", "reason"]
        )
        feed_age = GaugeMetricFamily(
            "tickpipe_feed_last_tick_age_seconds", "Age of the last tick", labels=["feed"]
        )
        rec_lag = GaugeMetricFamily("tickpipe_recorder_lag_seconds", "Recorder lag")
        rec_batches = GaugeMetricFamily("tickpipe_recorder_lag_batches", "Log entries waiting")
        rec_rows = CounterMetricFamily("tickpipe_recorder_rows_stored", "Rows stored (this run)")
        for p in parts:
            f = p["figures"]
            if p["kind"] == "redis" and "latency_ms" in f and p["state"] != DOWN:
                redis_latency.add_metric([], f["latency_ms"] / 1000)
                redis_memory.add_metric([], f["used_memory_bytes"])
            elif p["kind"] == "feed" and "rate" in f:
                name = p["id"].partition(":")[2]
                feed_rate.add_metric([name], f["rate"])
                feed_published.add_metric([name], f["published"])
                for reason, n in f["rejected"].items():
                    feed_rejected.add_metric([name, reason], n)
                if f.get("last_tick_age_s") is not None:
                    feed_age.add_metric([name], f["last_tick_age_s"])
            elif p["kind"] == "recorder" and "rows_stored" in f:
                rec_lag.add_metric([], f["lag_s"])
                rec_batches.add_metric([], f["lag_batches"])
                rec_rows.add_metric([], f["rows_stored"])
        yield from (redis_latency, redis_memory, feed_rate, feed_published, feed_rejected)
        yield from (feed_age, rec_lag, rec_batches, rec_rows)

    def _symbols(self, symbols: list[dict[str, Any]]) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "tickpipe_symbol_last_tick_age_seconds", "Age of the symbol's last tick", labels=["sym"]
        )
        stale = GaugeMetricFamily(
            "tickpipe_symbol_stale", "1 if the symbol is stale for its usual rate", labels=["sym"]
        )
        rate = GaugeMetricFamily(
            "tickpipe_symbol_ticks_per_second", "Ticks per second, last round", labels=["sym"]
        )
        for s in symbols:
            if s["age_s"] is not None:
                age.add_metric([s["sym"]], s["age_s"])
            stale.add_metric([s["sym"]], float(s["stale"]))
            rate.add_metric([s["sym"]], s["ticks_per_s"])
        yield from (age, stale, rate)


def _gauges(*rows: tuple[str, str, float]) -> Iterator[Metric]:
    for name, doc, value in rows:
        yield GaugeMetricFamily(name, doc, value=value)


def make_registry(board: StatusBoard, hub: Hub) -> CollectorRegistry:
    """A registry of its own (not the global one): tickpipe's collector plus process figures."""
    registry = CollectorRegistry()
    registry.register(TickpipeCollector(board, hub))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
