"""Typed settings: the one place configuration is read (env prefix ``TICKPIPE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SYMBOLS = (
    "AAPL,MSFT,NVDA,AMZN,GOOGL,META,TSLA,AVGO,JPM,V,UNH,XOM,JNJ,WMT,MA,PG,HD,COST,NFLX,AMD"
)


class Settings(BaseSettings):
    """Every knob of every tickpipe process. Read once, passed down."""

    model_config = SettingsConfigDict(env_prefix="TICKPIPE_", env_file=".env", extra="ignore")

    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = Field(64, ge=2, description="per process; bursts wait for one")
    data_dir: Path = Path("data")

    # Web process
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None  # printed in the banner; defaults to http://host:port

    # Feed (simulator)
    symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: DEFAULT_SYMBOLS.split(",")
    )
    feed_rate: float = Field(2000.0, gt=0, description="ticks per second, all symbols together")
    feed_batch_ms: int = Field(10, ge=1, le=1000)
    feed_seed: int = 7
    feed_name: str = "sim"
    history_per_symbol: int = Field(100_000, ge=100, description="events kept per symbol in Redis")
    log_max_batches: int = Field(
        500_000,
        ge=1000,
        description="batches kept in the tickerplant log (tp:log) for the recorder",
    )

    # Recorder
    recorder_flush_s: float = Field(1.0, gt=0, description="longest a tick waits to be stored")
    recorder_batch: int = Field(2000, ge=1, description="log entries per read and per flush")
    compact_every_s: float = Field(30.0, gt=0, description="how often small files are merged")
    compact_min_files: int = Field(
        16, ge=2, description="small files in a row of one day before they are merged"
    )
    compact_target_rows: int = Field(
        2_000_000, ge=64, description="rows a merged file aims at (bounds compaction memory)"
    )
    compact_grace_s: float = Field(
        120.0, ge=0, description="how long merged-away files stay for queries already reading"
    )

    # History queries
    history_query_memory_mb: int = Field(
        1024,
        ge=64,
        description="DuckDB memory for a web process's history queries together; bigger sorts "
        "spill to <data_dir>/tmp",
    )
    history_tail_max_batches: int = Field(
        20_000,
        ge=1,
        description="log entries not yet recorded that a history query reads from Redis "
        "(a range up to now has no hole while the recorder is at most this far behind)",
    )

    # WebSocket fan-out limits
    heartbeat_s: float = Field(10.0, gt=0)
    auth_timeout_s: float = Field(5.0, gt=0)
    ws_compression: bool = Field(
        False,
        description="permessage-deflate for clients that offer it: costs CPU per connection and "
        "undoes encode-once fan-out",
    )
    web_workers: int = Field(1, ge=1, description="uvicorn worker processes for `tickpipe web`")
    ws_ping_interval_s: float = Field(20.0, gt=0)
    ws_ping_timeout_s: float = Field(20.0, gt=0)
    conflate_bytes: int = Field(
        256 * 1024, ge=1024, description="buffer size where quotes conflate"
    )
    max_buffer_bytes: int = Field(4 * 1024 * 1024, ge=4096, description="slow-consumer limit")
    flush_ms: float = Field(
        5.0, ge=0, description="ticks for a connection are sent at most this often (0: at once)"
    )
    max_frame_bytes: int = Field(256 * 1024, ge=1024, description="largest outbound frame")
    max_inbound_bytes: int = Field(64 * 1024, ge=256, description="largest client message")
    max_symbols_per_conn: int = Field(1000, ge=1)
    max_msgs_per_s: float = Field(20.0, gt=0, description="client messages per second")
    max_conns_per_key: int = Field(100, ge=1)
    slow_close_timeout_s: float = Field(
        5.0, gt=0, description="how long a closing client gets to take its last error frame"
    )
    key_refresh_s: float = Field(1.0, gt=0, le=1.0, description="how often keys are re-read")
    query_log_max: int = Field(
        100_000, ge=100, description="query history records held in memory before SQLite"
    )

    # Replay (WebSocket) and resume
    max_replays_per_conn: int = Field(64, ge=1, description="replays running at once per socket")
    replay_buffer_bytes: int = Field(
        128 * 1024,
        ge=1024,
        description="most replay bytes queued for a socket; a replay waits for the client past it",
    )
    replay_window_rows: int = Field(
        200_000, ge=1000, description="target rows per history query of a replay (bounds memory)"
    )

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            return [s.strip().upper() for s in value.split(",") if s.strip()]
        return value

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def keys_db(self) -> Path:
        return self.data_dir / "keys.sqlite3"

    @property
    def queries_db(self) -> Path:
        return self.data_dir / "queries.sqlite3"

    def limits(self) -> dict[str, float | int]:
        """The limits a client is told about in ``welcome``."""
        return {
            "max_symbols": self.max_symbols_per_conn,
            "max_msgs_per_s": self.max_msgs_per_s,
            "max_conns_per_key": self.max_conns_per_key,
            "max_inbound_bytes": self.max_inbound_bytes,
            "max_buffer_bytes": self.max_buffer_bytes,
            "conflate_bytes": self.conflate_bytes,
            "max_replays": self.max_replays_per_conn,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
