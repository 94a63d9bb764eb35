// Code grids on the wire: h·w int32 little-endian, row-major, as raw bytes (vq.proto). Decoding them validates
// everything a client can get wrong, each error naming the field and the limit.
import { InvalidArgument } from '../../lib/rpc/errors.js';

export interface CodeLimits {
  /** Valid codes are [0, codebookSize). */
  codebookSize: number;
  /** Largest h·w accepted. */
  maxCodes: number;
}

export function codesToBytes(codes: Int32Array): Buffer {
  const out = Buffer.alloc(codes.length * 4);
  for (let i = 0; i < codes.length; i++) out.writeInt32LE(codes[i], i * 4);
  return out;
}

/** Grid size checks: h, w ≥ 1 and h·w ≤ maxCodes. */
export function checkGrid(h: unknown, w: unknown, limits: CodeLimits): void {
  if (!Number.isInteger(h) || (h as number) < 1) throw new InvalidArgument(`h must be an integer >= 1, got ${h}`);
  if (!Number.isInteger(w) || (w as number) < 1) throw new InvalidArgument(`w must be an integer >= 1, got ${w}`);
  const n = (h as number) * (w as number);
  if (n > limits.maxCodes) {
    throw new InvalidArgument(`grid h×w = ${h}×${w} = ${n} codes exceeds the limit of ${limits.maxCodes} codes`);
  }
}

/** The grid of a DecodeRequest; throws InvalidArgument naming the first problem. */
export function codesFromBytes(h: number, w: number, bytes: Uint8Array, limits: CodeLimits): Int32Array {
  checkGrid(h, w, limits);
  const n = h * w;
  if (bytes.length !== n * 4) {
    throw new InvalidArgument(
      `codes has ${bytes.length} bytes but h×w = ${h}×${w} needs ${n * 4} (${n} int32 little-endian values)`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const codes = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const c = view.getInt32(i * 4, true);
    if (c < 0 || c >= limits.codebookSize) {
      throw new InvalidArgument(
        `code ${c} at row ${Math.floor(i / w)}, column ${i % w} is outside the codebook [0, ${limits.codebookSize})`,
      );
    }
    codes[i] = c;
  }
  return codes;
}

/** The JSON form the CLI prints and reads: { h, w, codes: [[...row 0], [...row 1], ...] }. */
export interface CodeGridJson {
  h: number;
  w: number;
  codes: number[][];
}

export function gridToJson(h: number, w: number, codes: Int32Array): CodeGridJson {
  const rows: number[][] = [];
  for (let r = 0; r < h; r++) rows.push(Array.from(codes.subarray(r * w, (r + 1) * w)));
  return { h, w, codes: rows };
}

/** Parses the CLI's code JSON; `source` names the file in errors. Ragged rows and non-integers are rejected. */
export function gridFromJson(
  json: unknown,
  source: string,
  limits: CodeLimits,
): { h: number; w: number; codes: Int32Array } {
  const obj = json as Partial<CodeGridJson> | null;
  if (typeof obj !== 'object' || obj === null || !Array.isArray(obj.codes)) {
    throw new InvalidArgument(`${source}: expected { "h", "w", "codes": [[...], ...] }`);
  }
  const rows = obj.codes;
  const h = obj.h ?? rows.length;
  const w = obj.w ?? (Array.isArray(rows[0]) ? rows[0].length : 0);
  checkGrid(h, w, limits);
  if (rows.length !== h) throw new InvalidArgument(`${source}: h is ${h} but codes has ${rows.length} rows`);
  const bytes = Buffer.alloc(h * w * 4);
  rows.forEach((row, r) => {
    if (!Array.isArray(row) || row.length !== w) {
      throw new InvalidArgument(
        `${source}: row ${r} has ${Array.isArray(row) ? row.length : 'no'} codes, expected w = ${w}`,
      );
    }
    row.forEach((c, col) => {
      if (!Number.isInteger(c) || c < -(2 ** 31) || c >= 2 ** 31) {
        throw new InvalidArgument(`${source}: codes[${r}][${col}] = ${JSON.stringify(c)} is not an int32`);
      }
      bytes.writeInt32LE(c, (r * w + col) * 4);
    });
  });
  return { h, w, codes: codesFromBytes(h, w, bytes, limits) };
}
