// "Download what I saw": every frame the page received, as a capture file (PROTOCOL.md section 9).
//
// One JSON line per frame, in receive order:
//   {"recv_ts_ns": <int>, "venue": "bookcast", "msg": <the frame's JSON text, byte for byte>}
// The "venue" is bookcast itself: the page's upstream is a gateway speaking PROTOCOL.md v1, so `msg` is a
// bookcast message, not a venue's. The frame text is embedded unchanged (never re-serialized: its ns stamps
// do not fit a double); a frame that is not JSON is kept as a JSON string. `bookcast replay --check FILE`
// verifies such a file (seq chain, epoch, checksums; feed/streamcheck.py).
//
// Bounded: past `maxBytes` of frame text the oldest frames are dropped (counted in `dropped`). A capture
// that starts mid-stream stays checkable: deltas before the first snapshot are ignored by the checker.

export const CAPTURE_VENUE = "bookcast";

export class Recorder {
  constructor(maxBytes = 64 * 1024 * 1024) {
    this.maxBytes = maxBytes;
    this.frames = []; // [recvTsNs (decimal string), msg JSON text]
    this.head = 0;
    this.bytes = 0;
    this.dropped = 0;
  }

  get count() {
    return this.frames.length - this.head;
  }

  /** Record one received frame. `recvTsNs`: BigInt ns since the Unix epoch; `isJson`: the text parsed. */
  add(recvTsNs, text, isJson) {
    const msg = isJson ? text : JSON.stringify(text);
    this.frames.push([recvTsNs.toString(), msg]);
    this.bytes += msg.length;
    while (this.bytes > this.maxBytes && this.count > 1) {
      this.bytes -= this.frames[this.head][1].length;
      this.frames[this.head] = null;
      this.head += 1;
      this.dropped += 1;
    }
    if (this.head > 4096 && this.head * 2 > this.frames.length) {
      this.frames = this.frames.slice(this.head);
      this.head = 0;
    }
  }

  /** The capture as JSON Lines text. */
  toJsonl() {
    const lines = [];
    for (let i = this.head; i < this.frames.length; i++) {
      const [ts, msg] = this.frames[i];
      lines.push(`{"recv_ts_ns":${ts},"venue":"${CAPTURE_VENUE}","msg":${msg}}\n`);
    }
    return lines.join("");
  }
}
