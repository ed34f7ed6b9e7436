"""The Redis wire format: key and channel names, the atomic publish script, and event encoding.

Everything that knows how tickpipe lays data out in Redis lives here, so the feed, the hub and
the REST routes agree by construction.

Per symbol ``S`` (standalone names; on a Redis Cluster each carries its slot group's hash tag,
see ``Layout``):

* ``tp:sym:S``   hash: ``epoch``, ``seq`` (last assigned), ``trade``, ``quote`` (latest events)
* ``tp:hist:S``  stream of recent events; entry id ``<first seq>-0``, fields ``n`` (ticks) and
                 ``d`` (the comma-joined event JSON: the ticks, and a live source's
                 ``upstream_gap`` status events each right before the tick after its hole),
                 trimmed to about ``history_per_symbol`` events
* ``tp:tick:S``  pub/sub channel (sharded pub/sub on a cluster); each message is one or more
                 comma-joined event objects, ready to be wrapped in ``[...]`` and sent to
                 WebSocket clients as they are

and ``tp:symbols`` (set of every symbol ever published), ``tp:log`` (the tickerplant log: one
stream entry per published batch, fields ``e`` = ``SYM=epoch,...`` and ``d`` = every event of
the batch, upstream gaps included; the recorder consumes it as the consumer group
``recorder``). On a cluster both exist once per slot group: ``tp:symbols:{gN}`` and
``tp:log:{gN}``. ``tp:upgaps`` (stream: the upstream gaps live sources found, fields ``sym`` and
``d`` = the ``upstream_gap`` status event; about the last 10,000 kept; on a cluster one per slot
group, ``tp:upgaps:{gN}``), ``tp:applied`` (hash: a feed's name -> the id of the last batch it
published, so a batch retried after its reply was lost is answered, not applied again; on a
cluster one per slot group, ``tp:applied:{gN}``).

Control-plane keys: ``tp:ctl:keys`` (revocation notices, a plain pub/sub channel: a cluster
broadcasts it to every node), ``tp:{ops}:conns:<key id>`` (sorted set: the open WebSockets of one
API key across web processes, ``server.live.quota``). Heartbeats, for status pages: each process
leaves its figures in a hash with a short TTL (``tp:feed:<name>``, ``tp:{ops}:web:<host>:<pid>``,
``tp:recorder``) and feed and web processes stamp ``tp:procs`` (sorted set: ``feed:<name>`` /
``web:<host>:<pid>`` -> last heartbeat, unix seconds), so a process that died is still named, as
down, after its hash expired; ``tp:sources`` (hash: a feed's name -> its live venue source's
last figures, kept after the feed stopped). The ``{ops}`` hash tag puts the connection sets and
the web heartbeats in one slot: the quota script reads both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import orjson
from redis.crc import key_slot

from server.config import Settings
from server.live.connection import RedisClient
from server.ticks import Quote, Tick, Trade

SYMBOLS_KEY = "tp:symbols"  # standalone; Layout.symbols_keys on a cluster
CHANNEL_PREFIX = "tp:tick:"
FEED_KEY_PREFIX = "tp:feed:"
WEB_KEY_PREFIX = "tp:{ops}:web:"
PROCS_KEY = "tp:procs"
# Hash: feed name -> its live venue source's last figures (JSON), kept after the feed stopped
# (its heartbeat hash expires), so every web process lists the same sources.
SOURCES_KEY = "tp:sources"
FIGURES_TTL_S = 3  # heartbeat hashes are refreshed every second; gone 3 s after a process is
LOG_KEY = "tp:log"  # standalone; Layout.logs on a cluster
RECORDER_GROUP = "recorder"  # the recorder's consumer group on the log
RECORDER_KEY = "tp:recorder"  # the recorder's heartbeat hash
# Published (payload: the key's name) when a key is revoked, so web processes act at once;
# they also re-read the key file every second, which covers a missed message.
KEYS_CHANNEL = "tp:ctl:keys"


UPSTREAM_GAPS_KEY = "tp:upgaps"  # stream: the upstream gaps live sources found, newest last
# Hash: a publisher's name -> its last applied batch id, so a batch retried after its reply was
# lost (a timeout, a failover) is not applied twice.
APPLIED_KEY = "tp:applied"
UPSTREAM_GAPS_KEPT = 10_000
CLOCK_SKEW_MS = 5 * 60_000  # how far a feed's clock may be off Redis' for /ticks/gaps
# A stream entry (``tp:log``, ``tp:hist:S``) as read here: the clients never decode replies.
StreamEntry = tuple[bytes, dict[bytes, bytes]]


def stream_entries(reply: object) -> list[StreamEntry]:
    """XRANGE's reply as what it is here (redis-py types replies for either decoding)."""
    return cast(list[StreamEntry], reply)


