// The VQ encoder and decoder on ONNX Runtime's WebGPU execution provider (docs/gpu.md) against the CPU path, on the
// tiny VQ. Machines without a GPU run it on Mesa's software Vulkan device (lavapipe), which .ci/run installs; a machine
// with neither fails here with the error naming what to install (it is not skipped).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import * as ort from 'onnxruntime-node';
import { createDeviceSession } from '../../lib/runtime/device-session.js';
import { Rng } from '../../lib/util/rng.js';
import { VqCodec } from '../../lib/vq/codec.js';
import { encoderGraphPath } from '../../lib/vq/encoder-graph.js';
import { graphFormFor } from '../../lib/vq/graph-blocks.js';
import { writeTinyVq } from '../../lib/vq/tiny.js';
import { VqWeights } from '../../lib/vq/weights.js';
import { parsePlacement } from './ort-placement.js';

const repo = join(import.meta.dirname, '..', '..', '..');
const H = 48;
const W = 64;
const DIM = 4;

// Both paths compute in fp32 and differ only in summation order (the webgpu graph is the shape-free form, run
// channels-last by ORT's WebGPU kernels). Measured on lavapipe at this size: latents within 2.2e-6 of the CPU's,
// decoded pixels within 7.3e-6.
// - Latents: 1e-4, ~50× the measured difference and far below the distances between codebook rows.
const LATENT_TOL = 1e-4;
// - A code may differ only where the CPU latent z's two candidates a (CPU's) and b (webgpu's) are a near-tie. With
//   webgpu's latent z + δ: d(z + δ, e) − d(z, e) = 2δ·(z − e) + |δ|², and b beats a for z + δ, so
//   d(z, b) − d(z, a) ≤ 4|δ|(|z| + max |e|) + 2|δ|². |δ| ≤ 2·LATENT_TOL (4 components) and |z|, |e| ≤ NORM_BOUND
//   (asserted; tiny's are ≤ 1.5) bound the gap by 4 · 2e-4 · 4 + 8e-8 ≈ 3.2e-3; TIE_TOL is that, rounded up.
const NORM_BOUND = 2;
const TIE_TOL = 4e-3;
// - Decoded pixels (≈[−1, 1]): 1e-3, an eighth of one 8-bit PNG level (2/255), so the PNGs differ at most by a
//   rounding step; ~140× the measured difference.
const PIXEL_TOL = 1e-3;

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** Runs a command; resolves with its exit code and output, or rejects after `ms`. */
function runChild(args: string[], env: NodeJS.ProcessEnv, ms: number): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: repo, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      out += d;
    });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${args.join(' ')}: no exit after ${ms} ms; output:\n${out.slice(-2000)}`));
    }, ms);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

describe('VQ on webgpu equals the CPU path (tiny VQ, 64×48 image)', { timeout: 240_000 }, () => {
  let root: string;
  let vqDir: string;
  let cacheDir: string;
  let cpu: VqCodec;
  let gpu: VqCodec;
  let pixels: Float32Array;

  before(async () => {
    process.env.XDG_RUNTIME_DIR ??= mkdtempSync(join(tmpdir(), 'vq-webgpu-xdg-'));
    root = mkdtempSync(join(tmpdir(), 'vq-webgpu-'));
    vqDir = join(root, 'vq');
    cacheDir = join(root, 'cache');
    writeTinyVq(vqDir, { seed: 7, preset: 'tiny' });
    const rng = new Rng(2024);
    pixels = new Float32Array(3 * H * W).map(() => rng.uniform() * 2 - 1);
    cpu = await VqCodec.open(vqDir, { cacheDir, threads: 1 });
    gpu = await VqCodec.open(vqDir, { cacheDir, threads: 1, device: 'webgpu' });
  });

  after(async () => {
    await cpu?.close();
    await gpu?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('reports its device', () => {
    assert.equal(cpu.device, 'cpu');
    assert.equal(gpu.device, 'webgpu');
  });

  it('latents within 1e-4 of the CPU graph; codes equal the CPU codes but at near-ties', async () => {
    const w = VqWeights.open(vqDir);
    const embedding = w.codebook();
    const cpuPath = encoderGraphPath(w, cacheDir);
    const gpuPath = encoderGraphPath(w, cacheDir, undefined, graphFormFor('webgpu'));
    w.close();
    assert.notEqual(cpuPath, gpuPath, 'the webgpu graph is cached under its own key');
    const latentsOn = async (path: string, device: 'cpu' | 'webgpu'): Promise<Float32Array> => {
      const session = await createDeviceSession(path, device, {});
      try {
        const out = await session.run({ pixels: new ort.Tensor('float32', pixels, [1, 3, H, W]) });
        return out.latents.data as Float32Array;
      } finally {
        await session.release();
      }
    };
    const zCpu = await latentsOn(cpuPath, 'cpu');
    const zGpu = await latentsOn(gpuPath, 'webgpu');
    const latentDiff = maxAbsDiff(zGpu, zCpu);
    assert.ok(latentDiff < LATENT_TOL, `max |latent(webgpu) − latent(cpu)| = ${latentDiff}`);

    const want = await cpu.encode(pixels, H, W);
    const got = await gpu.encode(pixels, H, W);
    assert.deepEqual([got.h, got.w], [want.h, want.w]);
    const n = want.h * want.w;
    assert.ok(new Set(want.codes).size >= n / 2, `only ${new Set(want.codes).size} distinct codes`);
    const norm = (v: ArrayLike<number>, at: number) => {
      let s = 0;
      for (let d = 0; d < DIM; d++) s += v[at + d] ** 2;
      return Math.sqrt(s);
    };
    const dist = (i: number, code: number) => {
      let s = 0;
      for (let d = 0; d < DIM; d++) s += (zCpu[i * DIM + d] - embedding[code * DIM + d]) ** 2;
      return s;
    };
    let differing = 0;
    for (let i = 0; i < n; i++) {
      assert.ok(norm(zCpu, i * DIM) <= NORM_BOUND, `latent ${i} has norm ${norm(zCpu, i * DIM)}`);
      if (got.codes[i] === want.codes[i]) continue;
      differing++;
      assert.ok(norm(embedding, got.codes[i] * DIM) <= NORM_BOUND);
      const gap = dist(i, got.codes[i]) - dist(i, want.codes[i]);
      assert.ok(
        gap >= 0 && gap < TIE_TOL,
        `code ${i}: webgpu ${got.codes[i]}, cpu ${want.codes[i]}, distance gap ${gap} for the CPU latent`,
      );
    }
    assert.ok(differing <= Math.ceil(n / 100), `${differing} of ${n} codes differ`);
  });

  it('decoded pixels within 1e-3 of the CPU decoder', async () => {
    const { h, w, codes } = await cpu.encode(pixels, H, W);
    const want = await cpu.decode(codes, h, w);
    const got = await gpu.decode(codes, h, w);
    assert.equal(got.length, 3 * H * W);
    let lo = Number.POSITIVE_INFINITY;
    let hi = Number.NEGATIVE_INFINITY;
    for (const v of want) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    assert.ok(hi - lo > 0.5, `the CPU image spans only [${lo}, ${hi}]`);
    const diff = maxAbsDiff(got, want);
    assert.ok(diff < PIXEL_TOL, `max |pixel(webgpu) − pixel(cpu)| = ${diff}`);
  });

  it('every node of both webgpu graphs is placed on the WebGPU provider (ORT verbose log)', async (t) => {
    const child = join(repo, 'dist', 'test', 'unit', 'vq-placement-child.js');
    for (const graph of ['encoder', 'decoder']) {
      const { code, out } = await runChild([child, vqDir, cacheDir, graph], process.env, 60_000);
      assert.equal(code, 0, out.slice(-2000));
      const placement = parsePlacement(out);
      t.diagnostic(`${graph}: ${JSON.stringify(Object.fromEntries(placement))}`);
      assert.deepEqual([...placement.keys()], ['WebGpuExecutionProvider'], `${graph} placement`);
      assert.ok(placement.get('WebGpuExecutionProvider')! > 100);
    }
  });

  it('without a Vulkan device, emu3 vq --device webgpu exits with the error naming what to install', async () => {
    const env = {
      ...process.env,
      VK_ICD_FILENAMES: join(root, 'no-such-icd.json'),
      VK_DRIVER_FILES: join(root, 'no-such-icd.json'),
    };
    const args = ['bin/emu3.js', 'vq', '--vq', vqDir, '--cache-dir', cacheDir, '--listen', '127.0.0.1:0'];
    const { code, out } = await runChild([...args, '--device', 'webgpu'], env, 60_000);
    assert.notEqual(code, 0);
    assert.match(out, /device webgpu: onnxruntime could not open it \(.*adapter/);
    assert.match(out, /needs a Vulkan driver.*mesa-vulkan-drivers.*vulkaninfo --summary/s);
  });
});

describe('parsePlacement', () => {
  it('reads both forms of ORT’s placement summary', () => {
    const one =
      '[V:onnxruntime:, session_state.cc:1380 VerifyEachNodeIsAssignedToAnEp]  All nodes placed on [WebGpuExecutionProvider]. Number of nodes: 288';
    assert.deepEqual([...parsePlacement(one)], [['WebGpuExecutionProvider', 288]]);
    const split = [
      '2026-12-01 [V:onnxruntime:, session_state.cc:1377 VerifyEachNodeIsAssignedToAnEp] Node placements',
      '2026-12-01 [V:onnxruntime:, session_state.cc:1383 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 24',
      '2026-12-01 [V:onnxruntime:, session_state.cc:1385 VerifyEachNodeIsAssignedToAnEp]   Gather (Gather)',
      '2026-12-01 [V:onnxruntime:, session_state.cc:1383 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [WebGpuExecutionProvider]. Number of nodes: 333',
    ].join('\n');
    assert.deepEqual(
      [...parsePlacement(split)],
      [
        ['CPUExecutionProvider', 24],
        ['WebGpuExecutionProvider', 333],
      ],
    );
  });
});
