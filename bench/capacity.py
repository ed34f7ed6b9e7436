"""The capacity model of plan.md as arithmetic: how many web processes, Redis shards and recorder
processes a load needs, from measured unit costs, and which limit is reached first.

    .venv/bin/python bench/capacity.py                      # 100,000 agents, 10,000 symbols, 1M/s
    .venv/bin/python bench/capacity.py --agents 20000 --rate 200000

Nothing is measured here: the defaults are the unit costs measured on this project's machine
(plan.md, "Capacity model", says by which benchmark and at what load average); pass others to
see how the answer moves. The load: ``--agents`` connections, each subscribed to ``--per-agent``
symbols drawn uniformly from ``--symbols``; ``--rate`` ticks/s in, spread evenly over the
symbols; the feed publishes a batch every ``--batch-ms``, one pub/sub message per symbol with
ticks in a batch. Agents land on web processes as a load balancer spreads them (at random), so a
web process carries every symbol any of its agents asked for.
"""

from __future__ import annotations

import argparse
import math


def frames_per_agent(a: argparse.Namespace) -> float:
    """Frames a second to one agent: one per feed batch that has a tick of its symbols, at most
    one per ``--flush-ms``."""
    batches = 1000 / a.batch_ms
    ticks = a.rate * a.per_agent / a.symbols
    return min(1000 / a.flush_ms, batches * (1 - math.exp(-ticks / batches)))


def web_processes(a: argparse.Namespace, messages: float) -> tuple[int, float, float, float]:
    """The fewest web processes that each stay within ``--core-budget``: (processes, share of
    the symbols each carries, its delivery CPU, its intake CPU), both in cores."""
    ticks = a.rate * a.per_agent / a.symbols
    per_agent = (frames_per_agent(a) * a.us_frame + ticks * a.us_tick) / 1e6
    for n in range(1, 100_000):
        per_proc = a.agents / n
        share = 1 - (1 - a.per_agent / a.symbols) ** per_proc
        delivery = per_proc * per_agent
        intake = a.base + messages * share * a.us_msg / 1e6
        if delivery + intake <= a.core_budget:
            return n, share, delivery, intake
    raise SystemExit("no number of web processes fits: a process's intake alone is over budget")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    load = p.add_argument_group("the load")
    load.add_argument("--agents", type=int, default=100_000)
    load.add_argument("--symbols", type=int, default=10_000)
    load.add_argument("--rate", type=float, default=1_000_000, help="ticks/s in")
    load.add_argument("--per-agent", type=int, default=5, help="symbols each agent subscribes")
    load.add_argument("--batch-ms", type=float, default=10.0, help="the feed's batch interval")
    load.add_argument("--retention-s", type=float, default=60.0, help="recent events kept")
    cost = p.add_argument_group("unit costs (measured; see plan.md)")
    load.add_argument("--flush-ms", type=float, default=5.0, help="TICKPIPE_FLUSH_MS")
    cost.add_argument("--us-frame", type=float, default=32.0, help="web CPU per frame sent")
    cost.add_argument("--us-tick", type=float, default=1.0, help="web CPU per tick in a frame")
    cost.add_argument("--us-msg", type=float, default=5.0, help="web CPU per message taken in")
    cost.add_argument("--base", type=float, default=0.018, help="web process idle, in cores")
    cost.add_argument("--us-redis-tick", type=float, default=20.0, help="Redis CPU per tick in")
    cost.add_argument(
        "--us-redis-delivery",
        type=float,
        default=5.0,
        help="Redis CPU per message per subscribing web process",
    )
    cost.add_argument("--mb-web", type=float, default=150.0, help="web process RSS, no clients")
    cost.add_argument("--kb-conn", type=float, default=50.0, help="RSS per busy connection")
    cost.add_argument("--bytes-redis", type=float, default=290.0, help="Redis bytes per tick kept")
    cost.add_argument("--bytes-wire", type=float, default=110.0, help="bytes per tick sent")
    cost.add_argument("--recorder-tps", type=float, default=270_000, help="ticks per CPU second")
    cost.add_argument("--core-budget", type=float, default=0.7, help="of a core per process")
    a = p.parse_args()

    batches = 1000 / a.batch_ms
    per_symbol = a.rate / a.symbols
    # A symbol has a message in a batch when at least one of its ticks fell in it (Poisson).
    messages = a.symbols * batches * (1 - math.exp(-per_symbol / batches))
    delivered = a.rate * a.per_agent * a.agents / a.symbols
    n_web, share, delivery, intake = web_processes(a, messages)
    subscribers = n_web * share  # web processes carrying a symbol
    redis_publish = a.rate * a.us_redis_tick / 1e6
    redis_fanout = messages * subscribers * a.us_redis_delivery / 1e6
    shards = math.ceil((redis_publish + redis_fanout) / a.core_budget)
    redis_gb = a.rate * a.retention_s * a.bytes_redis / 1e9
    recorders = math.ceil(a.rate / a.recorder_tps / a.core_budget)
    web_gb = (n_web * a.mb_web + a.agents * a.kb_conn / 1000) / 1000
    full_intake = messages * a.us_msg / 1e6

    rows = [
        ("delivered ticks/s", f"{delivered:,.0f} ({delivered / a.agents:,.0f} per agent)"),
        ("frames/s to each agent", f"{frames_per_agent(a):,.0f}"),
        ("pub/sub messages/s published", f"{messages:,.0f}"),
        ("web processes", f"{n_web:,} (at most {a.core_budget:.0%} of a core each)"),
        ("  agents per web process", f"{a.agents / n_web:,.0f}"),
        ("  symbols each carries", f"{share:.1%} ({share * a.symbols:,.0f})"),
        ("  CPU each: delivery + intake and idle", f"{delivery:.2f} + {intake:.2f} cores"),
        ("  web CPU per delivered tick", f"{1e6 * n_web * (delivery + intake) / delivered:.1f} us"),
        ("  intake if it carried every symbol", f"{full_intake:.2f} cores"),
        ("  memory, all web processes", f"{web_gb:,.1f} GB"),
        ("  network out of the web tier", f"{delivered * a.bytes_wire * 8 / 1e9:,.1f} Gbit/s"),
        ("Redis CPU: publish script", f"{redis_publish:.1f} cores"),
        ("Redis CPU: pub/sub to web processes",
         f"{redis_fanout:.1f} cores ({subscribers:.1f} web processes per symbol)"),
        ("Redis shards (masters)", f"{shards}"),
        ("Redis memory", f"{redis_gb:,.1f} GB for {a.retention_s:g} s of ticks"),
        ("recorder processes", f"{recorders} ({a.rate / a.recorder_tps:.1f} cores)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(
        f"{a.agents:,} agents x {a.per_agent} of {a.symbols:,} symbols, {a.rate:,.0f} ticks/s in, "
        f"{a.batch_ms:g} ms batches"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
