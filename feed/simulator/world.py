"""The simulated venue's world: a capture turned into the live book of every instrument, and renderers that
speak each venue's live schema to one connection. Plus the fault knobs, as data.

Pure: no I/O, no clock (every timestamp is passed in).

Source to world. Each capture record is parsed with bookcast's own venue parser; snapshots are diffed
against the world book (so a looping capture, or Polymarket's re-sent ``book``, becomes level moves) and
deltas applied. A record becomes one ``Tick``: the level moves per symbol (side, price, old size, new
size), the trades, and the venue event time, rebased onto the simulator's clock by ``shift_ns``.

Symbol mapping (``target_symbol``): the world's symbols are in the target venue's namespace.
Polymarket from a Polymarket capture and Coinbase from a Coinbase capture (Exchange or Advanced Trade)
keep their ids. Kalshi has no public book recording, so its world is built from another venue's real book
recording whose prices lie in (0, 1) (a Polymarket capture): market ticker = the source symbol in upper
case (``btc-1h-1765450800-up`` -> ``BTC-1H-1765450800-UP``); YES bids = the source's bids; NO bids = the
source's asks mirrored (an ask at ``p`` is a NO bid at ``1 - p``), so bookcast's derived YES ask
(1 - best NO bid) equals the source's ask exactly; a level move ``old -> new`` is an ``orderbook_delta``
of ``new - old`` contracts; a trade's YES price is the source price, ``taker_side`` yes for a buy.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from feed.book import L2Book
from feed.capture import CaptureRecord
from feed.errors import FeedError
from feed.model import (
    AggressorSide,
    BookDelta,
    BookSnapshot,
    Side,
    Trade,
    canonical,
    split_instrument,
)
from feed.venues import parser_for

TARGET_VENUES = ("polymarket", "coinbase", "kalshi")
ONE = Decimal(1)


class WorldError(FeedError, ValueError):
    """A capture that cannot feed the requested venue (the message says why, e.g. prices outside (0, 1))."""


@dataclass(frozen=True, slots=True)
class Move:
    """One level's size moving from ``old`` to ``new`` (``new == 0`` removes it)."""

    side: Side
    price: Decimal
    old: Decimal
    new: Decimal


@dataclass(slots=True)
class Tick:
    """What one capture record did to the world."""

    ts_event_ns: int
    moves: dict[str, list[Move]] = field(default_factory=dict)    # symbol -> moves, in order
    trades: list[tuple[str, Trade]] = field(default_factory=list)  # (symbol, trade)
    listed: list[str] = field(default_factory=list)                # symbols that appeared


def target_symbol(target: str, source_instrument: str) -> str:
    venue, symbol = split_instrument(source_instrument)
    if target == "kalshi" and venue != "kalshi":
        return symbol.upper()
    return symbol


