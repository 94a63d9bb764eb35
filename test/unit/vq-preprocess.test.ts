// Decoding (PIL convert("RGB") semantics), input limits and errors, preprocessing and postprocessing of VQ images,
// checked against Pillow's output committed in test/fixtures/pillow (see make-fixtures.py there).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { crc32, deflateSync } from 'node:zlib';
import sharp from 'sharp';
import { smartResize } from '../../lib/prompt/smart-resize.js';
import { decodeToRgb, ImageInputError, type ImageInputErrorCode, readImageHeader } from '../../lib/vq/image-decode.js';
import { pixelsToRgb, postprocessToPng } from '../../lib/vq/postprocess.js';
import {
  loadPreprocessorConfig,
  PREPROCESSOR_DEFAULTS,
  parsePreprocessorConfig,
  preprocessImage,
  preprocessRgb,
} from '../../lib/vq/preprocess.js';
import { resizeBicubic } from '../../lib/vq/resize.js';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/pillow');

interface DecodeCase {
  name: string;
  file: string;
  sha256: string;
  pillowMode?: string;
  width?: number;
  height?: number;
  expected?: string;
  resized?: { width: number; height: number; sha256: string };
}

const manifest = JSON.parse(readFileSync(path.join(FIXTURES, 'manifest.json'), 'utf8')) as {
  pillowVersion: string;
  decode: DecodeCase[];
  normalizedByByte: number[];
};
const fixture = (name: string) => new Uint8Array(readFileSync(path.join(FIXTURES, 'decode', name)));
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

