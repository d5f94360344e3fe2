// What the viewer makes of a bookcast v1 stream (PROTOCOL.md sections 4, 6, 11). Pure: no DOM, no clock,
// no socket: the page passes each decoded message with its receive time and carries out the actions
// returned (`{op: "resync", instrument}`, `{reconnectAfterMs}`). The same rules as feed/client/verify.py.
//
// Per instrument, a state and its transitions ("fault" = drop the book, count it, log it, send resync):
//
//   state      message / event             next       effect
//   ---------  --------------------------  ---------  ---------------------------------------------------
//   AWAITING   snapshot, checksum ok       LIVE       book replaced, verified += 1
//   AWAITING   snapshot, checksum differs  AWAITING   fault checksum_mismatch
//   AWAITING   delta                       AWAITING   ignored (deltasIgnored += 1)
//   LIVE       snapshot, checksum ok       LIVE       book replaced (a resync we asked for, or a resubscribe)
//   LIVE       snapshot, checksum differs  AWAITING   fault checksum_mismatch
//   LIVE       delta, other epoch          AWAITING   fault epoch_change
//   LIVE       delta, prev_seq != seq held AWAITING   fault seq_gap (a conflated delta chains on prev_seq)
//   LIVE       delta, checksum differs     AWAITING   fault checksum_mismatch (after applying it)
//   LIVE       delta ok                    LIVE       changes applied, seq = seq, verified += 1
//   LIVE       heartbeat behind, twice     AWAITING   fault stale_heartbeat (book did not move between them)
//   any        resync                      AWAITING   resyncsReceived[reason] += 1 (a snapshot follows)
//   any        malformed data message      AWAITING   fault bad_message if a book was held
//   any        instrument_status           same       status, reason, since_ns recorded (section 11)
//
// A snapshot's optional `status` (section 11) is recorded too. Unknown types and fields are ignored
// (section 10). Timestamps are ns since the Unix epoch as Numbers: ns stamps near 1.8e18 parse to doubles
// spaced 256 ns apart, so hop latencies are good to about half a microsecond.

import { Book, BookError } from "./book.js";
import { DecimalError } from "./decimal.js";

export const State = Object.freeze({ AWAITING: "awaiting_snapshot", LIVE: "live" });

export const GapReason = Object.freeze({
  SEQ_GAP: "seq_gap",
  EPOCH_CHANGE: "epoch_change",
  CHECKSUM_MISMATCH: "checksum_mismatch",
  STALE_HEARTBEAT: "stale_heartbeat",
  BAD_MESSAGE: "bad_message",
});

// Hops of a data message, from its stamps (section 4); `recv` is the page's receive time.
export const HOPS = Object.freeze([
  ["upstream", "ts_event_ns", "ts_ingest_ns"],
  ["ingest", "ts_ingest_ns", "ts_publish_ns"],
  ["nats_gateway", "ts_publish_ns", "ts_send_ns"],
  ["gateway_page", "ts_send_ns", "recv"],
  ["end_to_end", "ts_event_ns", "recv"],
]);

const LATENCY_WINDOW = 256;
const TRADES_KEPT = 50;
const EVENTS_KEPT = 200;

class BadMessage extends Error {}

function isInt(v) {
  return Number.isInteger(v);
}

function field(msg, key, check, what) {
  const v = msg[key];
  if (!check(v)) throw new BadMessage(`${msg.type} instrument=${msg.instrument}: field '${key}' must be ${what}, got ${JSON.stringify(v)}`);
  return v;
}

const nonNegInt = (v) => isInt(v) && v >= 0;
const str = (v) => typeof v === "string";

export class Instrument {
  constructor(id) {
    this.id = id;
    this.state = State.AWAITING;
    this.book = null;
    this.epoch = null;
    this.seq = null;
    this.lastPrevSeq = null;
    this.checksumSent = null;
    this.checksumComputed = null;
    this.lastVerifiedKind = null;
    this.status = null; // section 11: null until a snapshot or instrument_status says
    this.statusReason = null;
    this.statusSinceNs = null;
    this.trades = [];
    this.staleAt = null;
    this.updates = 0;
    this.snapshotSeq = null; // seq of the snapshot the book was last loaded from
    this.verifiedSinceSnapshot = 0; // that snapshot and the deltas verified on it
  }
}