class World:
    """The live books of the simulated venue (``target``), advanced one capture record at a time."""

    def __init__(self, target: str) -> None:
        if target not in TARGET_VENUES:
            raise WorldError(f"unknown venue {target!r}; known: {', '.join(TARGET_VENUES)}")
        self.target = target
        self.books: dict[str, L2Book] = {}
        self.markets: dict[str, str] = {}      # symbol -> Polymarket market id (condition id)
        self.ts_event_ns: dict[str, int] = {}  # symbol -> last event time
        self.records = 0

    def check_source(self, venue: str) -> None:
        if self.target == "polymarket" and venue != "polymarket":
            raise WorldError(f"a Polymarket simulator needs a Polymarket capture, got a {venue} one")
        if self.target == "coinbase" and venue != "coinbase":
            raise WorldError(f"a Coinbase simulator needs a Coinbase capture, got a {venue} one")

    def parse(self, record: CaptureRecord) -> list:
        """The record's venue events (parsed once, then reused every pass). Records the parser rejects
        give no events, as the recorder's venue would never have sent them.

        Raises:
            WorldError: the record's venue cannot feed this target, or (Kalshi) a price outside (0, 1).
        """
        self.check_source(record.venue)
        try:
            events = parser_for(record.venue)(record.msg).events
        except ValueError:
            return []
        if record.venue == "polymarket":
            self._note_markets(record.msg)
        if self.target == "kalshi":
            for event in events:
                if isinstance(event, BookSnapshot):
                    for price, _ in event.bids + event.asks:
                        self._check_price(price, event.instrument)
                elif isinstance(event, BookDelta):
                    for change in event.changes:
                        self._check_price(change.price, event.instrument)
                elif isinstance(event, Trade):
                    self._check_price(event.price, event.instrument)
        return events

    def apply(self, record: CaptureRecord, shift_ns: int, events: list | None = None) -> Tick:
        """Advance the world by one record (``shift_ns`` rebases its times); ``events`` are the record's
        parsed events (``parse(record)`` if not given)."""
        self.records += 1
        tick = Tick(record.recv_ts_ns + shift_ns)
        if events is None:
            events = self.parse(record)
        for event in events:
            ts = event.ts_event_ns + shift_ns if getattr(event, "ts_event_ns", None) is not None else tick.ts_event_ns
            if isinstance(event, (BookSnapshot, BookDelta)):
                symbol = target_symbol(self.target, event.instrument)
                book = self.books.get(symbol)
                if book is None:
                    if not isinstance(event, BookSnapshot):
                        continue  # a delta before any snapshot: the venue would not have sent it
                    book = self.books[symbol] = L2Book(symbol)
                    book.apply_snapshot(event.bids, event.asks)  # listed: subscribers get a snapshot, no moves
                    tick.listed.append(symbol)
                    self.ts_event_ns[symbol] = tick.ts_event_ns = ts
                    continue
                if isinstance(event, BookSnapshot):
                    changes = book.diff(event.bids, event.asks)
                else:
                    changes = event.changes
                moves = tick.moves.setdefault(symbol, [])
                for change in changes:
                    old = book.size_at(change.side, change.price)
                    if book.set_level(change.side, change.price, change.size):
                        moves.append(Move(change.side, change.price, old, change.size))
                if not moves:
                    del tick.moves[symbol]
                self.ts_event_ns[symbol] = ts
                tick.ts_event_ns = ts
            elif isinstance(event, Trade):
                symbol = target_symbol(self.target, event.instrument)
                if symbol in self.books:
                    tick.trades.append((symbol, dataclasses.replace(event, ts_event_ns=ts)))
        return tick

    def _check_price(self, price: Decimal, symbol: str) -> None:
        if self.target == "kalshi" and not 0 < price < ONE:
            raise WorldError(f"a Kalshi simulator needs prices in (0, 1); {symbol} has {price} "
                             "(use a Polymarket capture)")

    def _note_markets(self, msg: Any) -> None:
        for item in msg if isinstance(msg, list) else [msg]:
            if isinstance(item, dict) and isinstance(item.get("asset_id"), str) and isinstance(item.get("market"), str):
                self.markets[target_symbol(self.target, f"polymarket:{item['asset_id']}")] = item["market"]

    def book_hash(self, symbol: str) -> str:
        """A stable SHA-1 of the book (the simulator's stand-in for Polymarket's ``hash``)."""
        book = self.books[symbol]
        text = repr((book.wire_levels(Side.BID), book.wire_levels(Side.ASK)))
        return hashlib.sha1(text.encode()).hexdigest()


# -- formatting --------------------------------------------------------------------------------------
def rfc3339_ns(ns: int) -> str:
    """``2026-08-09T21:05:48.228568804Z`` from Unix ns (Coinbase's form)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def fixed(value: Decimal, places: int) -> str:
    """At least ``places`` decimals, never fewer digits than the value has (Kalshi's ``"0.7700"``)."""
    text = canonical(value)
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(places, '0')}"


