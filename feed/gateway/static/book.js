// Exact L2 book of one instrument for the viewer. Pure: no DOM, no clock.
//
// Each side keeps its canonical price strings in a sorted array (ascending by value, binary search on
// update) and a Map price -> canonical size. Bids iterate best (highest) first, asks best (lowest) first.
// Prices and sizes stay strings (decimal.js compares them by value): a float is never a key.

import { canonical, compare } from "./decimal.js";
import { CHECKSUM_DEPTH, checksumCanonical } from "./checksum.js";

export class BookError extends Error {
  name = "BookError";
}

class BookSide {
  constructor(bestIsHighest) {
    this.bestIsHighest = bestIsHighest;
    this.prices = []; // ascending by value
    this.sizes = new Map();
  }

  clear() {
    this.prices = [];
    this.sizes = new Map();
  }

  /** Replace the side with canonical [price, size] levels (size "0" skipped; a repeated price keeps the
   * last size): one sort instead of an insertion per level. */
  load(levels) {
    this.sizes = new Map();
    for (const [p, s] of levels) {
      if (s === "0") this.sizes.delete(p);
      else this.sizes.set(p, s);
    }
    this.prices = [...this.sizes.keys()].sort(compare);
  }

  /** Set a level's new absolute size; "0" removes it. */
  set(price, size) {
    const had = this.sizes.has(price);
    if (size === "0") {
      if (!had) return;
      this.sizes.delete(price);
      this.prices.splice(this._index(price), 1);
      return;
    }
    this.sizes.set(price, size);
    if (!had) this.prices.splice(this._index(price), 0, price);
  }

  _index(price) {
    let lo = 0, hi = this.prices.length;
    while (lo < hi) {
      const m = (lo + hi) >>> 1;
      if (compare(this.prices[m], price) < 0) lo = m + 1; else hi = m;
    }
    return lo;
  }

  get length() {
    return this.prices.length;
  }

  /** The best `n` levels as [price, size], best first. */
  top(n = Infinity) {
    const out = [];
    const len = this.prices.length;
    const count = Math.min(n, len);
    for (let i = 0; i < count; i++) {
      const p = this.prices[this.bestIsHighest ? len - 1 - i : i];
      out.push([p, this.sizes.get(p)]);
    }
    return out;
  }
}

function level(value, where) {
  if (!Array.isArray(value) || value.length !== 2) throw new BookError(`${where}: level must be [price, size], got ${JSON.stringify(value)}`);
  try {
    return [canonical(value[0]), canonical(value[1])];
  } catch (err) {
    throw new BookError(`${where}: ${err.message}`);
  }
}

export class Book {
  constructor() {
    this.bids = new BookSide(true);
    this.asks = new BookSide(false);
  }

  /** Replace the whole book from a snapshot's `bids`/`asks` ([price, size] strings). Size "0" skipped.
   * @throws {BookError} a malformed level (the book is left empty). */
  loadSnapshot(bids, asks) {
    this.bids.clear();
    this.asks.clear();
    const parsed = [bids, asks].map((levels, i) => {
      const name = i ? "asks" : "bids";
      if (!Array.isArray(levels)) throw new BookError(`snapshot field '${name}' must be a list`);
      return levels.map((raw) => level(raw, `snapshot ${name}`));
    });
    this.bids.load(parsed[0]);
    this.asks.load(parsed[1]);
  }

  /** Validate every change of a delta (`[side, price, new_size]`), then apply them in order.
   * @throws {BookError} a malformed change (nothing applied). */
  applyChanges(changes) {
    if (!Array.isArray(changes)) throw new BookError("delta field 'changes' must be a list");
    const parsed = changes.map((c) => {
      if (!Array.isArray(c) || c.length !== 3 || (c[0] !== "bid" && c[0] !== "ask")) {
        throw new BookError(`delta change must be [side, price, new_size], got ${JSON.stringify(c)}`);
      }
      const [p, s] = level([c[1], c[2]], "delta change");
      return [c[0], p, s];
    });
    for (const [side, p, s] of parsed) (side === "bid" ? this.bids : this.asks).set(p, s);
  }

  bestBid() {
    return this.bids.top(1)[0] || null;
  }

  bestAsk() {
    return this.asks.top(1)[0] || null;
  }

  isCrossed() {
    const b = this.bestBid(), a = this.bestAsk();
    return b !== null && a !== null && compare(b[0], a[0]) >= 0;
  }

  checksum() {
    return checksumCanonical(this.bids.top(CHECKSUM_DEPTH), this.asks.top(CHECKSUM_DEPTH));
  }
}