export class Stream {
  constructor() {
    this.instruments = new Map();
    this.stats = {
      messages: 0, snapshots: 0, deltas: 0, deltasIgnored: 0, verified: 0, checksumFailures: 0,
      gaps: 0, seqGaps: 0, epochChanges: 0, staleHeartbeats: 0, badMessages: 0, trades: 0, heartbeats: 0,
      statusMessages: 0, ignored: 0, resyncsRequested: 0, resyncsReceived: {}, errors: 0,
    };
    this.lastHeartbeatRecvNs = null;
    this.lastFrameRecvNs = null;
    this.lastError = null;
    this.events = []; // {recvNs, kind, text}, newest last
    this.latency = Object.fromEntries(HOPS.map(([name]) => [name, []])); // ns, newest last
    this.lastHops = {};
  }

  instrument(id) {
    let inst = this.instruments.get(id);
    if (!inst) this.instruments.set(id, (inst = new Instrument(id)));
    return inst;
  }

  forget(id) {
    this.instruments.delete(id);
  }

  log(recvNs, kind, text) {
    this.events.push({ recvNs, kind, text });
    if (this.events.length > EVENTS_KEPT) this.events.splice(0, this.events.length - EVENTS_KEPT);
  }

  /** The page asked for a fresh snapshot (its Resync button). Returns the action to send. */
  requestResync(id, recvNs) {
    this.stats.resyncsRequested += 1;
    this.log(recvNs, "resync", `resync requested instrument=${id}`);
    return { op: "resync", instrument: id };
  }

