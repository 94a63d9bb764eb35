// VQ codec benchmark: encode and decode latency (median), peak RSS and RSS across repeated runs, plus the quantizer
// alone (k-d tree against the full scan), for the tiny VQ at 512×512 and 720×720 and the real-shaped VQ (ch 256,
// ch_mult [1,2,2,4], random weights) at 512×512. Each case runs in its own child process so its peak RSS is its own;
// the graphs are built beforehand (cached), so the numbers are serving numbers.
// Encode input is an already preprocessed [3, H, W] image in [−1, 1]; decode output is the raw decoder tensor
// (no PNG). Usage: npm run bench:vq [-- --runs-tiny N --runs-real N --threads N --device cpu|webgpu|cuda
// --cases tiny:512,tiny:720,small:512]. --device runs both graphs there (webgpu: the shape-free graphs, docs/gpu.md) and
// writes its own BENCHMARKS.md section; --cases picks a subset (e.g. tiny:256 to prove the path on lavapipe).

import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEVICES, type Device } from '../lib/onnx/stage-graph.js';
import { Rng } from '../lib/util/rng.js';
import { VqCodec } from '../lib/vq/codec.js';
import { decoderGraphPath } from '../lib/vq/decoder-graph.js';
import { encoderGraphPath } from '../lib/vq/encoder-graph.js';
import { graphFormFor } from '../lib/vq/graph-blocks.js';
import { defaultCacheDir } from '../lib/vq/graph-cache.js';
import { Codebook } from '../lib/vq/quantize.js';
import { type VqPreset, writeTinyVq } from '../lib/vq/tiny.js';
import { VqWeights } from '../lib/vq/weights.js';
import { benchmarksPath, median, writeBenchSection } from './report.js';

const SEED = 1;

interface CaseResult {
  preset: VqPreset;
  size: number;
  runs: number;
  openMs: number;
  encodeMs: number[];
  decodeMs: number[];
  distinctCodes: number;
  peakRssMiB: number;
  /** Process RSS after each encode + decode pair, warm-up first: flat means repeated runs do not grow memory. */
  rssAfterMiB: number[];
}

interface QuantizerResult {
  latents: number;
  treeMs: number;
  scanMs: number;
}

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

function stringArg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

function deviceArg(): Device {
  const device = stringArg('--device', 'cpu') as Device;
  if (!DEVICES.includes(device)) throw new Error(`bench:vq: --device must be one of ${DEVICES.join(', ')}`);
  return device;
}