def conns_key(key_id: str) -> str:
    return f"tp:{{ops}}:conns:{key_id[:32]}"


class Layout:
    """Where a symbol's keys, channel and log are: plain names on one Redis; on a cluster,
    ``groups`` slot groups, each a hash tag ``{gN}`` that every key of its symbols, its channel,
    its symbol set and its tickerplant log carry, so one publish script touches one slot.

    A symbol's group is its own key slot modulo ``groups``, so every process finds it without
    asking Redis; ``groups`` must stay the same for as long as the cluster keeps the data."""

    __slots__ = ("groups", "sharded")

    def __init__(self, groups: int = 1, sharded: bool = False) -> None:
        self.groups = groups if sharded else 1
        self.sharded = sharded

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        return cls(settings.redis_slot_groups, sharded=settings.cluster)

    def group(self, sym: str) -> int:
        return key_slot(sym.encode()) % self.groups if self.sharded else 0

    def _tag(self, sym: str) -> str:
        return f"{{g{self.group(sym)}}}:" if self.sharded else ""

    def sym_key(self, sym: str) -> str:
        return f"tp:sym:{self._tag(sym)}{sym}"

    def hist_key(self, sym: str) -> str:
        return f"tp:hist:{self._tag(sym)}{sym}"

    def channel(self, sym: str) -> str:
        return f"{CHANNEL_PREFIX}{self._tag(sym)}{sym}"

    def channel_prefix(self, group: int) -> str:
        return f"{CHANNEL_PREFIX}{{g{group}}}:" if self.sharded else CHANNEL_PREFIX

    def log_key(self, group: int) -> str:
        return f"{LOG_KEY}:{{g{group}}}" if self.sharded else LOG_KEY

    def upgaps_key(self, group: int) -> str:
        return f"{UPSTREAM_GAPS_KEY}:{{g{group}}}" if self.sharded else UPSTREAM_GAPS_KEY

    def applied_key(self, group: int) -> str:
        return f"{APPLIED_KEY}:{{g{group}}}" if self.sharded else APPLIED_KEY

    def symbols_key(self, group: int) -> str:
        return f"{SYMBOLS_KEY}:{{g{group}}}" if self.sharded else SYMBOLS_KEY

    def log_name(self, group: int) -> str:
        """How the history store names a log's files: "" standalone, ``g3`` on a cluster."""
        return f"g{group}" if self.sharded else ""

    @property
    def logs(self) -> list[tuple[str, str]]:
        """Every tickerplant log as (name, key): one standalone, one per slot group on a
        cluster."""
        return [(self.log_name(g), self.log_key(g)) for g in range(self.groups)]

    @property
    def log_keys(self) -> list[str]:
        return [self.log_key(g) for g in range(self.groups)]

    def log_of(self, sym: str) -> tuple[str, str]:
        """The log (name, key) that holds ``sym``'s ticks."""
        g = self.group(sym)
        return self.log_name(g), self.log_key(g)

    @property
    def symbols_keys(self) -> list[str]:
        return [self.symbols_key(g) for g in range(self.groups)]


def channel_symbol(name: bytes | str) -> str:
    """The symbol of a tick channel, with or without a slot group's hash tag."""
    if isinstance(name, bytes):
        name = name.decode()
    rest = name[len(CHANNEL_PREFIX) :]
    if rest.startswith("{"):
        rest = rest[rest.index("}:") + 2 :]
    return rest


