"""Typed settings: the one place configuration is read (env prefix ``TICKPIPE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SYMBOLS = (
    "AAPL,MSFT,NVDA,AMZN,GOOGL,META,TSLA,AVGO,JPM,V,UNH,XOM,JNJ,WMT,MA,PG,HD,COST,NFLX,AMD"
)


class Settings(BaseSettings):
    """Every knob of every tickpipe process. Read once, passed down."""

    model_config = SettingsConfigDict(env_prefix="TICKPIPE_", env_file=".env", extra="ignore")

    # Redis. Unless TICKPIPE_REDIS_URL names one, every process uses the project's own Redis on
    # redis_port, which `tickpipe redis` (so `make run`) starts with its data under data_dir.
    redis_port: int = Field(6380, ge=1, le=65535, description="port of tickpipe's own Redis")
    redis_url: str = Field(
        default_factory=lambda given: f"redis://127.0.0.1:{given['redis_port']}/0"
    )
    redis_max_connections: int = Field(64, ge=2, description="per process; bursts wait for one")
    # A Redis Cluster: TICKPIPE_REDIS_URL names any node, or several seed nodes comma-separated.
    redis_mode: Literal["standalone", "cluster"] = Field(
        "standalone", description="standalone: one Redis; cluster: a Redis Cluster (Redis >= 7)"
    )
    redis_slot_groups: int = Field(
        16,
        ge=1,
        le=1024,
        description="cluster only: symbols are spread over this many hash tags (slots), each "
        "with its own tickerplant log; fixed for the life of a deployment's Redis data",
    )
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
    # Live venue sources (`tickpipe feed --source NAME`)
    alpaca_key_id: SecretStr | None = Field(None, description="Alpaca market-data key id")
    alpaca_secret_key: SecretStr | None = Field(None, description="Alpaca market-data secret")
    source_backoff_min_s: float = Field(
        0.5, gt=0, description="first wait before reconnecting to a venue (doubles, jittered)"
    )
    source_backoff_max_s: float = Field(30.0, gt=0, description="longest wait between reconnects")
    source_lifetime_s: float | None = Field(
        None, gt=0, description="planned reconnect after this long (default: the venue's limit)"
    )
    source_silence_s: float | None = Field(
        None, gt=0, description="reconnect after this long without a message (default: venue's)"
    )
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
        "spill to <data_dir>/tmp. A raw-tick query whose stretches of overlapping files need "
        "more than this is answered by DuckDB",
    )
    history_merge: bool = Field(
        True,
        description="answer raw-tick queries by merging the store's sorted files (false: "
        "every query in DuckDB SQL, as before the merge existed)",
    )
    history_cache_mb: int = Field(
        256,
        ge=0,
        description="recently read symbol slices of stored files a web process keeps decoded, "
        "for queries of a few symbols (0: none)",
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
        5.0,
        gt=0,
        description="how long a closing client gets to take its last error frame and to "
        "complete the close; then its TCP connection is aborted",
    )
    request_head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="how long an HTTP request line and headers may take to arrive complete "
        "(else 408 and the connection is closed)",
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
    replay_conn_rows: int = Field(
        400_000,
        ge=1000,
        description="rows of stored history the replays of one socket hold together; each of n "
        "running replays reads windows of 1/n of it (bounds a socket's memory)",
    )

    # MCP (``/mcp`` and ``tickpipe mcp``)
    key: str | None = Field(
        None, description="the API key `tickpipe mcp` (stdio) serves its agent with (TICKPIPE_KEY)"
    )
    mcp_throttle_ms: int = Field(
        1000,
        ge=50,
        le=60_000,
        description="a subscribed MCP client hears about a tick:// resource at most this often",
    )
    mcp_max_rows: int = Field(
        500, ge=10, le=10_000, description="rows an MCP tool answers inline at most (bars, gaps)"
    )
    mcp_session_idle_s: float = Field(
        1800.0, gt=0, description="a 2025-protocol MCP HTTP session with no request this long ends"
    )

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            return [s.strip().upper() for s in value.split(",") if s.strip()]
        return value

    @model_validator(mode="after")
    def _check_redis(self) -> Settings:
        if self.redis_mode == "cluster" and "redis_url" not in self.model_fields_set:
            raise ValueError(
                "TICKPIPE_REDIS_MODE=cluster needs TICKPIPE_REDIS_URL: any node of the cluster "
                "(redis://host:port) or several seed nodes, comma-separated"
            )
        if self.redis_mode == "standalone" and "," in self.redis_url:
            raise ValueError(
                "TICKPIPE_REDIS_URL lists several nodes; set TICKPIPE_REDIS_MODE=cluster for a "
                "Redis Cluster, or give one redis:// URL"
            )
        return self

    @property
    def cluster(self) -> bool:
        return self.redis_mode == "cluster"

    @property
    def own_redis(self) -> bool:
        """True when the processes use tickpipe's own Redis (TICKPIPE_REDIS_URL not given)."""
        return "redis_url" not in self.model_fields_set

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
