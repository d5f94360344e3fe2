// Exact decimal strings for the book viewer (PROTOCOL.md section 6). Pure: no DOM, no clock.
//
// Prices and sizes stay strings; a float is never a book key. `canonical` writes the protocol's canonical
// form ("0.50" -> "0.5", "1.000E2" -> "100", "0120.50" -> "120.5"), `compare` orders canonical strings by
// value without converting them, and `add`/`sub`/`mid` are exact (BigInt mantissa and a decimal scale).
// Numbers (floats) are used only to place things on screen (`toNumber`).

const DECIMAL = /^\+?(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;
const CANONICAL = /^(?:0|[1-9]\d*)(?:\.\d*[1-9])?$/; // already canonical: what bookcast sends

export class DecimalError extends Error {
  name = "DecimalError";
}

/** Canonical decimal string of a non-negative decimal `text` (string or integer).
 * @throws {DecimalError} not a finite non-negative decimal. */
export function canonical(text) {
  if (typeof text === "number" && Number.isInteger(text) && text >= 0) text = String(text);
  if (typeof text !== "string") throw new DecimalError(`not a decimal string: ${JSON.stringify(text)}`);
  if (CANONICAL.test(text)) return text;
  const m = DECIMAL.exec(text);
  if (!m || (m[1] === "" && (m[2] === undefined || m[2] === ""))) {
    throw new DecimalError(`not a decimal number: ${JSON.stringify(text)}`);
  }
  const frac = m[2] || "";
  let digits = (m[1] + frac).replace(/^0+/, "");
  let exponent = (m[3] ? parseInt(m[3], 10) : 0) - frac.length;
  if (digits === "") return "0";
  const trailing = digits.length - digits.replace(/0+$/, "").length;
  digits = digits.slice(0, digits.length - trailing);
  exponent += trailing;
  if (exponent >= 0) return digits + "0".repeat(exponent);
  const point = digits.length + exponent;
  if (point > 0) return `${digits.slice(0, point)}.${digits.slice(point)}`;
  return `0.${"0".repeat(-point)}${digits}`;
}

/** -1, 0 or 1 as canonical non-negative decimal strings `a` < = > `b` (by value). */
export function compare(a, b) {
  if (a === b) return 0;
  let ia = a.indexOf("."), ib = b.indexOf(".");
  if (ia < 0) ia = a.length;
  if (ib < 0) ib = b.length;
  if (ia !== ib) return ia < ib ? -1 : 1; // integer parts have no leading zeros: longer is larger
  // same integer length: character order is value order, and canonical fractions have no trailing zeros,
  // so a strict prefix is the smaller value ("0.5" < "0.55")
  return a < b ? -1 : 1;
}

function scaled(text) {
  const c = text.startsWith("-") ? "-" + canonical(text.slice(1)) : canonical(text);
  const point = c.indexOf(".");
  if (point < 0) return [BigInt(c), 0];
  return [BigInt(c.slice(0, point) + c.slice(point + 1)), c.length - point - 1];
}

function unscaled(mantissa, scale) {
  const negative = mantissa < 0n;
  let digits = (negative ? -mantissa : mantissa).toString();
  if (scale > 0) {
    digits = digits.padStart(scale + 1, "0");
    digits = `${digits.slice(0, digits.length - scale)}.${digits.slice(digits.length - scale)}`;
    digits = digits.replace(/\.?0+$/, "");
  }
  return (negative && digits !== "0" ? "-" : "") + digits;
}

function align(a, b) {
  const [ma, sa] = scaled(a), [mb, sb] = scaled(b);
  const s = Math.max(sa, sb);
  return [ma * 10n ** BigInt(s - sa), mb * 10n ** BigInt(s - sb), s];
}

/** a + b, exact. */
export function add(a, b) {
  const [ma, mb, s] = align(a, b);
  return unscaled(ma + mb, s);
}

/** a - b, exact; may be negative ("-0.01") for a crossed book's spread. */
export function sub(a, b) {
  const [ma, mb, s] = align(a, b);
  return unscaled(ma - mb, s);
}

/** (a + b) / 2, exact. */
export function mid(a, b) {
  const [ma, mb, s] = align(a, b);
  return unscaled((ma + mb) * 5n, s + 1);
}

/** A float for drawing only (never for keys or arithmetic that is shown as exact). */
export function toNumber(text) {
  return Number(text);
}
