// The vq service as it runs in production: `node bin/emu3.js vq ...` in its own process on loopback, over a tiny VQ
// written by writeTinyVq, called by a real gRPC client built from proto/emu3/internal/v1/vq.proto.
// The tiny VQ's preprocessor_config.json is given small min/max_pixels (64² / 128²) so each encode is a few
// milliseconds of ORT work on this 2-core machine; the service reads those limits from the file like any VQ directory.
import assert from 'node:assert/strict';
import { type ChildProcess, execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { deflateSync } from 'node:zlib';
import * as grpc from '@grpc/grpc-js';
import sharp from 'sharp';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { type DecodeResponse, type EncodeResponse, VQ_PROTO, VQ_SERVICE } from '../../lib/rpc/vq-wire.js';
import { VqCodec } from '../../lib/vq/codec.js';
import { postprocessToPng } from '../../lib/vq/postprocess.js';
import { loadPreprocessorConfig, preprocessImage } from '../../lib/vq/preprocess.js';
import { writeTinyVq } from '../../lib/vq/tiny.js';
import { spawnService } from './spawn-service.js';

const CODEBOOK = 32768; // the tiny VQ keeps the real codebook size
const PIXEL_LIMIT = 1_000_000;
const QUEUE_LIMIT = 2;
const MAX_MESSAGE_BYTES = 256 * 1024;

const root = dirname(protoRoot());
const work = mkdtempSync(join(tmpdir(), 'emu3-vq-service-'));
const vqDir = join(work, 'vq');
const cacheDir = join(work, 'cache');
let child: ChildProcess | undefined;
let exited: Promise<number | null>;
let logs: Record<string, unknown>[] = [];
let client: grpc.Client;
let health: grpc.Client;

/** A smooth colour field with some texture, as interleaved RGB. */
function testPicture(height: number, width: number): { raw: Buffer; height: number; width: number } {
  const raw = Buffer.alloc(height * width * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 3;
      raw[o] = Math.round((255 * x) / (width - 1));
      raw[o + 1] = Math.round((255 * y) / (height - 1));
      raw[o + 2] = (x * 7 + y * 13) % 256;
    }
  }
  return { raw, height, width };
}