/** The Vulkan device webgpu runs on, as vulkaninfo names it (best effort: the machine line of the report). */
function vulkanDeviceName(): string {
  try {
    const out = execFileSync('vulkaninfo', ['--summary'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    return out.match(/deviceName\s*=\s*(.+)/)?.[1].trim() ?? 'unknown Vulkan device';
  } catch {
    return 'unknown Vulkan device (vulkaninfo failed)';
  }
}

function vqDir(preset: VqPreset): string {
  const dir = join(tmpdir(), `emu3-bench-vq-${preset}-seed${SEED}`);
  if (!existsSync(join(dir, 'model.safetensors'))) writeTinyVq(dir, { seed: SEED, preset }, console.log);
  return dir;
}

/** Child: one preset and size; prints one JSON line. */
async function runCase(preset: VqPreset, size: number, runs: number, threads: number, device: Device): Promise<void> {
  const t0 = performance.now();
  const codec = await VqCodec.open(vqDir(preset), { threads, device });
  const openMs = performance.now() - t0;
  const rng = new Rng(42);
  const pixels = new Float32Array(3 * size * size).map(() => rng.uniform() * 2 - 1);
  const encodeMs: number[] = [];
  const decodeMs: number[] = [];
  let distinct = 0;
  const rssAfterMiB: number[] = [];
  // One warm-up pair (ORT allocates its arena and picks kernels on the first run), then the timed runs.
  for (let i = 0; i <= runs; i++) {
    let t = performance.now();
    const { h, w, codes } = await codec.encode(pixels, size, size);
    const enc = performance.now() - t;
    t = performance.now();
    await codec.decode(codes, h, w);
    const dec = performance.now() - t;
    distinct = new Set(codes).size;
    rssAfterMiB.push(process.memoryUsage().rss / 2 ** 20);
    if (i > 0) {
      encodeMs.push(enc);
      decodeMs.push(dec);
    }
  }
  await codec.close();
  const result: CaseResult = {
    preset,
    size,
    runs,
    openMs,
    encodeMs,
    decodeMs,
    distinctCodes: distinct,
    peakRssMiB: process.resourceUsage().maxRSS / 1024,
    rssAfterMiB,
  };
  console.log(JSON.stringify(result));
}

/** The k-d tree quantizer against the full scan it replaced, on 8,100 latents (a 720×720 image) spread like the codes. */
function benchQuantizer(): QuantizerResult {
  const w = VqWeights.open(vqDir('tiny'));
  const codebook = new Codebook(w.codebook(), w.config.codebookSize, w.config.embedDim);
  w.close();
  const rng = new Rng(7);
  const e = codebook.embedding;
  const std = Math.sqrt(e.reduce((s, x) => s + x * x, 0) / e.length);
  const latents = new Float32Array(8100 * codebook.dim).map(() => rng.normal() * std);
  const time = (f: () => Int32Array): [number, Int32Array] => {
    const t = performance.now();
    const codes = f();
    return [performance.now() - t, codes];
  };
  const [treeMs, tree] = time(() => codebook.quantize(latents));
  const [scanMs, scan] = time(() => codebook.quantizeScan(latents));
  if (tree.some((c, i) => c !== scan[i])) throw new Error('bench:vq: the k-d tree and the scan disagree');
  return { latents: 8100, treeMs, scanMs };
}

function writeSection(
  results: CaseResult[],
  quant: QuantizerResult,
  threads: number,
  loadBefore: number,
  device: Device,
): void {
  const rows = results.map((r) => {
    const name = r.preset === 'tiny' ? 'tiny (ch 32)' : 'real-shaped (ch 256)';
    const tokens = (r.size / 8) ** 2;
    const rss = `${r.rssAfterMiB[0].toFixed(0)} → ${r.rssAfterMiB[r.rssAfterMiB.length - 1].toFixed(0)}`;
    return `| ${name} | ${r.size}×${r.size} | ${tokens} | ${median(r.encodeMs).toFixed(0)} | ${median(r.decodeMs).toFixed(0)} | ${r.peakRssMiB.toFixed(0)} | ${rss} | ${r.runs} | ${(r.openMs / 1000).toFixed(1)} |`;
  });
  const section = [
    `Command: \`npm run bench:vq${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}\` (bench/vq.ts).`,
    'Random-weight VQs from `writeTinyVq` (seed 1); the real-shaped one has',
    'the upstream shape (ch 256, ch_mult [1,2,2,4], 270.7 M parameters). Encode = ONNX encoder graph + exact k-d tree',
    'argmin over the 32,768-code codebook (lib/vq/quantize.ts), from an already preprocessed [3, H, W] float image;',
    "decode = codebook lookup + ONNX decoder graph, raw output (no PNG). ORT runs in the codec's worker thread",
    '(sessions without the CPU memory arena: see codec-worker.ts); graphs built beforehand (cached).',
    'Medians over the timed runs after one warm-up pair; peak RSS = the whole process (main + worker) of that case',
    'alone (each case runs in its own process); RSS after runs = process RSS after the warm-up pair → after the last',
    'pair (equal means repeated runs do not grow memory).',
    '',
    `Machine: ${cpus()[0]?.model ?? 'unknown CPU'}, ${availableParallelism()} cores (shared with other work while measured),`,
    `onnxruntime-node 1.30 ${device === 'webgpu' ? `WebGPU provider on ${vulkanDeviceName()} (the shape-free graphs; every node on the device)` : device === 'cuda' ? 'CUDA provider' : 'CPU'}, ${threads > 0 ? `${threads} intra-op threads` : 'ORT default intra-op threads'}. Measured ${new Date().toISOString().slice(0, 10)};`,
    `1-minute load average ${loadBefore.toFixed(1)} at the start and ${loadavg()[0].toFixed(1)} at the end (above ${availableParallelism()} means`,
    'other processes competed for the cores and the latencies are inflated).',
    ...(device === 'webgpu'
      ? [
          "On llvmpipe (Mesa's software Vulkan device, shaders compiled for the CPU) these numbers prove the webgpu path,",
          'not GPU speed.',
        ]
      : []),
    '',
    '| VQ | image | codes | encode ms | decode ms | peak RSS MiB | RSS after runs MiB | runs | open s |',
    '|---|---|---|---|---|---|---|---|---|',
    ...rows,
    '',
    `Quantizer alone, ${quant.latents} latents (720×720) against the 32,768 codes: k-d tree ${quant.treeMs.toFixed(0)} ms, full`,
    `scan (the previous quantizer's method) ${quant.scanMs.toFixed(0)} ms, identical codes. An in-graph MatMul + ArgMin was`,
    'measured at about 850 ms with a 1.06 GB [8100, 32768] distance matrix, so the quantizer stays in JS.',
  ].join('\n');
  writeBenchSection(`VQ image tokenizer (encode / decode)${device === 'cpu' ? '' : ` on ${device}`}`, section);
  console.log(`wrote the VQ section of ${benchmarksPath}`);
}

async function main(): Promise<void> {
  const threads = arg('--threads', 0);
  const device = deviceArg();
  const loadBefore = loadavg()[0];
  const child = process.argv.indexOf('--case');
  if (child >= 0) {
    const [preset, size, runs] = process.argv.slice(child + 1, child + 4);
    await runCase(preset as VqPreset, Number(size), Number(runs), threads, device);
    return;
  }
  const cases: [VqPreset, number, number][] = stringArg('--cases', 'tiny:512,tiny:720,small:512')
    .split(',')
    .map((c) => {
      const [preset, size] = c.split(':');
      if ((preset !== 'tiny' && preset !== 'small') || !(Number(size) > 0 && Number(size) % 8 === 0))
        throw new Error(`bench:vq: --cases: "${c}" must be tiny:SIZE or small:SIZE with SIZE a multiple of 8`);
      return [preset, Number(size), preset === 'tiny' ? arg('--runs-tiny', 5) : arg('--runs-real', 3)];
    });
  // Build the VQs and their graphs first, so the cases measure serving, not building.
  const form = graphFormFor(device);
  for (const preset of new Set(cases.map((c) => c[0]))) {
    const w = VqWeights.open(vqDir(preset));
    encoderGraphPath(w, defaultCacheDir(w.dir), console.log, form);
    decoderGraphPath(w, defaultCacheDir(w.dir), console.log, form);
    w.close();
  }
  const results: CaseResult[] = [];
  for (const [preset, size, runs] of cases) {
    const out = execFileSync(
      process.execPath,
      [process.argv[1], '--case', preset, String(size), String(runs), '--threads', String(threads), '--device', device],
      { encoding: 'utf8', maxBuffer: 1 << 20, stdio: ['ignore', 'pipe', 'inherit'] },
    );
    const r = JSON.parse(out.trim().split('\n').pop()!) as CaseResult;
    console.log(
      `${preset} ${size}×${size}: encode ${median(r.encodeMs).toFixed(0)} ms, decode ${median(r.decodeMs).toFixed(0)} ms, ` +
        `peak RSS ${r.peakRssMiB.toFixed(0)} MiB, RSS after each run ${r.rssAfterMiB.map((x) => x.toFixed(0)).join(', ')} MiB, ${r.distinctCodes} distinct codes (encode ${r.encodeMs.map((x) => x.toFixed(0)).join(', ')}; decode ${r.decodeMs.map((x) => x.toFixed(0)).join(', ')})`,
    );
    results.push(r);
  }
  const quant = benchQuantizer();
  console.log(
    `quantizer, ${quant.latents} latents: k-d tree ${quant.treeMs.toFixed(0)} ms, scan ${quant.scanMs.toFixed(0)} ms`,
  );
  writeSection(results, quant, threads, loadBefore, device);
}

await main();
