// VQ codec benchmark: encode and decode latency (median) and peak RSS, for the tiny VQ at 512×512 and 720×720 and
// the real-shaped VQ (ch 256, ch_mult [1,2,2,4], random weights) at 512×512. Each case runs in its own child process
// so its peak RSS is its own; the graphs are built beforehand (cached), so the numbers are serving numbers.
// Encode input is an already preprocessed [3, H, W] image in [−1, 1]; decode output is the raw decoder tensor
// (no PNG). Usage: npm run bench:vq [-- --runs-tiny N --runs-real N --threads N]
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Rng } from '../lib/util/rng.js';
import { VqCodec } from '../lib/vq/codec.js';
import { decoderGraphPath } from '../lib/vq/decoder-graph.js';
import { encoderGraphPath } from '../lib/vq/encoder-graph.js';
import { defaultCacheDir } from '../lib/vq/graph-cache.js';
import { type VqPreset, writeTinyVq } from '../lib/vq/tiny.js';
import { VqWeights } from '../lib/vq/weights.js';

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
}

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function vqDir(preset: VqPreset): string {
  const dir = join(tmpdir(), `emu3-bench-vq-${preset}-seed${SEED}`);
  if (!existsSync(join(dir, 'model.safetensors'))) writeTinyVq(dir, { seed: SEED, preset }, console.log);
  return dir;
}

/** Child: one preset and size; prints one JSON line. */
async function runCase(preset: VqPreset, size: number, runs: number, threads: number): Promise<void> {
  const t0 = performance.now();
  const codec = await VqCodec.open(vqDir(preset), { threads });
  const openMs = performance.now() - t0;
  const rng = new Rng(42);
  const pixels = new Float32Array(3 * size * size).map(() => rng.uniform() * 2 - 1);
  const encodeMs: number[] = [];
  const decodeMs: number[] = [];
  let distinct = 0;
  // One warm-up pair (ORT allocates its arena and picks kernels on the first run), then the timed runs.
  for (let i = 0; i <= runs; i++) {
    let t = performance.now();
    const { h, w, codes } = await codec.encode(pixels, size, size);
    const enc = performance.now() - t;
    t = performance.now();
    await codec.decode(codes, h, w);
    const dec = performance.now() - t;
    distinct = new Set(codes).size;
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
  };
  console.log(JSON.stringify(result));
}

function writeSection(results: CaseResult[], threads: number, loadBefore: number): void {
  const path = join(import.meta.dirname, '..', '..', 'BENCHMARKS.md');
  const begin = '<!-- bench:vq begin -->';
  const end = '<!-- bench:vq end -->';
  const rows = results.map((r) => {
    const name = r.preset === 'tiny' ? 'tiny (ch 32)' : 'real-shaped (ch 256)';
    const tokens = (r.size / 8) ** 2;
    return `| ${name} | ${r.size}×${r.size} | ${tokens} | ${median(r.encodeMs).toFixed(0)} | ${median(r.decodeMs).toFixed(0)} | ${r.peakRssMiB.toFixed(0)} | ${r.runs} | ${(r.openMs / 1000).toFixed(1)} |`;
  });
  const section = [
    begin,
    '## VQ image tokenizer (encode / decode)',
    '',
    'Command: `npm run bench:vq` (bench/vq.ts). Random-weight VQs from `writeTinyVq` (seed 1); the real-shaped one has',
    'the upstream shape (ch 256, ch_mult [1,2,2,4], 270.7 M parameters). Encode = ONNX encoder graph + JS argmin over',
    'the 32,768-code codebook, from an already preprocessed [3, H, W] float image; decode = codebook lookup + ONNX',
    "decoder graph, raw output (no PNG). ORT runs in the codec's worker thread; graphs built beforehand (cached).",
    'Medians over the timed runs after one warm-up pair; peak RSS = the whole process (main + worker) of that case',
    'alone (each case runs in its own process).',
    '',
    `Machine: ${cpus()[0]?.model ?? 'unknown CPU'}, ${availableParallelism()} cores (shared with other work while measured),`,
    `onnxruntime-node 1.30 CPU, ${threads > 0 ? `${threads} intra-op threads` : 'ORT default intra-op threads'}. Measured ${new Date().toISOString().slice(0, 10)};`,
    `1-minute load average ${loadBefore.toFixed(1)} at the start and ${loadavg()[0].toFixed(1)} at the end (above ${availableParallelism()} means`,
    'other processes competed for the cores and the latencies are inflated).',
    '',
    '| VQ | image | codes | encode ms | decode ms | peak RSS MiB | runs | open s |',
    '|---|---|---|---|---|---|---|---|',
    ...rows,
    end,
  ].join('\n');
  const old = existsSync(path) ? readFileSync(path, 'utf8') : '# Benchmarks\n';
  const at = old.indexOf(begin);
  const next =
    at >= 0
      ? old.slice(0, at) + section + old.slice(old.indexOf(end) + end.length)
      : `${old.trimEnd()}\n\n${section}\n`;
  writeFileSync(path, next);
  console.log(`wrote the VQ section of ${path}`);
}

async function main(): Promise<void> {
  const threads = arg('--threads', 0);
  const loadBefore = loadavg()[0];
  const child = process.argv.indexOf('--case');
  if (child >= 0) {
    const [preset, size, runs] = process.argv.slice(child + 1, child + 4);
    await runCase(preset as VqPreset, Number(size), Number(runs), threads);
    return;
  }
  const cases: [VqPreset, number, number][] = [
    ['tiny', 512, arg('--runs-tiny', 5)],
    ['tiny', 720, arg('--runs-tiny', 5)],
    ['small', 512, arg('--runs-real', 3)],
  ];
  // Build the VQs and their graphs first, so the cases measure serving, not building.
  for (const preset of ['tiny', 'small'] as const) {
    const w = VqWeights.open(vqDir(preset));
    encoderGraphPath(w, defaultCacheDir(), console.log);
    decoderGraphPath(w, defaultCacheDir(), console.log);
    w.close();
  }
  const results: CaseResult[] = [];
  for (const [preset, size, runs] of cases) {
    const out = execFileSync(
      process.execPath,
      [process.argv[1], '--case', preset, String(size), String(runs), '--threads', String(threads)],
      { encoding: 'utf8', maxBuffer: 1 << 20, stdio: ['ignore', 'pipe', 'inherit'] },
    );
    const r = JSON.parse(out.trim().split('\n').pop()!) as CaseResult;
    console.log(
      `${preset} ${size}×${size}: encode ${median(r.encodeMs).toFixed(0)} ms, decode ${median(r.decodeMs).toFixed(0)} ms, ` +
        `peak RSS ${r.peakRssMiB.toFixed(0)} MiB, ${r.distinctCodes} distinct codes (encode ${r.encodeMs.map((x) => x.toFixed(0)).join(', ')}; decode ${r.decodeMs.map((x) => x.toFixed(0)).join(', ')})`,
    );
    results.push(r);
  }
  writeSection(results, threads, loadBefore);
}

await main();
