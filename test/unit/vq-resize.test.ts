// The BICUBIC resize against Pillow's own output (test/fixtures/pillow, made by make-fixtures.py with Debian's
// python3-pil): every byte must match.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { bicubicCoefficients, resizeBicubic } from '../../lib/vq/resize.js';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/pillow');

interface ResizeCase {
  name: string;
  srcWidth: number;
  srcHeight: number;
  width: number;
  height: number;
  src?: string;
  out?: string;
  patternSeed?: number;
  srcSha256: string;
  outSha256: string;
}

const manifest = JSON.parse(readFileSync(path.join(FIXTURES, 'manifest.json'), 'utf8')) as {
  pillowVersion: string;
  resize: ResizeCase[];
};

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** The procedural source of make-fixtures.py's pattern_rgb: wrapping ramps plus 5 bits of xorshift32 noise. */
function patternRgb(width: number, height: number, seed: number): Uint8Array {
  const out = new Uint8Array(width * height * 3);
  let state = seed >>> 0;
  let i = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        state = (state ^ (state << 13)) >>> 0;
        state = (state ^ (state >>> 17)) >>> 0;
        state = (state ^ (state << 5)) >>> 0;
        out[i++] = (x * 3 + y * 5 + c * 85 + (state & 31)) & 255;
      }
    }
  }
  return out;
}

function source(c: ResizeCase): Uint8Array {
  const src = c.src
    ? new Uint8Array(readFileSync(path.join(FIXTURES, c.src)))
    : patternRgb(c.srcWidth, c.srcHeight, c.patternSeed!);
  assert.equal(sha256(src), c.srcSha256, `${c.name}: source bytes differ from the ones Pillow resized`);
  return src;
}

function describeMismatch(actual: Uint8Array, expected: Uint8Array, width: number): string {
  let count = 0;
  let first = -1;
  let maxDiff = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (d === 0) continue;
    if (first < 0) first = i;
    count++;
    maxDiff = Math.max(maxDiff, d);
  }
  const px = Math.floor(first / 3);
  return `${count} bytes differ (max |diff| ${maxDiff}); first at x=${px % width} y=${Math.floor(px / width)} ch=${first % 3}: got ${actual[first]}, Pillow ${expected[first]}`;
}

for (const c of manifest.resize) {
  test(`resize ${c.name}: ${c.srcWidth}x${c.srcHeight} -> ${c.width}x${c.height} equals Pillow ${manifest.pillowVersion}`, () => {
    const src = source(c);
    const out = resizeBicubic(src, c.srcWidth, c.srcHeight, c.width, c.height);
    assert.equal(out.length, c.width * c.height * 3);
    if (c.out) {
      const expected = new Uint8Array(readFileSync(path.join(FIXTURES, c.out)));
      assert.equal(sha256(expected), c.outSha256);
      if (Buffer.compare(Buffer.from(out), Buffer.from(expected)) !== 0) {
        assert.fail(`${c.name}: ${describeMismatch(out, expected, c.width)}`);
      }
    } else {
      assert.equal(sha256(out), c.outSha256, `${c.name}: output differs from Pillow's (sha256)`);
    }
  });
}

test('resize to the same size returns an equal copy, not the same buffer', () => {
  const src = patternRgb(9, 7, 1);
  const out = resizeBicubic(src, 9, 7, 9, 7);
  assert.notEqual(out, src);
  assert.deepEqual(out, src);
});

test('resize works for 1 and 4 channels, each channel resized like a grey image', () => {
  const rgb = patternRgb(13, 11, 5);
  const rgbOut = resizeBicubic(rgb, 13, 11, 6, 17);
  for (let ch = 0; ch < 3; ch++) {
    const plane = rgb.filter((_, i) => i % 3 === ch);
    const planeOut = resizeBicubic(plane, 13, 11, 6, 17, 1);
    assert.deepEqual(
      planeOut,
      rgbOut.filter((_, i) => i % 3 === ch),
    );
  }
  const rgba = new Uint8Array(13 * 11 * 4).map((_, i) => (i % 4 === 3 ? 200 : rgb[(i >> 2) * 3 + (i % 4)]));
  const rgbaOut = resizeBicubic(rgba, 13, 11, 6, 17, 4);
  assert.deepEqual(
    rgbaOut.filter((_, i) => i % 4 !== 3),
    rgbOut,
  );
});

test('fixed-point coefficients sum to 1.0 within rounding and cover the widened support when downscaling', () => {
  for (const [inSize, outSize] of [
    [100, 20],
    [20, 100],
    [1024, 720],
    [7, 7],
  ]) {
    const c = bicubicCoefficients(inSize, outSize);
    const scale = Math.max(inSize / outSize, 1);
    assert.equal(c.taps, Math.ceil(2 * scale) * 2 + 1);
    for (let i = 0; i < outSize; i++) {
      let sum = 0;
      for (let j = 0; j < c.taps; j++) sum += c.weights[i * c.taps + j];
      assert.ok(Math.abs(sum - (1 << 22)) <= c.taps, `${inSize}->${outSize} sample ${i}: sum ${sum}`);
      assert.ok(c.first[i] >= 0 && c.first[i] + c.count[i] <= inSize);
    }
  }
});

test('resize rejects a buffer whose length does not match the stated size', () => {
  assert.throws(() => resizeBicubic(new Uint8Array(10), 2, 2, 4, 4), /source has 10 bytes, expected 2x2x3 = 12/);
  assert.throws(() => resizeBicubic(new Uint8Array(12), 2, 2, 0, 4), /target width must be an integer >= 1/);
});
