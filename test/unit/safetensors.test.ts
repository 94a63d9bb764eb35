import assert from 'node:assert/strict';
import fs, {
  closeSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import type { FloatDtype } from '../../lib/model/dtype.js';
import { CheckpointError } from '../../lib/model/errors.js';
import { SafetensorsFile, writeSafetensors } from '../../lib/model/safetensors.js';
import { Rng } from '../../lib/util/rng.js';

const dir = mkdtempSync(join(tmpdir(), 'safetensors-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/**
 * Round-to-nearest-even of a float64 to a binary float with `mantBits` stored significand bits, smallest normal
 * exponent `minExp` and largest finite value `maxFinite`; plain arithmetic on powers of two, no bit tricks.
 */
function roundToFormat(x: number, mantBits: number, minExp: number, maxFinite: number): number {
  if (x === 0 || !Number.isFinite(x)) return x;
  const a = Math.abs(x);
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  const ulp = 2 ** (Math.max(e, minExp) - mantBits);
  const q = a / ulp;
  let r = Math.floor(q);
  const frac = q - r;
  if (frac > 0.5 || (frac === 0.5 && r % 2 === 1)) r++;
  const y = r * ulp;
  return Math.sign(x) * (y > maxFinite ? Number.POSITIVE_INFINITY : y);
}
const bf16 = (x: number) => roundToFormat(x, 7, -126, (2 - 2 ** -7) * 2 ** 127);
const f16 = (x: number) => roundToFormat(x, 10, -14, 65504);

function testValues(): Float32Array {
  const rng = new Rng(11);
  const v: number[] = [];
  for (let p = -30; p <= 20; p++) for (let i = 0; i < 40; i++) v.push(rng.normal() * 2 ** p);
  // Ties: halfway between two bf16 / f16 neighbours (round to the even one), subnormals, overflow.
  v.push(
    1 + 2 ** -8,
    1 + 3 * 2 ** -8,
    -(1 + 2 ** -8),
    1 + 2 ** -11,
    1 + 3 * 2 ** -11,
    2 ** -25,
    3 * 2 ** -25,
    2 ** -24,
  );
  v.push(65504, 65519, 65520, -70000, 2 ** -126, 3 * 2 ** -133, 0, -0, 1e38, 3.3e38);
  return Float32Array.from(v);
}

/** A safetensors file built by hand (independent of writeSafetensors). */
function rawFile(path: string, header: unknown, data: Uint8Array, headerOverride?: Buffer): void {
  const json = headerOverride ?? Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, data]));
}

function expectError(fn: () => unknown, ...patterns: RegExp[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof CheckpointError, `not a CheckpointError: ${e}`);
    for (const p of patterns) assert.match(e.message, p);
    return true;
  });
}

/** Counts the bytes requested from fs.readSync (also through the named import in safetensors.js) while fn runs. */
function countReadBytes<T>(fn: () => T): { result: T; bytes: number; largest: number } {
  const original = fs.readSync;
  let bytes = 0;
  let largest = 0;
  fs.readSync = ((...args: Parameters<typeof fs.readSync>) => {
    const n = original(...args);
    bytes += n;
    largest = Math.max(largest, n);
    return n;
  }) as typeof fs.readSync;
  syncBuiltinESMExports();
  try {
    return { result: fn(), bytes, largest };
  } finally {
    fs.readSync = original;
    syncBuiltinESMExports();
  }
}

