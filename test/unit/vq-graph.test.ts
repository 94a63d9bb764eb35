// The VQ encoder/decoder graphs (the single-image form of docs/model.md, run through VqCodec's worker) against the
// float64 reference of the full 4-frame network (test/reference/vq-f64.ts) on the tiny VQ; plus the quantizer, the
// config parser, the tiny writer and the upstream parameter names.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as ort from 'onnxruntime-node';
import { Rng } from '../../lib/util/rng.js';
import { VqCodec, VqInputError } from '../../lib/vq/codec.js';
import { parseVqConfig } from '../../lib/vq/config.js';
import { decoderGraphPath } from '../../lib/vq/decoder-graph.js';
import { encoderGraphPath } from '../../lib/vq/encoder-graph.js';
import { vqParamSpecs } from '../../lib/vq/params.js';
import { Codebook } from '../../lib/vq/quantize.js';
import { writeTinyVq } from '../../lib/vq/tiny.js';
import { VqWeights } from '../../lib/vq/weights.js';
import { type Img, toU8, VqReference } from '../reference/vq-f64.js';

const fixtures = join(import.meta.dirname, '..', '..', '..', 'test', 'fixtures');

describe('VQ graphs match the float64 full 4-frame reference (tiny VQ, 64×48 image)', () => {
  const H = 48;
  const W = 64;
  let root: string;
  let vqDir: string;
  let cacheDir: string;
  let codec: VqCodec;
  let ref: VqReference;
  let pixels: Float32Array;
  let refLatents: Img;
  let refCodes: { codes: Int32Array; margins: Float64Array };

  before(async () => {
    root = mkdtempSync(join(tmpdir(), 'vq-graph-'));
    vqDir = join(root, 'vq');
    cacheDir = join(root, 'cache');
    writeTinyVq(vqDir, { seed: 7, preset: 'tiny' });
    const rng = new Rng(2024);
    pixels = new Float32Array(3 * H * W).map(() => rng.uniform() * 2 - 1);
    codec = await VqCodec.open(vqDir, { cacheDir });
    ref = new VqReference(vqDir);
    refLatents = ref.encode({ c: 3, h: H, w: W, d: Float64Array.from(pixels) });
    refCodes = ref.quantize(refLatents);
  });

  after(async () => {
    await codec?.close();
    ref?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('encoder latents are within 1e-4 of the reference', async () => {
    const w = VqWeights.open(vqDir);
    const session = await ort.InferenceSession.create(encoderGraphPath(w, cacheDir));
    w.close();
    const out = await session.run({ pixels: new ort.Tensor('float32', pixels, [1, 3, H, W]) });
    await session.release();
    const latents = out.latents.data as Float32Array;
    const n = (H / 8) * (W / 8);
    assert.deepEqual(out.latents.dims, [n, 4]);
    let maxDiff = 0;
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < 4; c++) maxDiff = Math.max(maxDiff, Math.abs(latents[i * 4 + c] - refLatents.d[c * n + i]));
    }
    assert.ok(maxDiff < 1e-4, `max |latent − reference| = ${maxDiff}`);
  });

  it('codes equal the reference except where its top-2 margin is below 1e-5', async () => {
    const { h, w, codes } = await codec.encode(pixels, H, W);
    assert.deepEqual([h, w], [H / 8, W / 8]);
    assert.equal(codes.length, h * w);
    // The check means something only if the codes are diverse.
    assert.ok(new Set(refCodes.codes).size >= (h * w) / 2, `only ${new Set(refCodes.codes).size} distinct codes`);
    for (let i = 0; i < codes.length; i++) {
      if (refCodes.margins[i] < 1e-5) continue;
      assert.equal(codes[i], refCodes.codes[i], `code at position ${i} (reference margin ${refCodes.margins[i]})`);
    }
  });

  it('decoded pixels are within ±1 of the reference after floor(clamp((x+1)/2·255))', async () => {
    const h = H / 8;
    const w = W / 8;
    const got = await codec.decode(refCodes.codes, h, w);
    const want = ref.decode(refCodes.codes, h, w);
    assert.equal(got.length, 3 * H * W);
    assert.deepEqual([want.c, want.h, want.w], [3, H, W]);
    let maxDiff = 0;
    let saturated = 0;
    for (let i = 0; i < got.length; i++) {
      const r = toU8(want.d[i]);
      maxDiff = Math.max(maxDiff, Math.abs(toU8(got[i]) - r));
      if (r === 0 || r === 255) saturated++;
    }
    assert.ok(maxDiff <= 1, `max pixel difference ${maxDiff}`);
    assert.ok(saturated < got.length / 10, `${saturated} of ${got.length} reference pixels saturate: weak check`);
  });

  it('the shape-free form (built for webgpu) matches the reference too, run on the CPU', async () => {
    const w = VqWeights.open(vqDir);
    const encPath = encoderGraphPath(w, cacheDir, undefined, 'shape-free');
    const decPath = decoderGraphPath(w, cacheDir, undefined, 'shape-free');
    const embedding = w.codebook();
    const shapedPath = encoderGraphPath(w, cacheDir);
    w.close();
    assert.notEqual(encPath, shapedPath, 'cached under a key of its own');
    const enc = await ort.InferenceSession.create(encPath);
    const latents = (await enc.run({ pixels: new ort.Tensor('float32', pixels, [1, 3, H, W]) })).latents
      .data as Float32Array;
    await enc.release();
    const n = (H / 8) * (W / 8);
    let maxDiff = 0;
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < 4; c++) maxDiff = Math.max(maxDiff, Math.abs(latents[i * 4 + c] - refLatents.d[c * n + i]));
    }
    assert.ok(maxDiff < 1e-4, `max |latent − reference| = ${maxDiff}`);
    const cb = new Codebook(embedding, 32768, 4);
    const quant = cb.lookupChannelsFirst(refCodes.codes);
    const dec = await ort.InferenceSession.create(decPath);
    const got = (await dec.run({ quant: new ort.Tensor('float32', quant, [1, 4, H / 8, W / 8]) })).pixels
      .data as Float32Array;
    await dec.release();
    const want = ref.decode(refCodes.codes, H / 8, W / 8);
    let maxPixel = 0;
    for (let i = 0; i < got.length; i++) maxPixel = Math.max(maxPixel, Math.abs(toU8(got[i]) - toU8(want.d[i])));
    assert.ok(maxPixel <= 1, `max pixel difference ${maxPixel}`);
  });

  it('refuses bad sizes and codes outside the codebook with VqInputError', async () => {
    await assert.rejects(codec.encode(new Float32Array(3 * 44 * 64), 44, 64), (e: Error) => {
      return e instanceof VqInputError && /height 44 must be a positive multiple of 8/.test(e.message);
    });
    await assert.rejects(codec.encode(new Float32Array(10), 48, 64), VqInputError);
    await assert.rejects(
      codec.decode(Int32Array.from([0, 1, 32768, 3]), 2, 2),
      /code 32768 at row 1, column 0 is outside the codebook \[0, 32768\)/,
    );
    await assert.rejects(codec.decode(Int32Array.from([0, 1, 2]), 2, 2), /3 codes do not fill a 2×2 grid/);
    // The codec keeps serving after refusals.
    const { codes } = await codec.encode(pixels, H, W);
    assert.equal(codes.length, 48);
  });
});