# -- renderers: one per connection ---------------------------------------------------------------
class Renderer:
    """Turns world ticks into one connection's venue messages. Subclasses per venue."""

    venue = ""

    def __init__(self, world: World) -> None:
        self.world = world
        self.symbols: list[str] = []

    def subscribe(self, frame: Any, now_ns: int) -> list[dict]:
        """Handle one client frame; returns the replies (acks, snapshots). Unknown frames -> []."""
        return []

    def snapshots(self, now_ns: int) -> list[dict]:
        return [m for s in self.symbols if s in self.world.books for m in self.snapshot(s, now_ns)]

    def snapshot(self, symbol: str, now_ns: int) -> list[dict]:
        raise NotImplementedError

    def render(self, tick: Tick, now_ns: int) -> list[dict]:
        """The messages of one tick: a snapshot for a subscribed symbol that just appeared, else ``tick``."""
        fresh = [s for s in tick.listed if s in self.symbols]
        out: list[dict] = []
        if fresh:
            for symbol in fresh:
                out += self.snapshot(symbol, now_ns)
            tick = Tick(tick.ts_event_ns, {s: m for s, m in tick.moves.items() if s not in fresh}, tick.trades,
                        tick.listed)
        return out + self.tick(tick, now_ns)

    def tick(self, tick: Tick, now_ns: int) -> list[dict]:
        raise NotImplementedError

    def heartbeat(self, now_ns: int) -> dict | None:
        return None

    def reset_seq(self, now_ns: int) -> list[dict]:
        """The venue restarted this stream: numbering starts again, with fresh snapshots."""
        return self.snapshots(now_ns)

    def crossed(self, now_ns: int) -> list[dict]:
        """A fault: one message that leaves the first two-sided subscribed book locked (best bid = best ask)."""
        for symbol in self.symbols:
            book = self.world.books.get(symbol)
            if book is not None and book.best_bid() and book.best_ask():
                price = book.best_ask()[0]
                held = book.size_at(Side.BID, price)
                tick = Tick(self.world.ts_event_ns.get(symbol, now_ns),
                            {symbol: [Move(Side.BID, price, held, held + Decimal(1))]})
                return self.tick(tick, now_ns)
        return []

    def rest_book(self, symbol: str, now_ns: int) -> dict:
        raise NotImplementedError

    def bad_messages(self, n: int, now_ns: int) -> list[str | dict]:
        """A fault: ``n`` bad frames, cycling through text that is not JSON, a known message type with a
        field of the wrong type, and a delta for an instrument the venue never listed."""
        symbol = self.symbols[0] if self.symbols else "unknown"
        makers = (lambda: "{not json", lambda: self._wrong_type(symbol, now_ns),
                  lambda: self._unknown_instrument(now_ns))
        return [makers[i % 3]() for i in range(n)]

    def flood(self, n: int, now_ns: int) -> list[dict]:
        """A fault: ``n`` well-formed deltas for an instrument the venue never listed, all at once."""
        return [self._unknown_instrument(now_ns) for _ in range(n)]

    def _wrong_type(self, symbol: str, now_ns: int) -> dict:
        raise NotImplementedError

    def _unknown_instrument(self, now_ns: int) -> dict:
        move = Move(Side.BID, Decimal("0.5"), Decimal(0), Decimal(1))
        self.symbols.append("UNLISTED-SIM")
        try:
            return self.tick(Tick(now_ns, {"UNLISTED-SIM": [move]}), now_ns)[0]
        finally:
            self.symbols.remove("UNLISTED-SIM")

    def _subscribe_symbols(self, symbols: Iterable[Any]) -> list[str]:
        new = [s for s in symbols if isinstance(s, str) and s not in self.symbols]
        self.symbols.extend(new)
        return new