describe('safetensors round trip', () => {
  const values = testValues();
  const expected: Record<FloatDtype, (x: number) => number> = { F32: (x) => x, BF16: bf16, F16: f16 };
  for (const dtype of ['F32', 'BF16', 'F16'] as const) {
    it(`${dtype}: values come back rounded to nearest even, as independent arithmetic says`, () => {
      const path = join(dir, `rt-${dtype}.safetensors`);
      writeSafetensors(path, [
        { name: 'a', dtype, shape: [values.length], produce: () => values },
        { name: 'b.weight', dtype, shape: [2, 3], produce: () => Float32Array.from([1, 2, 3, 4, 5, 6]) },
      ]);
      const f = SafetensorsFile.open(path);
      try {
        assert.deepEqual(f.metadata, { format: 'pt' });
        assert.equal((8 + f.headerBytes.length) % 8, 0, 'data section aligned to 8 bytes');
        assert.deepEqual(f.info('b.weight').shape, [2, 3]);
        assert.equal(f.info('a').dtype, dtype);
        const got = f.readF32('a');
        const want = Float32Array.from(values, expected[dtype]);
        for (let i = 0; i < values.length; i++) {
          assert.ok(Object.is(got[i], want[i]), `${dtype}: ${values[i]} read back as ${got[i]}, expected ${want[i]}`);
        }
        assert.deepEqual(f.readF32('b.weight'), Float32Array.from([1, 2, 3, 4, 5, 6]));
      } finally {
        f.close();
      }
    });
  }

  it('the independent rounding agrees with known values', () => {
    assert.equal(bf16(1 + 2 ** -8), 1);
    assert.equal(bf16(1 + 3 * 2 ** -8), 1 + 2 ** -6);
    assert.equal(f16(65519), 65504);
    assert.equal(f16(65520), Number.POSITIVE_INFINITY);
    assert.equal(f16(2 ** -25), 0);
    assert.equal(f16(3 * 2 ** -25), 2 ** -23);
  });
});

describe('safetensors header and data errors', () => {
  const good = { __metadata__: { format: 'pt' }, w: { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] } };
  const data = new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer);
  const path = join(dir, 'bad.safetensors');

  it('reads a hand-made file', () => {
    rawFile(path, good, data);
    const f = SafetensorsFile.open(path);
    assert.deepEqual(f.readF32('w'), Float32Array.from([1, 2, 3, 4]));
    expectError(() => f.info('nope'), new RegExp(`${path}: tensor nope is missing`));
    f.close();
    expectError(() => f.readF32('w'), /file already closed/);
  });

  it('bad header length', () => {
    const json = Buffer.from(JSON.stringify(good));
    const buf = Buffer.concat([Buffer.alloc(8), json, data]);
    buf.writeBigUInt64LE(BigInt(buf.length));
    writeFileSync(path, buf);
    expectError(
      () => SafetensorsFile.open(path),
      new RegExp(`${path}: corrupt safetensors header \\(header length ${buf.length}`),
    );
    buf.writeBigUInt64LE(0n);
    writeFileSync(path, buf);
    expectError(() => SafetensorsFile.open(path), /corrupt safetensors header \(header length 0/);
    writeFileSync(path, Buffer.from([1, 2, 3]));
    expectError(() => SafetensorsFile.open(path), /not a safetensors file \(only 3 bytes\)/);
    expectError(
      () => SafetensorsFile.open(join(dir, 'absent.safetensors')),
      /absent.safetensors: cannot open \(ENOENT\)/,
    );
  });

  it('bad JSON, or JSON that is not an object', () => {
    rawFile(path, null, data, Buffer.from('{"w": {"dtype": "F32",'));
    expectError(() => SafetensorsFile.open(path), new RegExp(`${path}: corrupt safetensors header \\(invalid JSON`));
    rawFile(path, [1, 2], data);
    expectError(() => SafetensorsFile.open(path), /corrupt safetensors header \(not a JSON object\)/);
  });

  it('truncated file', () => {
    rawFile(path, good, data.subarray(0, 12));
    expectError(
      () => SafetensorsFile.open(path),
      /tensor w: data ends at byte \d+ but the file has \d+ bytes \(truncated file\?\)/,
    );
  });

  it('unknown dtype, bad shape, offsets that disagree with the shape', () => {
    for (const dtype of ['F9', 'toString', 'constructor']) {
      rawFile(path, { w: { ...good.w, dtype } }, data);
      expectError(() => SafetensorsFile.open(path), new RegExp(`tensor w: unknown dtype "${dtype}"`));
    }
    rawFile(path, { w: { ...good.w, shape: [2, -2] } }, data);
    expectError(() => SafetensorsFile.open(path), /tensor w: invalid shape \[2,-2\]/);
    rawFile(path, { w: { ...good.w, shape: [2, 3] } }, data);
    expectError(() => SafetensorsFile.open(path), /tensor w: data_offsets span 16 bytes but F32 \[2,3\] needs 24/);
  });

  it('unsupported dtype is named when read as float', () => {
    rawFile(path, { q: { dtype: 'I8', shape: [4], data_offsets: [0, 4] } }, new Uint8Array([1, 2, 3, 4]));
    const f = SafetensorsFile.open(path);
    try {
      expectError(
        () => f.readF32('q'),
        new RegExp(`${path}: tensor q has dtype I8; only F32, BF16 and F16 are supported`),
      );
    } finally {
      f.close();
    }
  });
});