describe('quantizer', () => {
  it('picks the nearest code by squared distance', () => {
    const cb = new Codebook(Float32Array.from([0, 0, 1, 0, 0, 1, 3, 3]), 4, 2);
    assert.deepEqual([...cb.quantize(Float32Array.from([0.9, 0.2, 0.1, 0.1, 2, 2.5, 0.2, 0.7]))], [1, 0, 3, 2]);
  });

  it('takes the first minimum on ties (duplicate rows and equidistant codes)', () => {
    const cb = new Codebook(Float32Array.from([5, 5, 1, 0, -1, 0, 1, 0]), 4, 2);
    // (0,0) is at distance 1 from rows 1, 2 and 3; row 3 duplicates row 1.
    const latents = Float32Array.from([0, 0, 1, 0]);
    assert.deepEqual([...cb.quantize(latents)], [1, 1]);
    assert.deepEqual([...cb.quantizeScan(latents)], [1, 1]);
  });

  it('the k-d tree search equals the full scan on a 32,768 × 4 codebook, near and far from the codes', () => {
    const rng = new Rng(11);
    const size = 32768;
    const cb = new Codebook(
      new Float32Array(size * 4).map(() => rng.normal() * 0.5),
      size,
      4,
    );
    for (const scale of [0.05, 0.5, 2, 50]) {
      const latents = new Float32Array(600 * 4).map(() => rng.normal() * scale);
      const tree = cb.quantize(latents);
      assert.deepEqual(tree, cb.quantizeScan(latents), `latent scale ${scale}`);
      if (scale === 0.5 || scale === 2)
        assert.ok(new Set(tree).size > 200, `scale ${scale}: only ${new Set(tree).size} distinct codes`);
    }
  });

  it('the k-d tree keeps the first minimum among many exact ties (shuffled integer grid with duplicates)', () => {
    // Codes on the integer grid {0..5}⁴, each twice, shuffled; latents on half-integers are equidistant from up to
    // 16 grid points × 2 duplicates. All values are exact in float, so the first minimum is unambiguous.
    const rng = new Rng(12);
    const grid: number[][] = [];
    for (let k = 0; k < 6 ** 4 * 2; k++) {
      const v = k % 6 ** 4;
      grid.push([v % 6, Math.floor(v / 6) % 6, Math.floor(v / 36) % 6, Math.floor(v / 216)]);
    }
    for (let i = grid.length - 1; i > 0; i--) {
      const j = Math.floor(rng.uniform() * (i + 1));
      [grid[i], grid[j]] = [grid[j], grid[i]];
    }
    const cb = new Codebook(Float32Array.from(grid.flat()), grid.length, 4);
    const latents = new Float32Array(500 * 4).map(() => Math.floor(rng.uniform() * 13) / 2 - 0.5);
    const codes = cb.quantize(latents);
    for (let i = 0; i < 500; i++) {
      const z = latents.subarray(i * 4, i * 4 + 4);
      let first = -1;
      let best = Number.POSITIVE_INFINITY;
      grid.forEach((e, j) => {
        const d = e.reduce((s, x, c) => s + (z[c] - x) ** 2, 0);
        if (d < best) [best, first] = [d, j];
      });
      assert.equal(codes[i], first, `latent ${i} (${[...z]})`);
    }
  });

  it('lookup refuses codes outside the codebook', () => {
    const cb = new Codebook(new Float32Array(8), 4, 2);
    assert.throws(
      () => cb.lookupChannelsFirst(Int32Array.from([0, 4])),
      /code 4 at position 1 is outside the codebook \[0, 4\)/,
    );
    assert.deepEqual(
      [...new Codebook(Float32Array.from([1, 2, 3, 4]), 2, 2).lookupChannelsFirst(Int32Array.from([1, 0, 1]))],
      [3, 1, 3, 4, 2, 4],
    );
  });
});