async function rejectsWith(promise: Promise<unknown>, code: ImageInputErrorCode, message: RegExp): Promise<void> {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof ImageInputError, `expected ImageInputError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  });
}

function pngChunk(kind: string, data: Uint8Array): Buffer {
  const body = Buffer.concat([Buffer.from(kind, 'latin1'), data]);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

/** A valid-looking RGB PNG header declaring width x height, with only `rows` rows of data (the rest missing). */
function pngWithHeader(width: number, height: number, rows: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  const raw = Buffer.alloc(rows * (1 + width * 3));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk('IHDR', ihdr),
    pngChunk('IDAT', deflateSync(raw)),
    pngChunk('IEND', new Uint8Array(0)),
  ]);
}

/** A lossless WebP (VP8L) header declaring width x height, followed by a few bytes of nothing. */
function webpWithHeader(width: number, height: number): Buffer {
  const vp8l = Buffer.alloc(10);
  vp8l[0] = 0x2f;
  vp8l.writeUInt32LE(((width - 1) | ((height - 1) << 14)) >>> 0, 1);
  const chunkHeader = Buffer.alloc(8);
  chunkHeader.write('VP8L', 0, 'latin1');
  chunkHeader.writeUInt32LE(vp8l.length, 4);
  const riff = Buffer.alloc(12);
  riff.write('RIFF', 0, 'latin1');
  riff.writeUInt32LE(4 + 8 + vp8l.length, 4);
  riff.write('WEBP', 8, 'latin1');
  return Buffer.concat([riff, chunkHeader, vp8l]);
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding: every fixture Pillow can open must decode to exactly Pillow's convert("RGB") bytes.

for (const c of manifest.decode.filter((d) => d.expected)) {
  test(`decode ${c.name} (Pillow mode ${c.pillowMode}) equals Pillow ${manifest.pillowVersion} convert("RGB")`, async () => {
    const bytes = fixture(c.name);
    assert.equal(sha256(bytes), c.sha256);
    const img = await decodeToRgb(bytes);
    assert.equal(img.width, c.width);
    assert.equal(img.height, c.height);
    const expected = new Uint8Array(readFileSync(path.join(FIXTURES, c.expected!)));
    let differing = 0;
    for (let i = 0; i < expected.length; i++) if (img.data[i] !== expected[i]) differing++;
    assert.equal(differing, 0, `${c.name}: ${differing} of ${expected.length} bytes differ from Pillow`);
    assert.equal(img.data.length, expected.length);
  });
}

test('the fixtures exercise what they claim: ICC applied, EXIF rotation or CMYK profile would change the result', async () => {
  // Pillow ignores the embedded (primaries-swapping) profile; sharp's default pipeline applies it.
  const icc = fixture('icc-swapped.png');
  const managed = await sharp(icc).raw().toBuffer();
  const pillow = readFileSync(path.join(FIXTURES, 'decode/icc-swapped.png.rgb'));
  assert.notDeepEqual(new Uint8Array(managed), new Uint8Array(pillow));
  // The EXIF orientation would turn the 40x30 image into 30x40; the reference keeps the stored grid.
  const rotated = await sharp(fixture('exif-rotate-90.jpg')).autoOrient().raw().toBuffer({ resolveWithObject: true });
  assert.equal(rotated.info.width, 30);
  assert.deepEqual(await readImageHeader(fixture('exif-rotate-90.jpg')), {
    format: 'jpeg',
    width: 40,
    height: 30,
    space: 'srgb',
    channels: 3,
  });
  // sharp's own colour-managed CMYK conversion is not Pillow's formula.
  const cmykManaged = await sharp(fixture('cmyk.jpg')).raw().toBuffer();
  assert.notDeepEqual(
    new Uint8Array(cmykManaged),
    new Uint8Array(readFileSync(path.join(FIXTURES, 'decode/cmyk.jpg.rgb'))),
  );
  // The GIF has a second frame that differs from the first.
  const frames = await sharp(fixture('anim.gif'), { pages: -1 }).metadata();
  assert.equal(frames.pages, 2);
});

// ---------------------------------------------------------------------------------------------------------------
// Errors: each has its code and a message naming the problem and the limit.

test('truncated PNG and JPEG data are TRUNCATED', async () => {
  const png = fixture('rgba.png');
  await rejectsWith(
    decodeToRgb(png.subarray(0, png.length >> 1)),
    'TRUNCATED',
    /png image 40x30 is truncated or corrupt/,
  );
  await rejectsWith(decodeToRgb(png.subarray(0, 20)), 'TRUNCATED', /png image header is truncated or corrupt/);
  const jpg = fixture('rgb.jpg');
  await rejectsWith(decodeToRgb(jpg.subarray(0, jpg.length - 200)), 'TRUNCATED', /jpeg image 40x30 is truncated/);
});

test('random bytes, text and an empty buffer are NOT_AN_IMAGE', async () => {
  const random = new Uint8Array(1000);
  let s = 12345;
  for (let i = 0; i < random.length; i++) random[i] = (s = (s * 1103515245 + 12345) >>> 0) >>> 24;
  await rejectsWith(decodeToRgb(random), 'NOT_AN_IMAGE', /1000 bytes\) is not an image/);
  await rejectsWith(decodeToRgb(Buffer.from('{"not": "an image"}')), 'NOT_AN_IMAGE', /not an image/);
  await rejectsWith(decodeToRgb(new Uint8Array(0)), 'NOT_AN_IMAGE', /empty/);
});

test('BMP, ICO, PPM and SVG are UNSUPPORTED_FORMAT, naming the format', async () => {
  await rejectsWith(decodeToRgb(fixture('tiny.bmp')), 'UNSUPPORTED_FORMAT', /format BMP is not supported/);
  await rejectsWith(
    decodeToRgb(Buffer.concat([Buffer.from([0, 0, 1, 0, 1, 0]), Buffer.alloc(40)])),
    'UNSUPPORTED_FORMAT',
    /ICO/,
  );
  await rejectsWith(decodeToRgb(Buffer.from('P6\n2 2\n255\n012345678901')), 'UNSUPPORTED_FORMAT', /PNM/);
  const svg = '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>';
  await rejectsWith(decodeToRgb(Buffer.from(svg)), 'UNSUPPORTED_FORMAT', /format svg is not supported/);
});

test('decompression bombs (huge header, tiny file) are TOO_MANY_PIXELS, from the header, fast and small', async () => {
  const bombs = [pngWithHeader(20000, 20000, 1), webpWithHeader(16383, 16383)];
  assert.ok(bombs.every((b) => b.length < 200));
  const rss0 = process.memoryUsage().rss;
  const t0 = performance.now();
  await rejectsWith(
    decodeToRgb(bombs[0]),
    'TOO_MANY_PIXELS',
    /png image is 20000x20000 = 400000000 pixels.*limit of 40000000/,
  );
  await rejectsWith(decodeToRgb(bombs[1]), 'TOO_MANY_PIXELS', /webp image is 16383x16383 = 268402689 pixels/);
  const ms = performance.now() - t0;
  const grownMb = (process.memoryUsage().rss - rss0) / 2 ** 20;
  assert.ok(ms < 2000, `took ${ms.toFixed(0)} ms`);
  assert.ok(grownMb < 100, `RSS grew by ${grownMb.toFixed(0)} MB`);
  // The limit is configurable.
  await rejectsWith(
    decodeToRgb(fixture('rgb.jpg'), { maxPixels: 1000 }),
    'TOO_MANY_PIXELS',
    /1200 pixels.*limit of 1000/,
  );
  assert.equal((await decodeToRgb(fixture('rgb.jpg'), { maxPixels: 1200 })).width, 40);
});

test('a side under 8 px or an aspect over 5 is BAD_SIZE, decided from the header before decoding', async () => {
  const cfg = PREPROCESSOR_DEFAULTS;
  // Only one row of data is present: a decode would fail as TRUNCATED, so BAD_SIZE proves nothing was decoded.
  await rejectsWith(preprocessImage(pngWithHeader(100, 7, 1), cfg), 'BAD_SIZE', /at least 8 px/);
  await rejectsWith(preprocessImage(pngWithHeader(7, 100, 1), cfg), 'BAD_SIZE', /at least 8 px/);
  await rejectsWith(
    preprocessImage(pngWithHeader(60, 10, 1), cfg),
    'BAD_SIZE',
    /aspect ratio 6\.000 exceeds the limit 5/,
  );
  await rejectsWith(preprocessImage(pngWithHeader(50, 10, 1), cfg), 'TRUNCATED', /truncated/); // aspect exactly 5 is allowed
  const ok = await sharp({ create: { width: 50, height: 10, channels: 3, background: '#808080' } })
    .png()
    .toBuffer();
  const out = await preprocessImage(ok, cfg);
  assert.deepEqual([out.originalHeight, out.originalWidth], [10, 50]);
});

// ---------------------------------------------------------------------------------------------------------------
// Preprocessing: size, Pillow's resize and the float32 normalisation.

test('preprocessImage matches the reference: Pillow-resized bytes (sha256) and the float32 value of every byte', async () => {
  const normalized = Float32Array.from(manifest.normalizedByByte);
  for (const c of manifest.decode.filter((d) => d.resized && ['rgba.png', 'cmyk.jpg', 'lossy.webp'].includes(d.name))) {
    const out = await preprocessImage(fixture(c.name), PREPROCESSOR_DEFAULTS);
    const { width, height } = c.resized!;
    assert.deepEqual(
      [out.height, out.width, out.originalHeight, out.originalWidth],
      [height, width, c.height, c.width],
    );
    assert.equal(out.pixels.length, 3 * height * width);
    // Back to bytes through the reference's own table, then compare with Pillow's resized image.
    const byValue = new Map<number, number>();
    normalized.forEach((v, b) => byValue.set(v, b));
    const hwc = new Uint8Array(3 * height * width);
    for (let ch = 0; ch < 3; ch++) {
      for (let i = 0; i < height * width; i++) {
        const b = byValue.get(out.pixels[ch * height * width + i]);
        assert.ok(b !== undefined, `${c.name}: value ${out.pixels[ch * height * width + i]} is not a normalised byte`);
        hwc[i * 3 + ch] = b;
      }
    }
    assert.equal(sha256(hwc), c.resized!.sha256, `${c.name}: resized pixels differ from Pillow's`);
  }
  assert.equal(normalized[0], -1);
  assert.equal(normalized[255], 1);
});

