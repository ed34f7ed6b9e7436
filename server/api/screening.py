"""Which of the symbols a WebSocket request names it may have: one screening for ``subscribe``,
``replay`` and the ``from_seq`` of a resume.

A symbol is refused, in this order, as ``invalid_symbol`` (not a symbol), ``not_entitled`` (the
key may not see it), ``unknown_symbol`` (nothing was ever published or stored for it) or
``limit_exceeded`` (the connection holds ``max_symbols`` already); the others are accepted, in
the order asked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

from server.auth import ApiKey

Rejection = dict[str, str]  # {"sym": ..., "code": ...}, as the events list it
Unknown = Callable[[list[str]], Awaitable[Collection[str]]]


def normalise(symbols: Iterable[str]) -> list[str]:
    """Symbols as the server names them: stripped, upper case, each once, in order."""
    return list(dict.fromkeys(s.strip().upper() for s in symbols))


@dataclass(slots=True)
class Screened:
    accepted: list[str]
    rejected: list[Rejection]


async def screen_symbols(
    key: ApiKey,
    symbols: list[str],
    *,
    room: int,
    unknown: Unknown | None = None,
    held: Collection[str] = (),
) -> Screened:
    """Screen normalised ``symbols`` for ``key``. ``unknown`` names those among the valid,
    entitled ones that are unknown (None: not checked); ``room`` is how many more symbols the
    connection may take, ``held`` the ones it has already (they take no room)."""
    candidates, rejected = key.screen(symbols)
    missing = set(await unknown(candidates)) if unknown is not None and candidates else set()
    accepted: list[str] = []
    for sym in candidates:
        if sym in missing:
            rejected.append({"sym": sym, "code": "unknown_symbol"})
        elif sym not in held and room <= 0:
            rejected.append({"sym": sym, "code": "limit_exceeded"})
        else:
            room -= sym not in held
            accepted.append(sym)
    return Screened(accepted, rejected)