function png(height: number, width: number): Promise<Buffer> {
  const p = testPicture(height, width);
  return sharp(p.raw, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
}

/** A valid PNG header and tiny IDAT claiming width × height: a decompression bomb's shape (69 bytes). */
function pngHeaderOnly(width: number, height: number): Buffer {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (b: Buffer) => {
    let c = 0xffffffff;
    for (const v of b) c = crcTable[(c ^ v) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type: string, data: Buffer) => {
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const out = Buffer.alloc(body.length + 8);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(crc(body), body.length + 4);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.alloc(100))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

function int32s(bytes: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i < bytes.length; i += 4) out.push(bytes.readInt32LE(i));
  return out;
}

function codesBytes(codes: number[]): Buffer {
  const b = Buffer.alloc(codes.length * 4);
  codes.forEach((c, i) => b.writeInt32LE(c, i * 4));
  return b;
}

const encode = (image: Buffer, mime_type = '') =>
  unaryCall<object, EncodeResponse>(client, 'Encode', { image, mime_type });
const decode = (h: number, w: number, codes: Buffer) =>
  unaryCall<object, DecodeResponse>(client, 'Decode', { h, w, codes });

async function expectStatus(call: Promise<unknown>, code: grpc.status, pattern: RegExp): Promise<void> {
  await assert.rejects(call, (err: grpc.ServiceError) => {
    assert.equal(grpc.status[err.code], grpc.status[code], `status of "${err.details}"`);
    assert.match(err.details, pattern);
    return true;
  });
}

let smallPng: Buffer;
/** The service still answers correctly: a small encode gives the grid smart-resize predicts (32×32 → 64×64 → 8×8). */
async function stillServing(): Promise<void> {
  const r = await encode(smallPng);
  assert.deepEqual([r.h, r.w, r.codes.length], [8, 8, 8 * 8 * 4]);
}

before(async () => {
  writeTinyVq(vqDir, { seed: 7, preset: 'tiny' });
  const prepPath = join(vqDir, 'preprocessor_config.json');
  const prep = JSON.parse(readFileSync(prepPath, 'utf8'));
  writeFileSync(prepPath, JSON.stringify({ ...prep, min_pixels: 64 * 64, max_pixels: 128 * 128 }));
  smallPng = await png(32, 32);

  const args = ['vq', '--vq', vqDir, '--listen', '127.0.0.1:0', '--cache-dir', cacheDir];
  args.push('--max-pixels', String(PIXEL_LIMIT), '--queue', String(QUEUE_LIMIT), '--workers', '1');
  args.push('--max-message-bytes', String(MAX_MESSAGE_BYTES));
  const service = await spawnService(args, 'vq service', 30_000);
  child = service.proc;
  exited = service.exited;
  logs = service.logs;
  const { address } = service;
  assert.match(address, /^127\.0\.0\.1:[1-9]\d*$/);
  client = createClient(VQ_PROTO, VQ_SERVICE, address, { maxMessageBytes: 4 * MAX_MESSAGE_BYTES });
  health = createClient(HEALTH_PROTO, HEALTH_SERVICE, address);
});

after(async () => {
  client?.close();
  health?.close();
  if (child && child.exitCode === null) child.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
});

test('health is SERVING and Info states the limits the service was started with', async () => {
  assert.equal((await unaryCall<object, { status: string }>(health, 'Check', { service: '' })).status, 'SERVING');
  assert.equal(
    (await unaryCall<object, { status: string }>(health, 'Check', { service: VQ_SERVICE })).status,
    'SERVING',
  );
  const info = await unaryCall<object, Record<string, unknown>>(client, 'Info', {});
  assert.deepEqual(
    { ...info, fingerprint: undefined },
    {
      codebook_size: CODEBOOK,
      spatial_factor: 8,
      min_pixels: 64 * 64,
      max_pixels: 128 * 128,
      pixel_limit: PIXEL_LIMIT,
      max_codes: (128 * 128) / 64,
      queue_limit: QUEUE_LIMIT,
      workers: 1,
      fingerprint: undefined,
      max_message_bytes: MAX_MESSAGE_BYTES,
      device: 'cpu',
    },
  );
  assert.match(String(info.fingerprint), /^[0-9a-f]{64}$/);
});

test('encode → decode round trip of a real PNG and a real JPEG equals the library pipeline run in-process', async () => {
  const pngPic = testPicture(48, 64);
  const jpgPic = testPicture(72, 40);
  const cases = [
    {
      name: 'PNG 48×64',
      bytes: await sharp(pngPic.raw, { raw: { width: 64, height: 48, channels: 3 } })
        .png()
        .toBuffer(),
      mime: 'image/png',
      original: [48, 64],
      // smart_resize: 48×64 = 3072 < 64² → β = √(4096/3072); ceil(48β/8)·8 = 56, ceil(64β/8)·8 = 80.
      resized: [56, 80],
    },
    {
      name: 'JPEG 72×40',
      bytes: await sharp(jpgPic.raw, { raw: { width: 40, height: 72, channels: 3 } })
        .jpeg({ quality: 90 })
        .toBuffer(),
      mime: 'image/jpeg',
      original: [72, 40],
      // 72×40 = 2880 < 64² → β = √(4096/2880); ceil(72β/8)·8 = 88, ceil(40β/8)·8 = 48.
      resized: [88, 48],
    },
  ];
  const codec = await VqCodec.open(vqDir, { cacheDir, threads: 1 });
  try {
    const prep = loadPreprocessorConfig(vqDir);
    for (const c of cases) {
      const r = await encode(c.bytes, c.mime);
      assert.deepEqual([r.original_height, r.original_width], c.original, c.name);
      assert.deepEqual([r.resized_height, r.resized_width], c.resized, c.name);
      assert.deepEqual([r.h, r.w], [c.resized[0] / 8, c.resized[1] / 8], c.name);
      const codes = int32s(r.codes);
      assert.equal(codes.length, r.h * r.w);
      assert.ok(
        codes.every((k) => Number.isInteger(k) && k >= 0 && k < CODEBOOK),
        `${c.name}: codes within the codebook`,
      );
      assert.ok(new Set(codes).size > 1, `${c.name}: a textured image does not map to one code`);
      const local = await preprocessImage(c.bytes, prep);
      const expected = await codec.encode(local.pixels, local.height, local.width);
      assert.deepEqual(codes, [...expected.codes], `${c.name}: service codes = in-process codes`);

      const d = await decode(r.h, r.w, r.codes);
      assert.deepEqual([d.height, d.width], c.resized, c.name);
      const decoded = await sharp(d.png).raw().toBuffer({ resolveWithObject: true });
      assert.equal(decoded.info.format, 'raw');
      assert.deepEqual([decoded.info.height, decoded.info.width, decoded.info.channels], [...c.resized, 3], c.name);
      const expectedPng = await postprocessToPng(await codec.decode(expected.codes, r.h, r.w), d.height, d.width, prep);
      const expectedRaw = await sharp(expectedPng).raw().toBuffer();
      assert.ok(decoded.data.equals(expectedRaw), `${c.name}: service PNG pixels = in-process decode`);
    }
  } finally {
    await codec.close();
  }
});

test("the CLI runs the same pipeline: `emu3 vq encode` prints the service's grid, `emu3 vq decode` writes its PNG", async () => {
  const image = await png(48, 64);
  const imagePath = join(work, 'cli.png');
  writeFileSync(imagePath, image);
  const run = promisify(execFile);
  const common = ['--vq', vqDir, '--cache-dir', cacheDir, '--threads', '1'];
  const { stdout } = await run(process.execPath, ['bin/emu3.js', 'vq', 'encode', ...common, imagePath], { cwd: root });
  const printed = JSON.parse(stdout) as { h: number; w: number; codes: number[][] };
  const served = await encode(image);
  assert.deepEqual([printed.h, printed.w], [served.h, served.w]);
  assert.equal(printed.codes.length, served.h);
  assert.ok(printed.codes.every((row) => row.length === served.w));
  assert.deepEqual(printed.codes.flat(), int32s(served.codes));

  const codesPath = join(work, 'codes.json');
  const outPath = join(work, 'cli-out.png');
  writeFileSync(codesPath, stdout);
  await run(process.execPath, ['bin/emu3.js', 'vq', 'decode', ...common, codesPath, outPath], { cwd: root });
  const fromCli = await sharp(readFileSync(outPath)).raw().toBuffer();
  const fromService = await sharp((await decode(served.h, served.w, served.codes)).png)
    .raw()
    .toBuffer();
  assert.ok(fromCli.equals(fromService), 'CLI decode = service decode');
});

test('every bad image is INVALID_ARGUMENT naming the problem, and the service keeps serving', async () => {
  const good = await png(48, 64);
  const tooBig = await sharp({ create: { width: 1001, height: 1000, channels: 3, background: '#808080' } })
    .png()
    .toBuffer();
  const narrow = await png(6, 40);
  const wide = await png(8, 48);
  const bad: [string, () => Promise<unknown>, RegExp][] = [
    ['empty', () => encode(Buffer.alloc(0)), /image is empty/],
    [
      'not an image',
      () => encode(Buffer.from('certainly not a picture, just some text')),
      /not an image in a supported format/,
    ],
    [
      'BMP',
      () => encode(Buffer.concat([Buffer.from('BM'), Buffer.alloc(60)]), 'image/bmp'),
      /format BMP is not supported/,
    ],
    [
      'truncated PNG',
      () => encode(good.subarray(0, Math.floor(good.length / 2))),
      /png image 64x48 is truncated or corrupt/,
    ],
    [
      'more pixels than the limit',
      () => encode(tooBig),
      /png image is 1001x1000 = 1001000 pixels, more than the limit of 1000000 pixels/,
    ],
    // 69 bytes claiming 20000×20000: refused from the header (decoding it would fail as truncated instead).
    [
      'decompression bomb header',
      () => encode(pngHeaderOnly(20000, 20000)),
      /20000x20000 = 400000000 pixels, more than the limit of 1000000/,
    ],
    ['side under 8 px', () => encode(narrow), /6x40 \(HxW\): both sides must be at least 8 px/],
    ['aspect over 5', () => encode(wide), /aspect ratio 6\.000 exceeds the limit 5/],
    [
      'mime_type too long',
      () => encode(good, 'x'.repeat(300)),
      /mime_type is 300 characters, more than the limit of 256/,
    ],
  ];
  for (const [name, call, pattern] of bad) {
    await expectStatus(call(), grpc.status.INVALID_ARGUMENT, pattern).catch((e) => {
      throw new Error(`${name}: ${e.message}`);
    });
    await stillServing();
  }
});

test('every bad code grid is INVALID_ARGUMENT naming the problem, and the service keeps serving', async () => {
  const bad: [string, () => Promise<unknown>, RegExp][] = [
    ['h zero', () => decode(0, 4, Buffer.alloc(0)), /h must be an integer >= 1, got 0/],
    ['w zero', () => decode(4, 0, Buffer.alloc(0)), /w must be an integer >= 1, got 0/],
    [
      'grid too large',
      () => decode(1, 100_000, Buffer.alloc(400_000 / 8)),
      /1×100000 = 100000 codes exceeds the limit of 256 codes/,
    ],
    ['ragged: too few bytes', () => decode(2, 2, codesBytes([1, 2, 3])), /12 bytes but h×w = 2×2 needs 16/],
    ['ragged: not whole int32s', () => decode(1, 2, Buffer.alloc(9)), /9 bytes but h×w = 1×2 needs 8/],
    [
      'code = codebook size',
      () => decode(1, 2, codesBytes([0, CODEBOOK])),
      /code 32768 at row 0, column 1 is outside the codebook \[0, 32768\)/,
    ],
    ['negative code', () => decode(2, 1, codesBytes([5, -3])), /code -3 at row 1, column 0 is outside the codebook/],
  ];
  for (const [name, call, pattern] of bad) {
    await expectStatus(call(), grpc.status.INVALID_ARGUMENT, pattern).catch((e) => {
      throw new Error(`${name}: ${e.message}`);
    });
    const ok = await decode(1, 1, codesBytes([CODEBOOK - 1]));
    assert.deepEqual([ok.height, ok.width], [8, 8]);
  }
});

test('a message over --max-message-bytes is RESOURCE_EXHAUSTED, and the next request succeeds', async () => {
  await expectStatus(
    encode(Buffer.alloc(MAX_MESSAGE_BYTES + 1000, 7)),
    grpc.status.RESOURCE_EXHAUSTED,
    new RegExp(`larger than max \\(\\d+ vs ${MAX_MESSAGE_BYTES}\\)`),
  );
  await stillServing();
});

test('a flood past the queue limit: some get RESOURCE_EXHAUSTED naming the limit, the rest succeed', async () => {
  const n = 12;
  const grid = Array.from({ length: 16 * 16 }, (_, i) => (i * 977) % CODEBOOK);
  const results = await Promise.allSettled(Array.from({ length: n }, () => decode(16, 16, codesBytes(grid))));
  const ok = results.filter((r) => r.status === 'fulfilled') as PromiseFulfilledResult<DecodeResponse>[];
  const refused = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
  for (const r of refused) {
    const err = r.reason as grpc.ServiceError;
    assert.equal(grpc.status[err.code], 'RESOURCE_EXHAUSTED', err.details);
    assert.match(err.details, new RegExp(`queue is full \\(queue limit ${QUEUE_LIMIT}\\)`));
  }
  assert.ok(refused.length >= 1, 'the flood is refused in part');
  assert.ok(ok.length >= 1 + QUEUE_LIMIT, `one running plus ${QUEUE_LIMIT} queued succeed (got ${ok.length})`);
  const first = ok[0].value.png;
  for (const r of ok) assert.ok(r.value.png.equals(first), 'the same grid decodes to the same PNG');
  await stillServing();
});

test('SIGTERM drains: the process logs "draining" then "stopped" and exits 0, with no errors logged', async () => {
  assert.ok(child);
  child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([exited, new Promise((r) => (timer = setTimeout(() => r('timeout'), 15_000)))]);
  clearTimeout(timer);
  assert.equal(code, 0);
  const msgs = logs.map((l) => l.msg);
  assert.ok(msgs.includes('draining') && msgs.includes('stopped'), JSON.stringify(msgs));
  assert.equal(logs.filter((l) => l.level === 'error').length, 0, 'no unexpected errors were logged');
});
