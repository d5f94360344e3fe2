// The book viewer page: the DOM and WebSocket adapter around stream.js (the rules) and recorder.js.
//
// Connects to this gateway like any PROTOCOL.md v1 client: GET /v1/instruments for the picker, then
// /v1/ws with {"op":"subscribe","instruments":[id],"channels":["book","trades"]}. With a token pasted in
// the page (section 8) it sends `?token=` on the WebSocket and `Authorization: Bearer` on REST. It draws
// at most every RENDER_INTERVAL_MS; every frame is verified as it arrives, whether drawn or not.

import { Stream, State, HOPS, quantile } from "./stream.js";
import { Recorder } from "./recorder.js";
import { add, compare, mid, sub, toNumber } from "./decimal.js";

const RENDER_INTERVAL_MS = 100;
const LADDER_DEPTH = 15;
const CHART_DEPTH = 100;
const INSTRUMENTS_REFRESH_MS = 5000;
const LIST_SHOWN = 300;
const TRADES_SHOWN = 12;
const HOP_LABELS = {
  upstream: "venue → ingest",
  ingest: "ingest → publish",
  nats_gateway: "NATS + gateway",
  gateway_page: "gateway → page",
  end_to_end: "end to end",
};

const $ = (id) => document.getElementById(id);

/** ns since the Unix epoch, now, as a BigInt (microsecond resolution) and a Number. */
function nowNs() {
  const big = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
  return [big, Number(big)];
}