class PolymarketRenderer(Renderer):
    """Market channel: ``book`` on subscribe, ``price_change`` (``price_changes[]`` with ``hash``,
    ``best_bid``, ``best_ask``), ``last_trade_price``, ``new_market`` with ``custom_feature_enabled``."""

    venue = "polymarket"

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.custom = False

    def subscribe(self, frame: Any, now_ns: int) -> list[dict]:
        if not isinstance(frame, dict) or not isinstance(frame.get("assets_ids"), list):
            return []
        self.custom = self.custom or bool(frame.get("custom_feature_enabled"))
        new = self._subscribe_symbols(frame["assets_ids"])
        if frame.get("initial_dump", True) is False:
            return []
        return [m for s in new if s in self.world.books for m in self.snapshot(s, now_ns)]

    def _market(self, symbol: str) -> str:
        return self.world.markets.get(symbol, symbol)

    def _ts(self, symbol: str, now_ns: int) -> str:
        return str(self.world.ts_event_ns.get(symbol, now_ns) // 1_000_000)

    def snapshot(self, symbol: str, now_ns: int) -> list[dict]:
        book = self.world.books[symbol]
        bids = [{"price": p, "size": s} for p, s in reversed(book.wire_levels(Side.BID))]  # ascending, best last
        asks = [{"price": p, "size": s} for p, s in reversed(book.wire_levels(Side.ASK))]  # descending, best last
        return [{"event_type": "book", "asset_id": symbol, "market": self._market(symbol), "bids": bids,
                 "asks": asks, "timestamp": self._ts(symbol, now_ns), "hash": self.world.book_hash(symbol)}]

    def _wrong_type(self, symbol: str, now_ns: int) -> dict:
        return {"event_type": "price_change", "market": self._market(symbol), "timestamp": str(now_ns // 1_000_000),
                "price_changes": [{"asset_id": symbol, "price": 0.5, "size": "1", "side": "BUY"}]}

    def rest_book(self, symbol: str, now_ns: int) -> dict:
        msg = self.snapshot(symbol, now_ns)[0]
        del msg["event_type"]
        return msg | {"tick_size": "0.01", "min_order_size": "5", "neg_risk": False}

    def tick(self, tick: Tick, now_ns: int) -> list[dict]:
        out: list[dict] = []
        if self.custom:
            out += [{"event_type": "new_market", "market": self._market(s), "assets_ids": [s],
                     "timestamp": str(tick.ts_event_ns // 1_000_000)} for s in tick.listed if s in self.symbols]
        entries = []
        for symbol, moves in tick.moves.items():
            if symbol not in self.symbols:
                continue
            book = self.world.books[symbol]
            best_bid, best_ask = book.best_bid(), book.best_ask()
            book_hash = self.world.book_hash(symbol)
            for move in moves:
                if move.side is Side.BID and best_ask is not None and move.price >= best_ask[0]:
                    best_bid = (move.price, move.new)  # an injected crossing level: the venue reports it
                entries.append({"asset_id": symbol, "price": canonical(move.price), "size": canonical(move.new),
                                "side": "BUY" if move.side is Side.BID else "SELL",
                                "hash": book_hash,
                                "best_bid": canonical(best_bid[0]) if best_bid else "0",
                                "best_ask": canonical(best_ask[0]) if best_ask else "0"})
        if entries:
            market = self._market(entries[0]["asset_id"])
            out.append({"event_type": "price_change", "market": market, "price_changes": entries,
                        "timestamp": str(tick.ts_event_ns // 1_000_000)})
        for symbol, trade in tick.trades:
            if symbol in self.symbols:
                out.append({"event_type": "last_trade_price", "asset_id": symbol, "market": self._market(symbol),
                            "price": canonical(trade.price), "size": canonical(trade.size),
                            "side": "BUY" if trade.side is AggressorSide.BUY else "SELL", "fee_rate_bps": "0",
                            "timestamp": str(trade.ts_event_ns // 1_000_000),
                            "transaction_hash": "0x" + hashlib.sha256(repr((symbol, trade)).encode()).hexdigest()})
        return out


class CoinbaseRenderer(Renderer):
    """Advanced Trade: ``l2_data`` snapshot/update, ``market_trades``, ``heartbeats``, ``subscriptions``;
    every message of the connection numbered by ``sequence_num`` from 0."""

    venue = "coinbase"

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.seq = 0
        self.channels: set[str] = set()
        self.trade_symbols: list[str] = []
        self.heartbeat_counter = 0

    def _envelope(self, channel: str, events: list, now_ns: int) -> dict:
        msg = {"channel": channel, "client_id": "", "timestamp": rfc3339_ns(now_ns), "sequence_num": self.seq,
               "events": events}
        self.seq += 1
        return msg

    def subscribe(self, frame: Any, now_ns: int) -> list[dict]:
        if not isinstance(frame, dict) or frame.get("type") != "subscribe":
            return []
        channel = frame.get("channel")
        if channel not in ("level2", "market_trades", "heartbeats"):
            return [{"type": "error", "message": f"unknown channel {channel!r}"}]
        self.channels.add(channel)
        products = [p for p in frame.get("product_ids") or [] if isinstance(p, str)]
        new: list[str] = []
        if channel == "level2":
            new = self._subscribe_symbols(products)
        elif channel == "market_trades":
            self.trade_symbols += [p for p in products if p not in self.trade_symbols]
        subscribed = {"level2": list(self.symbols), "market_trades": list(self.trade_symbols)}
        out = [self._envelope("subscriptions", [{"subscriptions": {c: subscribed.get(c, []) for c in self.channels}}], now_ns)]
        return out + [m for s in new if s in self.world.books for m in self.snapshot(s, now_ns)]

    def snapshot(self, symbol: str, now_ns: int) -> list[dict]:
        book = self.world.books[symbol]
        when = rfc3339_ns(self.world.ts_event_ns.get(symbol, now_ns))
        updates = [{"side": "bid", "event_time": when, "price_level": p, "new_quantity": s}
                   for p, s in book.wire_levels(Side.BID)]
        updates += [{"side": "offer", "event_time": when, "price_level": p, "new_quantity": s}
                    for p, s in book.wire_levels(Side.ASK)]
        return [self._envelope("l2_data", [{"type": "snapshot", "product_id": symbol, "updates": updates}],
                               now_ns)]

    def _wrong_type(self, symbol: str, now_ns: int) -> dict:
        return self._envelope("l2_data", [{"type": "update", "product_id": symbol, "updates": [
            {"side": "bid", "event_time": rfc3339_ns(now_ns), "price_level": 1.5, "new_quantity": "1"}]}], now_ns)

    def rest_book(self, symbol: str, now_ns: int) -> dict:
        book = self.world.books[symbol]
        return {"pricebook": {"product_id": symbol,
                              "bids": [{"price": p, "size": s} for p, s in book.wire_levels(Side.BID)],
                              "asks": [{"price": p, "size": s} for p, s in book.wire_levels(Side.ASK)],
                              "time": rfc3339_ns(self.world.ts_event_ns.get(symbol, now_ns))}}

    def tick(self, tick: Tick, now_ns: int) -> list[dict]:
        out = []
        if "level2" in self.channels:
            events = []
            when = rfc3339_ns(tick.ts_event_ns)
            for symbol, moves in tick.moves.items():
                if symbol in self.symbols:
                    events.append({"type": "update", "product_id": symbol, "updates": [
                        {"side": "bid" if m.side is Side.BID else "offer", "event_time": when,
                         "price_level": canonical(m.price), "new_quantity": canonical(m.new)} for m in moves]})
            if events:
                out.append(self._envelope("l2_data", events, now_ns))
        trades = [(s, t) for s, t in tick.trades if s in self.trade_symbols]
        if trades and "market_trades" in self.channels:
            out.append(self._envelope("market_trades", [{"type": "update", "trades": [
                {"product_id": s, "trade_id": t.trade_id or str(tick.ts_event_ns), "price": canonical(t.price),
                 "size": canonical(t.size), "time": rfc3339_ns(t.ts_event_ns or tick.ts_event_ns),
                 # Advanced Trade's side is the maker's: a taker BUY is reported as SELL.
                 "side": "SELL" if t.side is AggressorSide.BUY else "BUY"} for s, t in trades]}], now_ns))
        return out

    def heartbeat(self, now_ns: int) -> dict | None:
        if "heartbeats" not in self.channels:
            return None
        self.heartbeat_counter += 1
        return self._envelope("heartbeats", [{"current_time": rfc3339_ns(now_ns),
                                              "heartbeat_counter": self.heartbeat_counter}], now_ns)

    def reset_seq(self, now_ns: int) -> list[dict]:
        self.seq = 0
        return self.snapshots(now_ns)


class KalshiRenderer(Renderer):
    """Trade API v2: ``subscribed`` acks with a ``sid`` per channel, ``orderbook_snapshot`` then
    ``orderbook_delta`` (signed ``delta_fp``), ``trade``; ``seq`` per sid from 1 (see the module text for the
    YES/NO mapping)."""

    venue = "kalshi"

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.sids: dict[str, int] = {}   # channel -> sid
        self.seqs: dict[int, int] = {}   # sid -> last seq
        self.trade_symbols: list[str] = []

    def _next(self, channel: str) -> tuple[int, int]:
        sid = self.sids[channel]
        self.seqs[sid] = self.seqs.get(sid, 0) + 1
        return sid, self.seqs[sid]

    def subscribe(self, frame: Any, now_ns: int) -> list[dict]:
        if not isinstance(frame, dict) or frame.get("cmd") != "subscribe":
            return []
        params = frame.get("params") if isinstance(frame.get("params"), dict) else {}
        channels = params.get("channels") or []
        tickers = params.get("market_tickers") or []
        out = []
        for channel in channels:
            if channel not in ("orderbook_delta", "trade"):
                out.append({"id": frame.get("id"), "type": "error", "msg": {"code": 8, "msg": "Unknown channel name"}})
                continue
            sid = self.sids.setdefault(channel, len(self.sids) + 1)
            out.append({"id": frame.get("id"), "type": "subscribed", "msg": {"channel": channel, "sid": sid}})
            if channel == "orderbook_delta":
                new = self._subscribe_symbols(tickers)
                out += [m for s in new if s in self.world.books for m in self.snapshot(s, now_ns)]
            else:
                self.trade_symbols += [t for t in tickers if isinstance(t, str)]
        return out

    def _levels(self, symbol: str) -> tuple[list, list]:
        book = self.world.books[symbol]
        yes = [[fixed(Decimal(p), 4), fixed(Decimal(s), 2)] for p, s in reversed(book.wire_levels(Side.BID))]
        no = [[fixed(ONE - Decimal(p), 4), fixed(Decimal(s), 2)] for p, s in book.wire_levels(Side.ASK)]
        return yes, no

    def snapshot(self, symbol: str, now_ns: int) -> list[dict]:
        if "orderbook_delta" not in self.sids:
            return []
        yes, no = self._levels(symbol)
        sid, seq = self._next("orderbook_delta")
        return [{"type": "orderbook_snapshot", "sid": sid, "seq": seq,
                 "msg": {"market_ticker": symbol, "market_id": hashlib.md5(symbol.encode()).hexdigest(),
                         "yes_dollars_fp": yes, "no_dollars_fp": no}}]

    def _wrong_type(self, symbol: str, now_ns: int) -> dict:
        if "orderbook_delta" not in self.sids:
            return {"type": "orderbook_delta", "msg": {"market_ticker": symbol, "price_dollars": 0.5}}
        sid, seq = self._next("orderbook_delta")
        return {"type": "orderbook_delta", "sid": sid, "seq": seq,
                "msg": {"market_ticker": symbol, "price_dollars": 0.5, "delta_fp": "1", "side": "yes"}}

    def rest_book(self, symbol: str, now_ns: int) -> dict:
        yes, no = self._levels(symbol)
        return {"orderbook_fp": {"yes_dollars": yes, "no_dollars": no}}

    def tick(self, tick: Tick, now_ns: int) -> list[dict]:
        out = []
        if "orderbook_delta" in self.sids:
            for symbol, moves in tick.moves.items():
                if symbol not in self.symbols:
                    continue
                for m in moves:
                    side, price = ("yes", m.price) if m.side is Side.BID else ("no", ONE - m.price)
                    sid, seq = self._next("orderbook_delta")
                    out.append({"type": "orderbook_delta", "sid": sid, "seq": seq, "msg": {
                        "market_ticker": symbol, "market_id": hashlib.md5(symbol.encode()).hexdigest(),
                        "price_dollars": fixed(price, 4), "delta_fp": fixed(m.new - m.old, 2), "side": side,
                        "ts": rfc3339_ns(tick.ts_event_ns)}})
        if "trade" in self.sids:
            for symbol, t in tick.trades:
                if symbol in self.trade_symbols or symbol in self.symbols:
                    sid, seq = self._next("trade")
                    out.append({"type": "trade", "sid": sid, "seq": seq, "msg": {
                        "trade_id": t.trade_id or hashlib.md5(repr((symbol, t)).encode()).hexdigest(),
                        "market_ticker": symbol, "yes_price_dollars": fixed(t.price, 4),
                        "no_price_dollars": fixed(ONE - t.price, 4), "count_fp": fixed(t.size, 2),
                        "taker_side": "yes" if t.side is AggressorSide.BUY else "no",
                        "ts": (t.ts_event_ns or tick.ts_event_ns) // 1_000_000_000}})
        return out

    def reset_seq(self, now_ns: int) -> list[dict]:
        self.seqs.clear()
        return self.snapshots(now_ns)


RENDERERS = {"polymarket": PolymarketRenderer, "coinbase": CoinbaseRenderer, "kalshi": KalshiRenderer}


# -- fault knobs ---------------------------------------------------------------------------------
@dataclass
class Faults:
    """The fault knobs of one simulated provider. Standing knobs stay until changed; one-shot actions
    (``drop_next``, ``duplicate_next``, ``reorder_next`` data messages; ``crossed``, ``reset_seq``,
    ``disconnect``, ``bad_next``, ``flood_next``) are consumed when done."""

    latency_ms: float = 0.0       # added to every message sent
    jitter_ms: float = 0.0        # plus uniform(0, jitter) per message (order is kept)
    error_rate: float = 0.0       # fraction of REST requests and WebSocket handshakes answered HTTP 503
    stall: bool = False           # stall-while-alive: pings, PONG and heartbeats answered, data lost
    lag_s: float = 0.0            # data served this many seconds behind the venue
    rest_429: bool = False        # REST answers 429 Too Many Requests
    refuse_connections: bool = False  # WebSocket handshakes answered 503 (with disconnect: a dead provider)
    drop_next: int = 0
    duplicate_next: int = 0
    reorder_next: int = 0
    crossed: bool = False
    reset_seq: bool = False
    disconnect: bool = False
    bad_next: int = 0             # N bad frames: not JSON, a wrong field type, an unlisted instrument
    flood_next: int = 0           # N well-formed deltas for an unlisted instrument, at once
    quiet: bool = False           # not a fault: the venue itself goes quiet (its clock stops, no event, no seq
    #                               used; pings and heartbeats go on, REST serves the same book); resumes in step

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``{knob: value}``. Raises ``ValueError`` naming a wrong knob or value (nothing changes)."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        staged = {}
        for name, value in changes.items():
            kind = types.get(name)
            if kind is None:
                raise ValueError(f"unknown fault knob {name!r}; known: {', '.join(types)}")
            staged[name] = _knob_value(name, kind, value)
        for name, value in staged.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _knob_value(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"fault knob {name!r} must be true or false, got {value!r}")
    try:
        number = float(value) if kind == "float" else int(value)
    except (TypeError, ValueError):
        raise ValueError(f"fault knob {name!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or number < 0 or number != number:
        raise ValueError(f"fault knob {name!r} must be a non-negative number, got {value!r}")
    if name == "error_rate" and number > 1:
        raise ValueError(f"fault knob 'error_rate' must be between 0 and 1, got {value!r}")
    return number