def tick_event(tick: Tick, seq: int) -> dict[str, object]:
    """A tick's event as published, numbered ``seq``: its fields in the wire order
    (``server.wire.TICK_FIELDS``), optional ones only when set. (A feed encodes the usual tick
    without this dict: ``wire_event``.)"""
    if isinstance(tick, Trade):
        event: dict[str, object] = {
            "type": "trade", "sym": tick.sym, "seq": seq, "ts": tick.ts, "price": tick.price,
            "size": tick.size,
        }  # fmt: skip
        if tick.side is not None:
            event["side"] = tick.side
        if tick.venue is not None:
            event["venue"] = tick.venue
        if tick.trade_id is not None:
            event["trade_id"] = tick.trade_id
    else:
        event = {"type": "quote", "sym": tick.sym, "seq": seq, "ts": tick.ts}
        if tick.bid is not None:  # absent: a one-sided quote (no bid)
            event["bid"] = tick.bid
        if tick.bid_size is not None:
            event["bid_size"] = tick.bid_size
        if tick.ask is not None:
            event["ask"] = tick.ask
        if tick.ask_size is not None:
            event["ask_size"] = tick.ask_size
        if tick.crossed:
            event["crossed"] = True
        if tick.venue is not None:
            event["venue"] = tick.venue
    if tick.recv_ts is not None:
        event["recv_ts"] = tick.recv_ts
    return event


# A venue's usual tick (every optional field set but a trade's side, a quote not crossed) as its
# event: a Struct per kind, its fields those of ``tick_event``'s dict in the same order, which
# msgspec encodes in C without a dict per tick (a feed encodes one event per tick it publishes).
class _TradeEvent(msgspec.Struct, tag_field="type", tag="trade", omit_defaults=True, gc=False):
    sym: str
    seq: int
    ts: int
    price: float
    size: float
    side: str | None = None  # left out when None (as the dict leaves it out)
    # (set on the usual tick: never left out)
    venue: str | None = None
    trade_id: int | None = None
    recv_ts: int | None = None


class _QuoteEvent(msgspec.Struct, tag_field="type", tag="quote", gc=False):
    sym: str
    seq: int
    ts: int
    bid: float
    bid_size: float
    ask: float
    ask_size: float
    venue: str
    recv_ts: int


_encode = msgspec.json.Encoder().encode
# msgspec and orjson write every double of a magnitude below this the same (its shortest text);
# from here on msgspec writes ``1e16`` where orjson writes ``1e+16``: such a tick takes orjson's
# path. Prices and sizes are positive and times and ids ints in what the bus publishes (the
# tick checks, the adapters), so only the upper bound is compared.
_SAME_TEXT_BELOW = 1e16

WireEvent = msgspec.Struct | msgspec.Raw


def wire_event(tick: Tick, seq: int) -> WireEvent:
    """``tick_event(tick, seq)`` as ``encode_events`` takes it: byte for byte the JSON orjson
    writes for that dict, for a tick the tick checks admit (what the tickerplant publishes). A
    venue's usual tick is a Struct (no dict; encoded in C), any other tick its dict already
    written by orjson."""
    if type(tick) is Trade:
        side, venue, trade_id, recv = tick.side, tick.venue, tick.trade_id, tick.recv_ts
        price, size = tick.price, tick.size
        if (
            venue is not None
            and trade_id is not None
            and recv is not None
            and price < _SAME_TEXT_BELOW
            and size < _SAME_TEXT_BELOW
        ):
            return _TradeEvent(tick.sym, seq, tick.ts, price, size, side, venue, trade_id, recv)
    elif type(tick) is Quote:
        bid, ask, bid_size, ask_size = tick.bid, tick.ask, tick.bid_size, tick.ask_size
        venue, recv = tick.venue, tick.recv_ts
        if (
            bid is not None  # (a one-sided quote: the dict, without that side)
            and ask is not None
            and bid_size is not None
            and ask_size is not None
            and venue is not None
            and recv is not None
            and not bid > ask
            and ask < _SAME_TEXT_BELOW
            and bid_size < _SAME_TEXT_BELOW
            and ask_size < _SAME_TEXT_BELOW
        ):
            return _QuoteEvent(tick.sym, seq, tick.ts, bid, bid_size, ask, ask_size, venue, recv)
    return msgspec.Raw(orjson.dumps(tick_event(tick, seq)))


def encode_events(events: Sequence[WireEvent]) -> bytes:
    """``wire_event``s as one JSON array: what orjson writes for their ``tick_event`` dicts."""
    return _encode(events)


