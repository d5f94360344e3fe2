// Book checksum of PROTOCOL.md section 6, computed in the page. Pure: no DOM, no clock.
//
// Take the best 10 asks (lowest first) and the best 10 bids (highest first), write each level as
// `price:size` in canonical form, join each side with ",", join asks and bids with "|" (asks first), and
// take the CRC-32 (zlib/IEEE 802.3, reflected polynomial 0xEDB88320, unsigned 32-bit) of the UTF-8 bytes.

import { canonical } from "./decimal.js";

export const CHECKSUM_DEPTH = 10;

const TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

const UTF8 = new TextEncoder();

/** CRC-32 (zlib's `crc32`) of a string's UTF-8 bytes, as an unsigned 32-bit integer. */
export function crc32(text) {
  let crc = 0xffffffff;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code > 0x7f) return crc32Bytes(UTF8.encode(text)); // not ASCII: encode (decimals never are)
    crc = TABLE[(crc ^ code) & 0xff] ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

function crc32Bytes(bytes) {
  let crc = 0xffffffff;
  for (const byte of bytes) crc = TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** The string that is checksummed. `bids`/`asks`: arrays of [price, size] strings, best first; only the
 * first CHECKSUM_DEPTH of each are read, each written in canonical form. */
export function checksumString(bids, asks) {
  const side = (levels) => levels.slice(0, CHECKSUM_DEPTH).map(([p, s]) => `${canonical(p)}:${canonical(s)}`).join(",");
  return `${side(asks)}|${side(bids)}`;
}

/** The section 6 checksum of a book given as best-first [price, size] arrays. */
export function checksum(bids, asks) {
  return crc32(checksumString(bids, asks));
}

/** `checksum` for levels already in canonical form (a Book's own), without re-writing them. */
export function checksumCanonical(bids, asks) {
  const side = (levels) => levels.slice(0, CHECKSUM_DEPTH).map(([p, s]) => `${p}:${s}`).join(",");
  return crc32(`${side(asks)}|${side(bids)}`);
}
