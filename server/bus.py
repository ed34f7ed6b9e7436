"""The Redis wire format: key and channel names, the atomic publish script, and event encoding.

Everything that knows how tickpipe lays data out in Redis lives here, so the feed, the hub and
the REST routes agree by construction.

Per symbol ``S``:

* ``tp:sym:S``   hash: ``epoch``, ``seq`` (last assigned), ``trade``, ``quote`` (latest events)
* ``tp:hist:S``  stream of recent events; entry id ``<first seq>-0``, fields ``n`` and ``d``
                 (the comma-joined event JSON), trimmed to about ``history_per_symbol`` events
* ``tp:tick:S``  pub/sub channel; each message is one or more comma-joined event objects, ready to
                 be wrapped in ``[...]`` and sent to WebSocket clients as they are

and ``tp:symbols`` (set of every symbol ever published), ``tp:ctl:keys`` (revocation notices),
``tp:log`` (the tickerplant log: one stream entry per published batch, fields ``e`` =
``SYM=epoch,...`` and ``d`` = every event of the batch; the recorder consumes it).

Heartbeats, for status pages: each process leaves its figures in a hash with a short TTL
(``tp:feed:<name>``, ``tp:web:<host>:<pid>``, ``tp:recorder``) and feed and web processes stamp
``tp:procs`` (sorted set: ``feed:<name>`` / ``web:<host>:<pid>`` -> last heartbeat, unix seconds),
so a process that died is still named, as down, after its hash expired.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from server.ticks import Tick, Trade

SYMBOLS_KEY = "tp:symbols"
CHANNEL_PREFIX = "tp:tick:"
FEED_KEY_PREFIX = "tp:feed:"
WEB_KEY_PREFIX = "tp:web:"
PROCS_KEY = "tp:procs"
FIGURES_TTL_S = 3  # heartbeat hashes are refreshed every second; gone 3 s after a process is
LOG_KEY = "tp:log"
# Published (payload: the key's name) when a key is revoked, so web processes act at once;
# they also re-read the key file every second, which covers a missed message.
KEYS_CHANNEL = "tp:ctl:keys"


def sym_key(sym: str) -> str:
    return f"tp:sym:{sym}"


def hist_key(sym: str) -> str:
    return f"tp:hist:{sym}"


def channel(sym: str) -> str:
    return CHANNEL_PREFIX + sym


def channel_symbol(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode()
    return name[len(CHANNEL_PREFIX) :]


def encode_tail(tick: Tick) -> bytes:
    """The part of a tick event after ``"seq":N,`` (the script adds type, sym and seq)."""
    if isinstance(tick, Trade):
        body: dict[str, object] = {"ts": tick.ts, "price": tick.price, "size": tick.size}
        if tick.side is not None:
            body["side"] = tick.side
    else:
        body = {"ts": tick.ts, "bid": tick.bid}
        if tick.bid_size is not None:
            body["bid_size"] = tick.bid_size
        body["ask"] = tick.ask
        if tick.ask_size is not None:
            body["ask_size"] = tick.ask_size
        if tick.crossed:
            body["crossed"] = True
    if tick.venue is not None:
        body["venue"] = tick.venue
    return orjson.dumps(body)[1:]


# Assigns seq, starts a new epoch when a symbol's sequence state is missing (first publish, or
# Redis lost its data), appends to the capped history stream, updates the latest trade/quote and
# publishes, all atomically. Events are built by string concatenation: no JSON work in Lua.
PUBLISH_BATCH_LUA = r"""
local maxhist = tonumber(ARGV[1])
local maxlog = ARGV[3]
local ngroups = tonumber(ARGV[2])
local i = 4
local logparts = {}
local logepochs = {}
local out = {}
for g = 1, ngroups do
  local sym = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  local hkey = 'tp:sym:' .. sym
  local skey = 'tp:hist:' .. sym
  local last = redis.call('HINCRBY', hkey, 'seq', n)
  local first = last - n + 1
  local prefix = ''
  local epoch = redis.call('HGET', hkey, 'epoch')
  if (not epoch) or first == 1 then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
    redis.call('HSET', hkey, 'epoch', epoch)
    redis.call('DEL', skey)
    redis.call('SADD', 'tp:symbols', sym)
    prefix = '{"type":"status","code":"epoch_changed","sym":"' .. sym .. '","epoch":' .. epoch ..
      ',"message":"sequence (re)started at seq 1; earlier seq numbers belong to the old epoch"},'
  end
  local parts = {}
  local last_trade = nil
  local last_quote = nil
  for k = 1, n do
    local kind = ARGV[i]
    local tail = ARGV[i + 1]
    i = i + 2
    local ev = '{"type":"' .. kind .. '","sym":"' .. sym .. '","seq":' ..
      string.format('%d', first + k - 1) .. ',' .. tail
    parts[k] = ev
    if kind == 'trade' then last_trade = ev else last_quote = ev end
  end
  local frag = table.concat(parts, ',')
  redis.call('XADD', skey, 'MINID', '~', tostring(math.max(0, last - maxhist)),
    string.format('%d', first) .. '-0', 'n', n, 'd', frag)
  if last_trade and last_quote then
    redis.call('HSET', hkey, 'trade', last_trade, 'quote', last_quote)
  elseif last_trade then
    redis.call('HSET', hkey, 'trade', last_trade)
  else
    redis.call('HSET', hkey, 'quote', last_quote)
  end
  redis.call('PUBLISH', 'tp:tick:' .. sym, prefix .. frag)
  logparts[#logparts + 1] = frag
  logepochs[#logepochs + 1] = sym .. '=' .. epoch
  out[#out + 1] = sym
  out[#out + 1] = epoch
  out[#out + 1] = last
end
-- The tickerplant log: one entry per batch, read by the recorder through a consumer group.
redis.call('XADD', 'tp:log', 'MAXLEN', '~', maxlog, '*',
  'e', table.concat(logepochs, ','), 'd', table.concat(logparts, ','))
return out
"""


@dataclass(slots=True)
class SeqState:
    """Where a symbol's sequence stands: ``seq`` is the last one assigned (0 = none yet)."""

    epoch: int | None
    seq: int


@dataclass(slots=True)
class Latest:
    epoch: int | None
    seq: int
    trade: bytes | None
    quote: bytes | None


class Bus:
    """The feed's and the web's view of Redis, in tickpipe's wire format."""

    def __init__(
        self, redis: Redis, history_per_symbol: int = 100_000, log_max_batches: int = 500_000
    ) -> None:
        self.redis = redis
        self.history_per_symbol = history_per_symbol
        self.log_max_batches = log_max_batches
        self._publish = redis.register_script(PUBLISH_BATCH_LUA)

    async def publish(self, ticks: Iterable[Tick]) -> dict[str, SeqState]:
        """Publish one batch atomically; returns each touched symbol's new sequence state."""
        groups: dict[str, list[bytes | str]] = {}
        for tick in ticks:
            kind = "trade" if isinstance(tick, Trade) else "quote"
            groups.setdefault(tick.sym, []).extend((kind, encode_tail(tick)))
        if not groups:
            return {}
        args: list[bytes | str | int] = [
            self.history_per_symbol,
            len(groups),
            self.log_max_batches,
        ]
        for sym, items in groups.items():
            args.extend((sym, len(items) // 2))
            args.extend(items)
        out = await self._publish(args=args)
        return {
            out[j].decode(): SeqState(int(out[j + 1]), int(out[j + 2]))
            for j in range(0, len(out), 3)
        }

    async def known_symbols(self) -> set[str]:
        return {s.decode() for s in await self.redis.smembers(SYMBOLS_KEY)}

    async def are_known(self, symbols: Sequence[str]) -> list[bool]:
        if not symbols:
            return []
        return [bool(x) for x in await self.redis.smismember(SYMBOLS_KEY, list(symbols))]

    async def seq_states(self, symbols: Sequence[str]) -> dict[str, SeqState]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.hmget(sym_key(sym), "epoch", "seq")
            rows = await pipe.execute()
        return {
            sym: SeqState(int(e) if e else None, int(s) if s else 0)
            for sym, (e, s) in zip(symbols, rows, strict=True)
        }

    async def latest(self, symbols: Sequence[str]) -> dict[str, Latest]:
        """The latest trade and quote per symbol, as the event bytes that were published."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.hmget(sym_key(sym), "epoch", "seq", "trade", "quote")
            rows = await pipe.execute()
        return {
            sym: Latest(int(e) if e else None, int(s) if s else 0, t, q)
            for sym, (e, s, t, q) in zip(symbols, rows, strict=True)
        }

    async def history(self, sym: str, after_seq: int, count: int = 10_000) -> list[bytes]:
        """Recent event fragments of ``sym`` holding events with seq > ``after_seq``."""
        start = max(after_seq, 0)
        first = await self.redis.xrevrange(hist_key(sym), f"{start + 1}-0", "-", count=1)
        lo = first[0][0] if first else "-"
        entries = await self.redis.xrange(hist_key(sym), lo, "+", count=count)
        return [fields[b"d"] for _id, fields in entries]