export function formatNs(ns) {
  if (ns === null || ns === undefined || !Number.isFinite(ns)) return "–";
  const a = Math.abs(ns);
  if (a < 1e3) return `${Math.round(ns)} ns`;
  if (a < 1e6) return `${(ns / 1e3).toFixed(a < 1e4 ? 1 : 0)} µs`;
  if (a < 1e9) return `${(ns / 1e6).toFixed(a < 1e7 ? 2 : 1)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}

function clockOf(ns) {
  if (!Number.isFinite(ns)) return "–";
  return new Date(ns / 1e6).toISOString().slice(11, 23);
}

function setText(id, text, cls) {
  const el = $(id);
  if (!el) return;
  const value = String(text);
  if (el.textContent !== value) el.textContent = value;
  if (cls !== undefined) el.className = cls;
}

class Viewer {
  constructor() {
    this.stream = new Stream();
    this.recorder = new Recorder();
    this.ws = null;
    this.connState = "idle";
    this.connDetail = "";
    this.instrument = null;
    this.instruments = [];
    this.requestId = 0;
    this.retryMs = 500;
    this.reconnectTimer = null;
    this.framesReceived = 0;
    this.badFrames = 0;
    this.workMs = 0; // time spent parsing, verifying and recording frames (not drawing)
    this.workMaxMs = 0;
    this.renders = 0; // draws and the time they took (the layout the browser does after is not included)
    this.renderMs = 0;
    this.renderMaxMs = 0;
    this.prevLadder = new Map();
    this.token = sessionStorage.getItem("bookcast.token") || "";
    this.bind();
    const params = new URLSearchParams(location.search);
    const wanted = params.get("instrument");
    this.loadInstruments().then(() => {
      if (wanted) this.select(wanted);
    });
    this.connect();
    setInterval(() => {
      const started = performance.now();
      this.render();
      const ms = performance.now() - started;
      this.renders += 1;
      this.renderMs += ms;
      this.renderMaxMs = Math.max(this.renderMaxMs, ms);
    }, RENDER_INTERVAL_MS);
    setInterval(() => this.loadInstruments(), INSTRUMENTS_REFRESH_MS);
  }

  // -- controls ---------------------------------------------------------------------------------------
  bind() {
    $("token").value = this.token;
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.token = $("token").value.trim();
      if (this.token) sessionStorage.setItem("bookcast.token", this.token);
      else sessionStorage.removeItem("bookcast.token");
      this.banner("");
      this.loadInstruments();
      this.reconnect(0);
    });
    $("search").addEventListener("input", () => this.renderList());
    $("search").addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const first = this.filtered()[0];
      if (first) this.select(first.instrument);
    });
    $("resync").addEventListener("click", () => {
      if (!this.instrument) return;
      this.send(this.stream.requestResync(this.instrument, nowNs()[1]));
    });
    $("download").addEventListener("click", () => this.download());
    $("gateway").textContent = location.host;
  }

  banner(text) {
    const el = $("banner");
    el.textContent = text;
    el.hidden = !text;
  }

  authHeaders() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  async loadInstruments() {
    try {
      const r = await fetch("/v1/instruments", { headers: this.authHeaders(), cache: "no-store" });
      if (r.status === 401 || r.status === 403) {
        this.banner(`Gateway says ${r.status} ${r.status === 401 ? "unauthorized" : "forbidden"}: paste a valid token above.`);
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const body = await r.json();
      this.instruments = Array.isArray(body.instruments) ? body.instruments : [];
      this.renderList();
    } catch (err) {
      setText("list-note", `cannot list instruments: ${err.message}`);
    }
  }

  filtered() {
    const words = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
    return this.instruments.filter((i) => words.every((w) => String(i.instrument).toLowerCase().includes(w)));
  }

  renderList() {
    const list = $("instruments");
    const shown = this.filtered();
    list.replaceChildren(...shown.slice(0, LIST_SHOWN).map((i) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.instrument = i.instrument;
      button.title = i.instrument;
      button.className = i.instrument === this.instrument ? "picked" : "";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = i.instrument;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `seq ${i.seq}${i.status && i.status !== "ok" ? ` · ${i.status}` : ""}`;
      button.append(name, meta);
      button.addEventListener("click", () => this.select(i.instrument));
      li.append(button);
      return li;
    }));
    setText("list-note", `${shown.length} of ${this.instruments.length} instruments${shown.length > LIST_SHOWN ? ` (first ${LIST_SHOWN} shown)` : ""}`);
  }

  select(id) {
    if (id === this.instrument) return;
    const old = this.instrument;
    this.instrument = id;
    this.prevLadder = new Map();
    const url = new URL(location.href);
    url.searchParams.set("instrument", id);
    history.replaceState(null, "", url);
    if (old) {
      this.send({ op: "unsubscribe", id: ++this.requestId, instruments: [old] });
      this.stream.forget(old);
    }
    this.subscribe(false);
    this.renderList();
    this.render();
  }

  // -- connection -------------------------------------------------------------------------------------
  connect() {
    clearTimeout(this.reconnectTimer);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = this.token ? `?token=${encodeURIComponent(this.token)}` : "";
    const ws = new WebSocket(`${scheme}://${location.host}/v1/ws${query}`);
    this.ws = ws;
    this.connState = "connecting";
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.connState = "open";
      this.connDetail = "";
      this.retryMs = 500;
      this.banner("");
      this.subscribe(true);
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this.onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.connState = "closed";
      this.connDetail = `close ${event.code}${event.reason ? ` ${event.reason}` : ""}`;
      this.stream.log(nowNs()[1], "connection", `connection closed (${this.connDetail})`);
      for (const inst of this.stream.instruments.values()) inst.staleAt = null;
      if (event.code === 4001) this.banner("Token missing, invalid or expired (close 4001): paste a valid token above.");
      else if (event.code === 1006) this.checkAuth();
      this.reconnect(this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 5000);
    };
  }

  async checkAuth() {
    // A refused upgrade (HTTP 401, section 8) reaches a browser as close 1006; REST tells us why.
    try {
      const r = await fetch("/v1/instruments", { headers: this.authHeaders(), cache: "no-store" });
      if (r.status === 401) this.banner("Gateway refused the connection: 401 unauthorized. Paste a valid token above.");
    } catch (err) {
      /* gateway unreachable: the connection state says so */
    }
  }

  reconnect(delayMs) {
    clearTimeout(this.reconnectTimer);
    const old = this.ws;
    this.ws = null;
    if (old && old.readyState <= 1) old.close(1000, "reconnecting");
    this.connState = delayMs ? `reconnecting in ${(delayMs / 1000).toFixed(1)} s` : "connecting";
    this.reconnectTimer = setTimeout(() => this.connect(), delayMs);
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj));
  }

  subscribe(reconnected) {
    if (!this.instrument) return;
    const req = { op: "subscribe", id: ++this.requestId, instruments: [this.instrument], channels: ["book", "trades"] };
    const held = this.stream.instruments.get(this.instrument);
    if (reconnected && held && held.state === State.LIVE) req.resume = { [this.instrument]: { epoch: held.epoch, seq: held.seq } };
    this.send(req);
  }

  onFrame(text) {
    const started = performance.now();
    try {
      this.handleFrame(text);
    } finally {
      const ms = performance.now() - started;
      this.workMs += ms;
      this.workMaxMs = Math.max(this.workMaxMs, ms);
    }
  }

  handleFrame(text) {
    const [bigNs, recvNs] = nowNs();
    this.framesReceived += 1;
    let msg, isJson = true;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      isJson = false;
    }
    this.recorder.add(bigNs, text, isJson);
    if (!isJson) {
      this.badFrames += 1;
      this.stream.log(recvNs, "bad", `frame is not JSON: ${String(text).slice(0, 120)}`);
      return;
    }
    for (const action of this.stream.onMessage(msg, recvNs)) {
      if (action.op) this.send(action);
      else if (action.reconnectAfterMs !== undefined) this.reconnect(action.reconnectAfterMs);
    }
  }

  download() {
    const blob = new Blob([this.recorder.toJsonl()], { type: "application/x-ndjson" });
    const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\.\d+Z$/, "Z");
    const name = `bookcast-viewer-${(this.instrument || "none").replace(/[^A-Za-z0-9._-]+/g, "_")}-${stamp}.jsonl`;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    this.stream.log(nowNs()[1], "download", `downloaded ${this.recorder.count} frames as ${name}`);
  }

  // -- drawing ----------------------------------------------------------------------------------------
  render() {
    const [, now] = nowNs();
    const s = this.stream.stats;
    const inst = this.instrument ? this.stream.instruments.get(this.instrument) : null;
    const book = inst && inst.book;
    setText("conn-state", `${this.connState}${this.connDetail ? ` (${this.connDetail})` : ""}`, `badge ${this.connState === "open" ? "good" : "bad"}`);
    setText("title", this.instrument || "pick an instrument");
    const status = inst && inst.status;
    setText("status", status ? `${status}${inst.statusReason ? ` · ${inst.statusReason}` : ""}` : "status not reported", `badge ${!status ? "" : status === "ok" ? "good" : "warn"}`);
    setText("book-state", !inst ? "–" : inst.state === State.LIVE ? "live, verified" : "awaiting snapshot", `badge ${inst && inst.state === State.LIVE ? "good" : "warn"}`);

    const bid = book ? book.bestBid() : null, ask = book ? book.bestAsk() : null;
    setText("best-bid", bid ? bid[0] : "–");
    setText("best-bid-size", bid ? bid[1] : "");
    setText("best-ask", ask ? ask[0] : "–");
    setText("best-ask-size", ask ? ask[1] : "");
    setText("spread", bid && ask ? sub(ask[0], bid[0]) : "–", bid && ask && compare(bid[0], ask[0]) >= 0 ? "crossed" : "");
    setText("mid", bid && ask ? mid(bid[0], ask[0]) : "–");

    this.renderChart(book);
    this.renderLadder(book);
    this.renderTrades(inst);

    const ok = inst && inst.checksumSent !== null && inst.checksumSent === inst.checksumComputed;
    setText("h-epoch", inst && inst.epoch !== null ? inst.epoch : "–");
    setText("h-seq", inst && inst.seq !== null ? inst.seq : "–");
    setText("h-prev-seq", inst && inst.lastPrevSeq !== null ? inst.lastPrevSeq : "–");
    setText("h-checksum", inst && inst.checksumSent !== null ? inst.checksumSent : "–");
    setText("h-checksum-computed", inst && inst.checksumComputed !== null ? `${inst.checksumComputed} ${ok ? "✓" : "✗"}` : "–", ok ? "good" : inst && inst.checksumComputed !== null ? "bad" : "");
    setText("h-verified", inst && inst.snapshotSeq !== null ? `${s.verified} (${inst.verifiedSinceSnapshot} since the snapshot at seq ${inst.snapshotSeq})` : s.verified);
    setText("h-checksum-failures", s.checksumFailures, s.checksumFailures ? "bad" : "good");
    setText("h-gaps", `${s.gaps} (seq ${s.seqGaps}, epoch ${s.epochChanges}, heartbeat ${s.staleHeartbeats})`, s.gaps ? "warn" : "");
    const received = Object.entries(s.resyncsReceived).map(([r, n]) => `${r} ${n}`).join(", ");
    const receivedTotal = Object.values(s.resyncsReceived).reduce((a, b) => a + b, 0);
    setText("h-resyncs", `${receivedTotal} from gateway${received ? ` (${received})` : ""}, ${s.resyncsRequested} requested`, receivedTotal ? "warn" : "");
    setText("h-status-since", inst && inst.statusSinceNs ? clockOf(inst.statusSinceNs) : "–");
    setText("h-heartbeat-age", this.stream.lastHeartbeatRecvNs ? formatNs(now - this.stream.lastHeartbeatRecvNs) : "none yet (sent after 1 s without data)");
    setText("h-frame-age", this.stream.lastFrameRecvNs ? formatNs(now - this.stream.lastFrameRecvNs) : "–");
    setText("h-messages", `${this.framesReceived} (${s.snapshots} snapshots, ${s.deltas} deltas, ${s.trades} trades, ${s.heartbeats} heartbeats)`);
    setText("h-bad", `${this.badFrames + s.badMessages}${s.deltasIgnored ? `, ${s.deltasIgnored} deltas ignored awaiting a snapshot` : ""}`, this.badFrames + s.badMessages ? "bad" : "");
    setText("h-levels", book ? `${book.bids.length} bids, ${book.asks.length} asks` : "–");
    setText("h-work", this.framesReceived ? `${formatNs((this.workMs * 1e6) / this.framesReceived)} mean, ${formatNs(this.workMaxMs * 1e6)} max` : "–");
    setText("h-error", this.stream.lastError || "none");
    setText("recorded", `${this.recorder.count} frames${this.recorder.dropped ? `, ${this.recorder.dropped} oldest dropped` : ""}`);

    for (const [name] of HOPS) {
      const window = this.stream.latency[name];
      setText(`lat-${name}-last`, formatNs(this.stream.lastHops[name]));
      setText(`lat-${name}-p50`, formatNs(quantile(window, 0.5)));
      setText(`lat-${name}-p99`, formatNs(quantile(window, 0.99)));
      setText(`lat-${name}-max`, formatNs(window.length ? Math.max(...window) : null));
    }
    setText("lat-window", `last ${this.stream.latency.gateway_page.length} verified messages`);
    this.renderEvents();
  }

  /** The ladder: a fixed set of rows made once (asks, the spread row, bids), updated in place. */
  ladderRows() {
    if (this.ladder) return this.ladder;
    const body = $("ladder-body");
    const make = (side) => {
      const tr = document.createElement("tr");
      tr.className = side;
      const cells = ["price", "size", "cum"].map((cls) => {
        const td = document.createElement("td");
        td.className = cls;
        tr.append(td);
        return td;
      });
      const bar = document.createElement("td");
      bar.className = "bar";
      const fill = document.createElement("div");
      bar.append(fill);
      tr.append(bar);
      return { tr, cells, fill, side };
    };
    const asks = Array.from({ length: LADDER_DEPTH }, () => make("ask"));
    const bids = Array.from({ length: LADDER_DEPTH }, () => make("bid"));
    const note = document.createElement("tr");
    note.className = "spread-row";
    const noteCell = document.createElement("td");
    noteCell.colSpan = 4;
    note.append(noteCell);
    body.replaceChildren(...[...asks].reverse().map((r) => r.tr), note, ...bids.map((r) => r.tr));
    this.ladder = { asks, bids, note, noteCell };
    return this.ladder;
  }

  renderLadder(book) {
    const { asks, bids, note, noteCell } = this.ladderRows();
    const seen = new Map();
    const cumulative = (levels) => {
      let total = "0";
      return levels.map(([p, s]) => [p, s, (total = add(total, s))]);
    };
    const askLevels = book ? cumulative(book.asks.top(LADDER_DEPTH)) : [];
    const bidLevels = book ? cumulative(book.bids.top(LADDER_DEPTH)) : [];
    const maxCum = Math.max(1e-12, ...[...askLevels, ...bidLevels].map((l) => toNumber(l[2])));
    const fill = (rows, levels) => rows.forEach((row, i) => {
      const level = levels[i];
      row.tr.hidden = !level;
      if (!level) return;
      const [p, s, c] = level;
      const key = `${row.side}:${p}`;
      seen.set(key, s);
      row.tr.classList.toggle("changed", this.prevLadder.size > 0 && this.prevLadder.get(key) !== s);
      [p, s, c].forEach((text, j) => {
        if (row.cells[j].textContent !== text) row.cells[j].textContent = text;
      });
      row.fill.style.width = `${Math.min(100, (100 * toNumber(c)) / maxCum).toFixed(1)}%`;
    });
    fill(asks, askLevels);
    fill(bids, bidLevels);
    const b = book && book.bestBid(), a = book && book.bestAsk();
    noteCell.className = book ? "" : "empty";
    noteCell.textContent = !book ? (this.instrument ? "awaiting snapshot…" : "pick an instrument on the left")
      : b && a ? `spread ${sub(a[0], b[0])} · mid ${mid(a[0], b[0])}` : "one side empty";
    this.prevLadder = seen;
  }

  renderChart(book) {
    const canvas = $("depth");
    const ratio = window.devicePixelRatio || 1;
    if (!this.chartSize) {
      this.chartSize = [canvas.clientWidth, canvas.clientHeight]; // read once, not after each DOM update
      window.addEventListener("resize", () => (this.chartSize = null), { once: true });
    }
    const [w, h] = this.chartSize;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!book || (!book.bids.length && !book.asks.length)) return;
    const side = (levels) => {
      let total = 0;
      return levels.map(([p, s]) => [toNumber(p), (total += toNumber(s))]);
    };
    const bids = side(book.bids.top(CHART_DEPTH)), asks = side(book.asks.top(CHART_DEPTH));
    const prices = [...bids, ...asks].map((l) => l[0]);
    const lo = Math.min(...prices), hi = Math.max(...prices);
    const margin = hi > lo ? (hi - lo) * 0.04 : Math.abs(hi) * 0.01 || 1;
    const x0 = lo - margin, x1 = hi + margin; // each side's last step runs on to the edge
    const top = Math.max(...[...bids, ...asks].map((l) => l[1]));
    const pad = { l: 8, r: 8, t: 16, b: 22 };
    const x = (p) => pad.l + ((p - x0) / (x1 - x0)) * (w - pad.l - pad.r);
    const y = (c) => h - pad.b - (c / top) * (h - pad.t - pad.b);
    const draw = (levels, edge, stroke, fill) => {
      if (!levels.length) return;
      ctx.beginPath();
      ctx.moveTo(x(levels[0][0]), y(0));
      let prev = 0;
      for (const [p, c] of levels) {
        ctx.lineTo(x(p), y(prev));
        ctx.lineTo(x(p), y(c));
        prev = c;
      }
      ctx.lineTo(x(edge), y(prev));
      ctx.lineTo(x(edge), y(0));
      ctx.closePath();
      ctx.fillStyle = fill;
      ctx.fill();
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 1.5;
      ctx.stroke();
    };
    draw(bids, x0, "#1f9d55", "rgba(31,157,85,0.18)");
    draw(asks, x1, "#d64545", "rgba(214,69,69,0.18)");
    ctx.fillStyle = "#667";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(String(lo), pad.l, h - 6);
    ctx.textAlign = "right";
    ctx.fillText(String(hi), w - pad.r, h - 6);
    ctx.fillText(`cum ${top.toPrecision(4)}`, w - pad.r, 12);
    const b = book.bestBid(), a = book.bestAsk();
    if (b && a) {
      const m = toNumber(mid(b[0], a[0]));
      ctx.strokeStyle = "#99a";
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(x(m), pad.t);
      ctx.lineTo(x(m), h - pad.b);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.textAlign = "center";
      ctx.fillText(`mid ${mid(b[0], a[0])}`, x(m), h - 6);
    }
  }

  renderTrades(inst) {
    const trades = inst ? inst.trades.slice(-TRADES_SHOWN).reverse() : [];
    const body = $("trades-body");
    const key = `${inst ? inst.id : ""}:${trades.length}:${trades.length ? trades[0].recvNs : ""}`;
    if (body.dataset.key === key) return;
    body.dataset.key = key;
    if (!trades.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 4;
      td.className = "empty";
      td.textContent = "no trades yet";
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...trades.map((t) => {
      const tr = document.createElement("tr");
      tr.className = t.side === "buy" ? "bid" : t.side === "sell" ? "ask" : "";
      for (const text of [clockOf(t.tsEventNs ?? t.recvNs), t.side, t.price, t.size]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }));
  }

  renderEvents() {
    const list = $("events");
    const events = this.stream.events.slice(-40).reverse();
    if (list.dataset.count === String(this.stream.events.length) && list.dataset.last === String(events[0]?.recvNs)) return;
    list.dataset.count = String(this.stream.events.length);
    list.dataset.last = String(events[0]?.recvNs);
    list.replaceChildren(...events.map((e) => {
      const li = document.createElement("li");
      li.className = e.kind;
      const t = document.createElement("time");
      t.textContent = clockOf(e.recvNs);
      li.append(t, document.createTextNode(` ${e.text}`));
      return li;
    }));
  }
}

window.bookcastViewer = new Viewer();