# Assigns seq, starts a new epoch when a symbol's sequence state is missing (first publish, or
# Redis lost its data), appends to the capped history stream, updates the latest trade/quote and
# publishes, all atomically. Events are built by string concatenation: no JSON work in Lua.
# Every key is named in KEYS (a cluster routes the call by them; on a cluster they share one
# hash tag): KEYS[1] the symbol set, KEYS[2] the log, KEYS[3] the upstream gaps, KEYS[4] the
# applied batch ids, then per symbol its hash and history.
# A batch id (ARGV[8], from the publisher ARGV[7]) makes a retry idempotent: a publish whose
# reply was lost (a timeout, a master that died after replicating it) may have been applied, and
# applying it again would publish its ticks twice under new seqs. The script keeps each
# publisher's last batch id; the same id again is answered with its symbols' current state
# (still that batch's) and changes nothing. (A batch the promoted replica never got is applied
# again, under the same seqs: the seq floor below; the recorder drops seqs it already stored
# from the dead master's log.)
# A live source's upstream gap (a hole in the venue's own trade ids) goes in the same call as an
# in-band status event right before the first tick after the hole, so it is in the symbol's
# channel, recent history and log with its ticks (resumes replay it), and in the gap stream.
# Per symbol ARGV carries the epoch and seq the feed last got back: a cluster failover can bring
# back a replica that missed the last writes, and seq numbers already handed out must not be
# handed out again, so a seq found below that one (same epoch) is moved up to it. Then the
# symbol's ticks as one argument: their events as one JSON array (``tick_event``, encoded in
# one call), numbered on from that seq. A symbol has one publisher, so that is what the script
# finds (same epoch, seq not past it) on every publish but a symbol's first, one after Redis
# lost its data or another publisher's: the events are then published as they came, and the
# last trade and quote events (two more arguments) become the latest; no work per tick. Else
# (and for a symbol with upstream gaps to splice in) the script numbers the events itself: it
# splits the array at ``},{`` (no tick field's value can hold a brace: numbers, and strings
# that are symbols or sides), reads each event's kind from its type and keeps what follows
# its seq.
PUBLISH_BATCH_LUA = r"""
local maxhist = tonumber(ARGV[1])
local nsyms = tonumber(ARGV[2])
local maxlog = ARGV[3]
local pubcmd = ARGV[4]
local chanprefix = ARGV[5]
local maxgaps = ARGV[6]
local publisher = ARGV[7]
local batch = ARGV[8]
if batch ~= '' and redis.call('HGET', KEYS[4], publisher) == batch then
  -- Applied already: answer with each symbol's state, which is still that batch's (the
  -- publisher waits for each batch, and a symbol has one publisher).
  local out = {}
  local i = 9
  for g = 1, nsyms do
    local hkey = KEYS[3 + 2 * g]
    out[#out + 1] = ARGV[i]
    out[#out + 1] = redis.call('HGET', hkey, 'epoch')
    out[#out + 1] = tonumber(redis.call('HGET', hkey, 'seq'))
    i = i + 8 + 2 * tonumber(ARGV[i + 4])
  end
  return out
end
local i = 9
local logparts = {}
local logepochs = {}
local out = {}
for g = 1, nsyms do
  local sym = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local known_epoch = ARGV[i + 2]
  local known_seq = tonumber(ARGV[i + 3])
  local ngaps = tonumber(ARGV[i + 4])
  i = i + 5
  -- upstream gaps: (position of the tick after the hole, the event's JSON after after_seq)
  local gaps = {}
  for q = 1, ngaps do
    gaps[q] = {tonumber(ARGV[i]), ARGV[i + 1]}
    i = i + 2
  end
  local given_trade = ARGV[i]
  local given_quote = ARGV[i + 1]
  local blob = ARGV[i + 2]
  i = i + 3
  local hkey = KEYS[3 + 2 * g]
  local skey = KEYS[4 + 2 * g]
  local epoch = redis.call('HGET', hkey, 'epoch')
  local had = tonumber(redis.call('HGET', hkey, 'seq') or '0')
  local first, last, frag
  local last_trade = nil
  local last_quote = nil
  local prefix = ''
  if ngaps == 0 and known_seq > 0 and epoch == known_epoch and had <= known_seq then
    -- As the publisher expected: its events are numbered from known_seq + 1 already.
    first = known_seq + 1
    last = known_seq + n
    redis.call('HSET', hkey, 'seq', last)
    frag = string.sub(blob, 2, -2)
    if given_trade ~= '' then last_trade = given_trade end
    if given_quote ~= '' then last_quote = given_quote end
  else
    if known_seq > 0 and epoch == known_epoch and had < known_seq then
      redis.call('HSET', hkey, 'seq', known_seq)
    end
    last = redis.call('HINCRBY', hkey, 'seq', n)
    first = last - n + 1
    if (not epoch) or first == 1 then
      local t = redis.call('TIME')
      epoch = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
      redis.call('HSET', hkey, 'epoch', epoch)
      redis.call('DEL', skey)
      redis.call('SADD', KEYS[1], sym)
      prefix = '{"type":"status","code":"epoch_changed","sym":"' .. sym .. '","epoch":' ..
        epoch .. ',"message":"sequence (re)started at seq 1; earlier seq numbers belong ' ..
        'to the old epoch"},'
    end
    -- Each event: '{"type":"' kind '","sym":"' sym '","seq":' N ',' rest '}'
    local head = '","sym":"' .. sym .. '","seq":'
    local digits = 14 + #head  -- from an event's '{' to its seq's first digit
    local parts = {}
    local pos = 2  -- the first event's '{', after '['
    local q = 1
    for k = 1, n do
      local stop = string.find(blob, '},{', pos, true) or (#blob - 1)
      local kind = (string.byte(blob, pos + 9) == 116) and 'trade' or 'quote'  -- 't'
      local rest = string.find(blob, ',', pos + digits, true)
      local tail = string.sub(blob, rest + 1, stop)
      pos = stop + 2
      while q <= ngaps and gaps[q][1] == k do
        local gap = '{"type":"status","code":"upstream_gap","sym":"' .. sym .. '","epoch":' ..
          epoch .. ',"after_seq":' .. string.format('%d', first + k - 2) .. gaps[q][2]
        parts[#parts + 1] = gap
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxgaps, '*', 'sym', sym, 'd', gap)
        q = q + 1
      end
      local ev = '{"type":"' .. kind .. head .. string.format('%d', first + k - 1) .. ',' .. tail
      parts[#parts + 1] = ev
      if kind == 'trade' then last_trade = ev else last_quote = ev end
    end
    frag = table.concat(parts, ',')
  end
  redis.call('XADD', skey, 'MINID', '~', tostring(math.max(0, last - maxhist)),
    string.format('%d', first) .. '-0', 'n', n, 'd', frag)
  if last_trade and last_quote then
    redis.call('HSET', hkey, 'trade', last_trade, 'quote', last_quote)
  elseif last_trade then
    redis.call('HSET', hkey, 'trade', last_trade)
  elseif last_quote then
    redis.call('HSET', hkey, 'quote', last_quote)
  end
  redis.call(pubcmd, chanprefix .. sym, prefix .. frag)
  logparts[#logparts + 1] = frag
  logepochs[#logepochs + 1] = sym .. '=' .. epoch
  out[#out + 1] = sym
  out[#out + 1] = epoch
  out[#out + 1] = last
end
-- The tickerplant log: one entry per batch, read by the recorder through a consumer group.
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlog, '*',
  'e', table.concat(logepochs, ','), 'd', table.concat(logparts, ','))
if batch ~= '' then
  redis.call('HSET', KEYS[4], publisher, batch)
end
return out
"""