test('preprocessRgb with a non-default config: sizes from smartResize and values from a float64 computation', () => {
  const cfg = parsePreprocessorConfig(
    {
      min_pixels: 32 * 32,
      max_pixels: 48 * 48,
      image_mean: [0.48145466, 0.4578275, 0.40821073],
      image_std: [0.26862954, 0.26130258, 0.27577711],
      spatial_factor: 16,
    },
    'test',
  );
  const width = 150;
  const height = 97;
  const data = new Uint8Array(width * height * 3).map((_, i) => (i * 37 + (i >> 7)) & 255);
  const out = preprocessRgb({ data, width, height, format: 'raw' }, cfg);
  const expectedSize = smartResize(height, width, { factor: 16, minPixels: 32 * 32, maxPixels: 48 * 48 });
  assert.deepEqual({ height: out.height, width: out.width }, expectedSize);
  const resized = resizeBicubic(data, width, height, out.width, out.height);
  const plane = out.height * out.width;
  for (let i = 0; i < plane; i++) {
    for (let ch = 0; ch < 3; ch++) {
      const exact = (resized[i * 3 + ch] / 255 - cfg.imageMean[ch]) / cfg.imageStd[ch];
      const got = out.pixels[ch * plane + i];
      assert.ok(Math.abs(got - exact) <= 1e-6 * Math.max(1, Math.abs(exact)), `ch ${ch} px ${i}: ${got} vs ${exact}`);
    }
  }
});