describe('VQ config', () => {
  it('fills upstream defaults', () => {
    const cfg = parseVqConfig({}, 'c.json');
    assert.equal(cfg.codebookSize, 32768);
    assert.deepEqual(cfg.chMult, [1, 2, 2, 4]);
    assert.deepEqual(cfg.attnResolutions, [3]);
    assert.equal(cfg.temporalDownsampleFactor, 4);
  });

  it('names the field and the rule in every error', () => {
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ codebook_size: 0 }, /c\.json: field codebook_size must be an integer >= 1 \(got 0\)/],
      [{ ch: 'x' }, /field ch must be an integer/],
      [{ ch: 48 }, /field ch must be divisible by 32/],
      [{ ch_mult: [] }, /field ch_mult must be a non-empty list/],
      [{ ch_mult: [1, 1.5] }, /field ch_mult must be a list of integers/],
      [{ attn_resolutions: [4] }, /field attn_resolutions holds level indices, each < ch_mult length 4/],
      [{ double_z: true }, /field double_z must be false/],
      [{ embed_dim: 8 }, /field embed_dim must equal z_channels \(4\)/],
      [{ temporal_downsample_factor: 3 }, /field temporal_downsample_factor must be a power of two/],
      [{ dropout: 1.5 }, /field dropout must be in \[0, 1\)/],
    ];
    for (const [json, re] of bad) assert.throws(() => parseVqConfig(json, 'c.json'), re, JSON.stringify(json));
    assert.throws(() => parseVqConfig([1], 'c.json'), /c\.json: VQ config must be a JSON object/);
  });

  it('enumerates exactly the 495 upstream parameter names and shapes for the default config', () => {
    const want = readFileSync(join(fixtures, 'vq-param-names.txt'), 'utf8')
      .split('\n')
      .filter((l) => l && !l.startsWith('#'));
    const got = vqParamSpecs(parseVqConfig({}, 'defaults')).map((p) => `${p.name}\t[${p.shape.join(', ')}]`);
    assert.equal(got.length, 495);
    assert.deepEqual(got, want);
  });
});

describe('writeTinyVq', () => {
  it('is deterministic from the seed and writes the upstream files', () => {
    const root = mkdtempSync(join(tmpdir(), 'vq-tiny-'));
    try {
      for (const [name, seed] of [
        ['a', 3],
        ['b', 3],
        ['c', 4],
      ] as const)
        writeTinyVq(join(root, name), { seed, preset: 'tiny' });
      const file = (d: string, f: string) => readFileSync(join(root, d, f));
      assert.ok(file('a', 'model.safetensors').equals(file('b', 'model.safetensors')));
      assert.ok(!file('a', 'model.safetensors').equals(file('c', 'model.safetensors')));
      const config = JSON.parse(file('a', 'config.json').toString());
      assert.equal(config.ch, 32);
      assert.equal(config.codebook_size, 32768);
      assert.equal(config.embed_dim, 4);
      const pre = JSON.parse(file('a', 'preprocessor_config.json').toString());
      // The tiny preset bounds images to 128²–256² pixels (so an image prompt fits emu3-tiny's context), not the
      // upstream 512²–1024².
      assert.deepEqual([pre.min_pixels, pre.max_pixels, pre.spatial_factor, pre.resample], [16384, 65536, 8, 3]);
      const w = VqWeights.open(join(root, 'a'));
      try {
        const nbt = w.file.info('encoder.time_res_stack.0.norm1.num_batches_tracked');
        assert.deepEqual([nbt.dtype, nbt.shape], ['I64', []]);
        assert.equal(w.file.tensors.size, vqParamSpecs(w.config).length);
      } finally {
        w.close();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