  /** Apply one decoded server message received at `recvNs`. Returns actions, never throws on bad input. */
  onMessage(msg, recvNs) {
    this.stats.messages += 1;
    this.lastFrameRecvNs = recvNs;
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) {
      this.stats.badMessages += 1;
      this.log(recvNs, "bad", `not a JSON object: ${JSON.stringify(msg).slice(0, 120)}`);
      return [];
    }
    const handler = HANDLERS[msg.type];
    if (!handler) {
      this.stats.ignored += 1;
      return [];
    }
    try {
      return handler.call(this, msg, recvNs);
    } catch (err) {
      if (!(err instanceof BadMessage || err instanceof BookError || err instanceof DecimalError)) throw err;
      this.stats.badMessages += 1;
      const id = typeof msg.instrument === "string" ? msg.instrument : null;
      const inst = id === null ? null : this.instruments.get(id);
      if (inst && inst.state === State.LIVE) return this.fault(inst, GapReason.BAD_MESSAGE, err.message, recvNs);
      this.log(recvNs, "bad", err.message);
      return [];
    }
  }

  fault(inst, reason, detail, recvNs) {
    inst.state = State.AWAITING;
    inst.book = null;
    inst.staleAt = null;
    if (reason === GapReason.CHECKSUM_MISMATCH) this.stats.checksumFailures += 1;
    else if (reason !== GapReason.BAD_MESSAGE) {
      this.stats.gaps += 1;
      if (reason === GapReason.SEQ_GAP) this.stats.seqGaps += 1;
      if (reason === GapReason.EPOCH_CHANGE) this.stats.epochChanges += 1;
      if (reason === GapReason.STALE_HEARTBEAT) this.stats.staleHeartbeats += 1;
    }
    this.stats.resyncsRequested += 1;
    this.log(recvNs, "fault", `${reason}: ${detail}; resync sent`);
    return [{ op: "resync", instrument: inst.id }];
  }

  verified(inst, kind, msg, recvNs) {
    inst.state = State.LIVE;
    inst.updates += 1;
    inst.lastVerifiedKind = kind;
    if (kind === "snapshot") {
      inst.snapshotSeq = inst.seq;
      inst.verifiedSinceSnapshot = 0;
    }
    inst.verifiedSinceSnapshot += 1;
    this.stats.verified += 1;
    const hops = {};
    for (const [name, from, to] of HOPS) {
      const a = msg[from], b = to === "recv" ? recvNs : msg[to];
      if (isInt(a) && a > 0 && Number.isFinite(b) && b > 0) {
        const ns = b - a;
        hops[name] = ns;
        const window = this.latency[name];
        window.push(ns);
        if (window.length > LATENCY_WINDOW) window.shift();
      }
    }
    this.lastHops = hops;
    return [];
  }

  // -- data ---------------------------------------------------------------------------------------------
  onSnapshot(msg, recvNs) {
    const id = field(msg, "instrument", (v) => str(v) && v.length > 0, "a non-empty string");
    const epoch = field(msg, "epoch", str, "a string");
    const seq = field(msg, "seq", nonNegInt, "an int >= 0");
    const sent = field(msg, "checksum", nonNegInt, "an int >= 0");
    const inst = this.instrument(id);
    const book = new Book();
    book.loadSnapshot(msg.bids, msg.asks);
    this.stats.snapshots += 1;
    if (str(msg.status)) this.setStatus(inst, msg.status, null, null, recvNs, "snapshot");
    if (inst.epoch !== null && inst.epoch !== epoch) this.log(recvNs, "epoch", `new epoch instrument=${id} ${inst.epoch} -> ${epoch}`);
    const computed = book.checksum();
    inst.checksumSent = sent;
    inst.checksumComputed = computed;
    inst.epoch = epoch;
    inst.seq = seq;
    inst.lastPrevSeq = null;
    if (computed !== sent) {
      return this.fault(inst, GapReason.CHECKSUM_MISMATCH, `snapshot instrument=${id} seq=${seq} computed=${computed} sent=${sent}`, recvNs);
    }
    inst.book = book;
    inst.staleAt = null;
    this.log(recvNs, "snapshot", `snapshot instrument=${id} epoch=${epoch} seq=${seq} bids=${book.bids.length} asks=${book.asks.length}`);
    return this.verified(inst, "snapshot", msg, recvNs);
  }

  onDelta(msg, recvNs) {
    const id = field(msg, "instrument", (v) => str(v) && v.length > 0, "a non-empty string");
    this.stats.deltas += 1;
    const inst = this.instrument(id);
    if (inst.state !== State.LIVE) {
      this.stats.deltasIgnored += 1;
      return [];
    }
    const epoch = field(msg, "epoch", str, "a string");
    const seq = field(msg, "seq", nonNegInt, "an int >= 0");
    const prevSeq = field(msg, "prev_seq", nonNegInt, "an int >= 0");
    const sent = field(msg, "checksum", nonNegInt, "an int >= 0");
    if (seq <= prevSeq) throw new BadMessage(`delta instrument=${id}: seq=${seq} not after prev_seq=${prevSeq}`);
    if (epoch !== inst.epoch) {
      return this.fault(inst, GapReason.EPOCH_CHANGE, `epoch change instrument=${id} held=${inst.epoch}:${inst.seq} got=${epoch}:${prevSeq}`, recvNs);
    }
    if (prevSeq !== inst.seq) {
      return this.fault(inst, GapReason.SEQ_GAP, `seq gap instrument=${id} expected=${inst.seq} got=${prevSeq}`, recvNs);
    }
    inst.book.applyChanges(msg.changes);
    inst.seq = seq;
    inst.lastPrevSeq = prevSeq;
    inst.checksumSent = sent;
    inst.checksumComputed = inst.book.checksum();
    if (inst.checksumComputed !== sent) {
      return this.fault(inst, GapReason.CHECKSUM_MISMATCH, `delta instrument=${id} seq=${seq} computed=${inst.checksumComputed} sent=${sent}`, recvNs);
    }
    return this.verified(inst, "delta", msg, recvNs);
  }

  onTrade(msg, recvNs) {
    const id = field(msg, "instrument", (v) => str(v) && v.length > 0, "a non-empty string");
    const price = field(msg, "price", str, "a decimal string");
    const size = field(msg, "size", str, "a decimal string");
    const inst = this.instrument(id);
    this.stats.trades += 1;
    inst.trades.push({ price, size, side: String(msg.side), recvNs, tsEventNs: isInt(msg.ts_event_ns) ? msg.ts_event_ns : null });
    if (inst.trades.length > TRADES_KEPT) inst.trades.shift();
    return [];
  }

  // -- control ------------------------------------------------------------------------------------------
  onHeartbeat(msg, recvNs) {
    this.stats.heartbeats += 1;
    this.lastHeartbeatRecvNs = recvNs;
    const seqs = msg.seqs;
    if (seqs === null || typeof seqs !== "object" || Array.isArray(seqs)) throw new BadMessage(`heartbeat: field 'seqs' must be an object, got ${JSON.stringify(seqs)}`);
    const out = [];
    for (const inst of this.instruments.values()) {
      const pos = seqs[inst.id];
      if (inst.state !== State.LIVE || !Array.isArray(pos) || pos.length !== 2 || !str(pos[0]) || !isInt(pos[1])) continue;
      const [epoch, seq] = pos;
      if (epoch === inst.epoch && seq <= inst.seq) {
        inst.staleAt = null;
        continue;
      }
      const held = `${inst.epoch}:${inst.seq}`;
      if (inst.staleAt !== held) {
        inst.staleAt = held; // one heartbeat behind: a delta may be in flight
        continue;
      }
      out.push(...this.fault(inst, GapReason.STALE_HEARTBEAT, `stale book instrument=${inst.id} held=${held} heartbeat=${epoch}:${seq} at two heartbeats`, recvNs));
    }
    return out;
  }

  onResync(msg, recvNs) {
    const id = field(msg, "instrument", (v) => str(v) && v.length > 0, "a non-empty string");
    const reason = str(msg.reason) ? msg.reason : "unspecified";
    this.stats.resyncsReceived[reason] = (this.stats.resyncsReceived[reason] || 0) + 1;
    const inst = this.instrument(id);
    inst.state = State.AWAITING;
    inst.book = null;
    inst.staleAt = null;
    this.log(recvNs, "resync", `resync from gateway instrument=${id} reason=${reason}; awaiting snapshot`);
    return [];
  }

  onStatus(msg, recvNs) {
    const id = field(msg, "instrument", (v) => str(v) && v.length > 0, "a non-empty string");
    const status = field(msg, "status", str, "a string");
    this.stats.statusMessages += 1;
    this.setStatus(this.instrument(id), status, str(msg.reason) ? msg.reason : null, isInt(msg.since_ns) ? msg.since_ns : null, recvNs, "instrument_status");
    return [];
  }

  setStatus(inst, status, reason, sinceNs, recvNs, source) {
    if (inst.status !== status || (reason !== null && inst.statusReason !== reason)) {
      this.log(recvNs, "status", `${source} instrument=${inst.id} status=${status}${reason ? ` reason=${reason}` : ""}`);
    }
    const changed = inst.status !== status;
    // A snapshot's status carries no reason or since: a new status from one clears them, the same keeps them.
    if (changed || source === "instrument_status") {
      inst.statusReason = reason;
      inst.statusSinceNs = sinceNs;
    }
    inst.status = status;
  }

  onSubscribed(msg, recvNs) {
    const recovered = msg.recovered && typeof msg.recovered === "object" ? msg.recovered : {};
    const ids = Array.isArray(msg.instruments) ? msg.instruments.filter(str) : [];
    this.log(recvNs, "subscribed", `subscribed ${ids.join(", ")}${ids.some((i) => recovered[i]) ? " (resumed)" : ""}`);
    return [];
  }

  onUnsubscribed(msg, recvNs) {
    for (const id of Array.isArray(msg.instruments) ? msg.instruments.filter(str) : []) this.forget(id);
    return [];
  }

  onError(msg, recvNs) {
    this.stats.errors += 1;
    this.lastError = `${msg.code}: ${msg.message}`;
    this.log(recvNs, "error", `error from gateway ${this.lastError}`);
    return [];
  }

  onShutdown(msg, recvNs) {
    const ms = isInt(msg.reconnect_after_ms) && msg.reconnect_after_ms > 0 ? msg.reconnect_after_ms : 0;
    this.log(recvNs, "shutdown", `gateway shutting down; reconnecting in ${ms} ms`);
    return [{ reconnectAfterMs: ms }];
  }

  onPong(msg, recvNs) {
    return [];
  }
}

const HANDLERS = {
  snapshot: Stream.prototype.onSnapshot,
  delta: Stream.prototype.onDelta,
  trade: Stream.prototype.onTrade,
  heartbeat: Stream.prototype.onHeartbeat,
  resync: Stream.prototype.onResync,
  instrument_status: Stream.prototype.onStatus,
  subscribed: Stream.prototype.onSubscribed,
  unsubscribed: Stream.prototype.onUnsubscribed,
  error: Stream.prototype.onError,
  shutdown: Stream.prototype.onShutdown,
  pong: Stream.prototype.onPong,
};

/** The q-quantile (0..1) of a list of numbers (nearest rank), or null when empty. */
export function quantile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}