test('preprocessor_config.json: defaults, overrides, and errors that name the field', () => {
  assert.deepEqual(parsePreprocessorConfig({}, 'x'), PREPROCESSOR_DEFAULTS);
  assert.deepEqual(PREPROCESSOR_DEFAULTS, {
    minPixels: 262144,
    maxPixels: 1048576,
    imageMean: [0.5, 0.5, 0.5],
    imageStd: [0.5, 0.5, 0.5],
    rescaleFactor: 1 / 255,
    spatialFactor: 8,
  });
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ resample: 2 }, /cfg: field resample must be 3 \(PIL BICUBIC\) \(got 2\)/],
    [{ image_std: [0.5, 0, 0.5] }, /field image_std must be 3 finite numbers > 0/],
    [{ image_mean: [0.5, 0.5] }, /field image_mean must be 3 finite numbers/],
    [{ min_pixels: 2.5 }, /field min_pixels must be an integer >= 1/],
    [{ do_resize: false }, /field do_resize must be true/],
    [{ spatial_factor: 0 }, /field spatial_factor must be an integer >= 1 \(got 0\)/],
    [{ rescale_factor: -1 }, /field rescale_factor must be a finite number > 0/],
  ];
  for (const [json, re] of bad) assert.throws(() => parsePreprocessorConfig(json, 'cfg'), re);
  const dir = mkdtempSync(path.join(tmpdir(), 'vq-pre-'));
  try {
    assert.throws(() => loadPreprocessorConfig(dir), /preprocessor_config\.json: cannot read/);
    writeFileSync(path.join(dir, 'preprocessor_config.json'), JSON.stringify({ max_pixels: 4096, image_std: 0.25 }));
    const cfg = loadPreprocessorConfig(dir);
    assert.equal(cfg.maxPixels, 4096);
    assert.deepEqual(cfg.imageStd, [0.25, 0.25, 0.25]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Postprocessing: floor(clamp((x + 1) / 2 * 255)).

test('pixelsToRgb truncates (x+1)/2*255 after clipping, channels-first in, interleaved out', () => {
  // 2/255 - 1 in float32 maps to 0.99999994, which truncates to 0: the reference's float32 rounding, kept.
  const xs = [-1, 1, 0, 2, -3, Number.NaN, 0.999, -0.999, 2.5 / 255 - 1, 0.5, 2 / 255 - 1];
  const want = [0, 255, 127, 255, 0, 0, 254, 0, 1, 191, 0];
  const pixels = new Float32Array(3 * xs.length);
  xs.forEach((x, i) => {
    pixels[i] = x; // R
    pixels[xs.length + i] = -1; // G
    pixels[2 * xs.length + i] = 1; // B
  });
  const rgb = pixelsToRgb(pixels, 1, xs.length);
  assert.deepEqual(Array.from(rgb.filter((_, i) => i % 3 === 0)), want);
  assert.ok(rgb.filter((_, i) => i % 3 === 1).every((v) => v === 0));
  assert.ok(rgb.filter((_, i) => i % 3 === 2).every((v) => v === 255));
  // Random values against float64 floor, away from integer boundaries where float32 rounding decides.
  let s = 7;
  const n = 4096;
  const rnd = new Float32Array(3 * n).map(() => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2.4 - 1.2);
  const out = pixelsToRgb(rnd, 64, 64);
  for (let ch = 0; ch < 3; ch++) {
    for (let i = 0; i < n; i++) {
      const v = Math.min(255, Math.max(0, ((rnd[ch * n + i] + 1) / 2) * 255));
      if (Math.abs(v - Math.round(v)) < 1e-3) continue;
      assert.equal(out[i * 3 + ch], Math.floor(v));
    }
  }
});

test('postprocessToPng writes a PNG that decodes back to the same RGB bytes', async () => {
  const pixels = new Float32Array(3 * 24 * 16).map((_, i) => Math.sin(i * 0.37));
  const png = await postprocessToPng(pixels, 24, 16);
  const back = await decodeToRgb(png);
  assert.deepEqual([back.format, back.height, back.width], ['png', 24, 16]);
  assert.deepEqual(back.data, pixelsToRgb(pixels, 24, 16));
  assert.throws(() => pixelsToRgb(new Float32Array(5), 1, 2), /got 5 values, expected 3x1x2 = 6/);
});