describe('safetensors reads only what it needs', () => {
  // A 2 GiB + 16 byte file, sparse on disk: a small tensor, then a big one. Reading it whole would take seconds and 2 GB.
  after(() => rmSync(path, { force: true }));
  const path = join(dir, 'sparse.safetensors');
  const BIG = 2 ** 29 + 2; // F32 values: 2 GiB + 8 bytes
  const header = Buffer.from(
    JSON.stringify({
      small: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      big: { dtype: 'F32', shape: [BIG], data_offsets: [8, 8 + 4 * BIG] },
    }),
  );
  const dataStart = 8 + header.length;
  const fileSize = dataStart + 8 + 4 * BIG;

  it('reads the header and one tensor, never the whole file', () => {
    const fd = openSync(path, 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    writeSync(fd, len, 0, 8, 0);
    writeSync(fd, header, 0, header.length, 8);
    writeSync(fd, Buffer.from(new Float32Array([0.5, -2]).buffer), 0, 8, dataStart);
    ftruncateSync(fd, fileSize);
    closeSync(fd);

    const { result, bytes } = countReadBytes(() => {
      const f = SafetensorsFile.open(path);
      try {
        return f.readF32('small');
      } finally {
        f.close();
      }
    });
    assert.deepEqual(result, Float32Array.from([0.5, -2]));
    assert.equal(bytes, 8 + header.length + 8, `read ${bytes} bytes of a ${fileSize}-byte file`);
  });

  it('reads big tensors in chunks of readChunkBytes (one read() cannot return more than 2 GiB)', () => {
    const p = join(dir, 'chunks.safetensors');
    const v = Float32Array.from({ length: 2501 }, (_, i) => i - 0.5);
    writeSafetensors(p, [
      { name: 'x', dtype: 'F32', shape: [v.length], produce: () => v },
      { name: 'y', dtype: 'BF16', shape: [v.length], produce: () => v },
    ]);
    const saved = SafetensorsFile.readChunkBytes;
    SafetensorsFile.readChunkBytes = 1000; // not a multiple of 4: chunks split values
    try {
      const { result, largest } = countReadBytes(() => {
        const f = SafetensorsFile.open(p);
        try {
          return [f.readF32('x'), f.readF32('y')];
        } finally {
          f.close();
        }
      });
      assert.deepEqual(result[0], v);
      assert.deepEqual(result[1], Float32Array.from(v, bf16));
      assert.ok(largest <= 1000, `a read of ${largest} bytes`);
    } finally {
      SafetensorsFile.readChunkBytes = saved;
    }
    assert.ok(SafetensorsFile.readChunkBytes < 2 ** 31);
  });

  it('round-trips the writer output byte for byte through readRaw', () => {
    const p = join(dir, 'raw.safetensors');
    const v = Float32Array.from([1.5, -3, 1e-3]);
    writeSafetensors(p, [{ name: 'x', dtype: 'F32', shape: [3], produce: () => v }]);
    const f = SafetensorsFile.open(p);
    try {
      const t = f.info('x');
      assert.ok(f.readRaw('x').equals(readFileSync(p).subarray(t.begin, t.end)));
      assert.ok(f.readRaw('x').equals(Buffer.from(v.buffer)));
    } finally {
      f.close();
    }
  });
});