def _last_of_each_kind(ticks: list[Tick], events: list[WireEvent]) -> tuple[bytes, bytes]:
    """The last trade event and the last quote event (``events``, one per tick of ``ticks``) as
    JSON (``b""``: none)."""
    trade = quote = b""
    for i in range(len(ticks) - 1, -1, -1):
        if isinstance(ticks[i], Trade):
            if not trade:
                trade = _encode(events[i])
                if quote:
                    break
        elif not quote:
            quote = _encode(events[i])
            if trade:
                break
    return trade, quote


def encode_upstream_gap(venue: str, first_id: int, last_id: int, detected_ns: int) -> bytes:
    """The part of an ``upstream_gap`` status event after ``"after_seq":N`` (the publish script
    adds type, code, sym, epoch and after_seq): the venue's trades ``first_id``..``last_id``
    never reached tickpipe."""
    missing = last_id - first_id + 1
    rest = orjson.dumps(
        {
            "venue": venue,
            "first_id": first_id,
            "last_id": last_id,
            "missing": missing,
            "ts": detected_ns,
            "message": f"the venue's trades {first_id}..{last_id} ({missing}) never reached "
            "tickpipe; seq goes on without them",
        }
    )
    return b"," + rest[1:]


def gaps_before(gaps: Iterable[tuple[Tick, bytes]]) -> dict[int, list[bytes]]:
    """Upstream gaps (``encode_upstream_gap``) by ``id()`` of the tick each goes before, as
    ``Bus.publish_group`` takes them."""
    before: dict[int, list[bytes]] = {}
    for tick, gap in gaps:
        before.setdefault(id(tick), []).append(gap)
    return before


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
        self,
        redis: RedisClient,
        history_per_symbol: int = 100_000,
        log_max_batches: int = 500_000,
        layout: Layout | None = None,
        publisher: str = "",
    ) -> None:
        self.redis = redis
        self.publisher = publisher  # names this publisher's batch ids (``publish_group``)
        self.history_per_symbol = history_per_symbol
        self.log_max_batches = log_max_batches
        self.layout = layout or Layout()
        self._publish = redis.register_script(PUBLISH_BATCH_LUA)
        # What each symbol's last publish returned (the seq floor passed to the script).
        self._assigned: dict[str, SeqState] = {}

    def split(self, ticks: Iterable[Tick]) -> list[list[Tick]]:
        """The ticks of each slot group, in order (one group on a standalone Redis): each is
        published by one script call, atomically."""
        if not self.layout.sharded:
            batch = list(ticks)
            return [batch] if batch else []
        groups: dict[int, list[Tick]] = {}
        for tick in ticks:
            groups.setdefault(self.layout.group(tick.sym), []).append(tick)
        return list(groups.values())

    async def publish(
        self, ticks: Iterable[Tick], gaps: Sequence[tuple[Tick, bytes]] = ()
    ) -> dict[str, SeqState]:
        """Publish one batch; returns each touched symbol's new sequence state. Atomic on one
        Redis; on a cluster atomic per slot group (``split``), the groups sent concurrently.
        ``gaps``: upstream gaps (``encode_upstream_gap``), each with the tick it goes before."""
        before = gaps_before(gaps)
        parts = self.split(ticks)
        if len(parts) == 1:
            return await self.publish_group(parts[0], before)
        states: dict[str, SeqState] = {}
        for done in await asyncio.gather(*(self.publish_group(p, before) for p in parts)):
            states.update(done)
        return states

    async def publish_group(
        self, ticks: list[Tick], gaps: dict[int, list[bytes]] | None = None, batch: str = ""
    ) -> dict[str, SeqState]:
        """Publish ticks of one slot group (all of ``split``'s part) in one atomic script;
        ``gaps``: upstream gaps by ``id()`` of the tick each goes before. ``batch``: an id
        unique to this batch among ``publisher``'s; the same batch sent again (a retry after a
        lost reply) is answered with the state it left and is not applied twice."""
        # Per symbol its ticks in order, then their events, numbered on from the seq it last
        # got back.
        by_sym: dict[str, list[Tick]] = {}
        for tick in ticks:
            sym = tick.sym
            if sym in by_sym:
                by_sym[sym].append(tick)
            else:
                by_sym[sym] = [tick]
        if not by_sym:
            return {}
        assigned = self._assigned
        groups: dict[str, tuple[list[WireEvent], int]] = {}
        marks: dict[str, list[bytes | str | int]] = {}
        for sym, sym_ticks in by_sym.items():
            known = assigned.get(sym)
            base = known.seq if known else 0
            groups[sym] = ([wire_event(t, n) for n, t in enumerate(sym_ticks, base + 1)], base)
            if gaps:  # (the position of the tick each goes before, 1-based, then the gap)
                for n, t in enumerate(sym_ticks, 1):
                    for gap in gaps.get(id(t), ()):
                        marks.setdefault(sym, []).extend((n, gap))
        lay = self.layout
        group_no = lay.group(next(iter(groups)))
        keys = [
            lay.symbols_key(group_no),
            lay.log_key(group_no),
            lay.upgaps_key(group_no),
            lay.applied_key(group_no),
        ]
        args: list[bytes | str | int] = [
            self.history_per_symbol,
            len(groups),
            self.log_max_batches,
            "SPUBLISH" if lay.sharded else "PUBLISH",
            lay.channel_prefix(group_no),
            UPSTREAM_GAPS_KEPT,
            self.publisher,
            batch,
        ]
        for sym, (events, base) in groups.items():
            keys.extend((lay.sym_key(sym), lay.hist_key(sym)))
            known = assigned.get(sym)
            args.extend((sym, len(events)))
            args.extend((str(known.epoch), known.seq) if known else ("", 0))
            gap_args = marks.get(sym, [])
            args.append(len(gap_args) // 2)
            args.extend(gap_args)
            # The latest trade and quote, should the script find the seq as expected.
            last = _last_of_each_kind(by_sym[sym], events) if base and not gap_args else None
            args.extend(last or (b"", b""))
            args.append(encode_events(events))
        out = await self._publish(keys=keys, args=args)
        states = {
            out[j].decode(): SeqState(int(out[j + 1]), int(out[j + 2]))
            for j in range(0, len(out), 3)
        }
        self._assigned.update(states)
        return states

    async def upstream_gaps(self, start_ns: int, end_ns: int, count: int) -> list[dict[str, Any]]:
        """The upstream gaps found in ``[start_ns, end_ns)`` (by when they were found)."""
        # Entry ids are Redis' clock, ``ts`` the feed's: read a margin around the range so a
        # feed whose clock is off still has its gaps found by their own ts (the stream is
        # capped at about UPSTREAM_GAPS_KEPT entries, which bounds the read).
        lo = str(max(0, start_ns // 1_000_000 - CLOCK_SKEW_MS))
        hi = str(max(0, (end_ns - 1) // 1_000_000 + CLOCK_SKEW_MS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for g in range(self.layout.groups):
                pipe.xrange(self.layout.upgaps_key(g), lo, hi)
            replies = await pipe.execute()
        entries = [e for reply in replies for e in stream_entries(reply)]
        out = [orjson.loads(fields[b"d"]) for _id, fields in entries]
        kept = sorted((g for g in out if start_ns <= g["ts"] < end_ns), key=lambda g: g["ts"])
        return kept[:count]

    async def known_symbols(self) -> set[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self.layout.symbols_keys:
                pipe.smembers(key)
            sets = cast(list[set[bytes]], await pipe.execute())
        return {s.decode() for members in sets for s in members}

    async def are_known(self, symbols: Sequence[str]) -> list[bool]:
        if not symbols:
            return []
        lay = self.layout
        async with self.redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.sismember(lay.symbols_key(lay.group(sym)), sym)
            return [bool(x) for x in await pipe.execute()]

    async def seq_states(self, symbols: Sequence[str]) -> dict[str, SeqState]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.hmget(self.layout.sym_key(sym), "epoch", "seq")
            rows = await pipe.execute()
        return {
            sym: SeqState(int(e) if e else None, int(s) if s else 0)
            for sym, (e, s) in zip(symbols, rows, strict=True)
        }

    async def latest(self, symbols: Sequence[str]) -> dict[str, Latest]:
        """The latest trade and quote per symbol, as the event bytes that were published."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sym in symbols:
                pipe.hmget(self.layout.sym_key(sym), "epoch", "seq", "trade", "quote")
            rows = await pipe.execute()
        return {
            sym: Latest(int(e) if e else None, int(s) if s else 0, t, q)
            for sym, (e, s, t, q) in zip(symbols, rows, strict=True)
        }

    async def history(self, sym: str, after_seq: int, count: int = 10_000) -> list[bytes]:
        """Recent event fragments of ``sym`` holding events with seq > ``after_seq``."""
        start = max(after_seq, 0)
        key = self.layout.hist_key(sym)
        first = stream_entries(await self.redis.xrevrange(key, f"{start + 1}-0", "-", count=1))
        lo = first[0][0] if first else "-"
        entries = stream_entries(await self.redis.xrange(key, lo, "+", count=count))
        return [fields[b"d"] for _id, fields in entries]
