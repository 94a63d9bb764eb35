// Image preprocessing speed: the Pillow-compatible bicubic resize and the whole bytes → normalised tensor path
// (sharp decode + smart resize + resize + normalise), on deterministic synthetic images. Writes its section of
// BENCHMARKS.md. Usage: npm run bench:preprocess [-- --runs N] [--no-write]
import { cpus, loadavg } from 'node:os';
import sharp from 'sharp';
import { Rng } from '../lib/util/rng.js';
import { PREPROCESSOR_DEFAULTS, preprocessImage } from '../lib/vq/preprocess.js';
import { resizeBicubic } from '../lib/vq/resize.js';
import { median, writeBenchSection } from './report.js';

const args = process.argv.slice(2);
const runsArg = args.indexOf('--runs');
const runs = runsArg >= 0 ? Number(args[runsArg + 1]) : 7;

/** A smooth pattern with noise (compresses like a photo, unlike pure noise). */
function syntheticRgb(width: number, height: number, seed: number): Uint8Array {
  const rng = new Rng(seed);
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      out[i] = (128 + 100 * Math.sin(x / 37) + rng.normal() * 8) & 255;
      out[i + 1] = (128 + 100 * Math.cos(y / 23) + rng.normal() * 8) & 255;
      out[i + 2] = ((x + y) / 8 + rng.normal() * 8) & 255;
    }
  }
  return out;
}

function timeMs(fn: () => unknown): number {
  const t0 = performance.now();
  fn();
  return performance.now() - t0;
}

async function timeMsAsync(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

async function main(): Promise<void> {
  const rows: string[] = ['| case | median ms | min ms |', '|---|---|---|'];
  const resizeCases: [number, number, number, number][] = [
    [1024, 1024, 720, 720],
    [3000, 2000, 1248, 832],
    [256, 256, 512, 512],
  ];
  for (const [sw, sh, dw, dh] of resizeCases) {
    const src = syntheticRgb(sw, sh, 1);
    const t = Array.from({ length: runs }, () => timeMs(() => resizeBicubic(src, sw, sh, dw, dh)));
    rows.push(`| resize ${sw}×${sh} → ${dw}×${dh} | ${median(t).toFixed(1)} | ${Math.min(...t).toFixed(1)} |`);
    console.log(rows[rows.length - 1]);
  }
  const cfg = { ...PREPROCESSOR_DEFAULTS };
  for (const [w, h, format] of [
    [1024, 1024, 'jpeg'],
    [3000, 2000, 'jpeg'],
    [640, 480, 'png'],
  ] as const) {
    const raw = syntheticRgb(w, h, 2);
    const img = sharp(Buffer.from(raw), { raw: { width: w, height: h, channels: 3 } });
    const bytes = format === 'jpeg' ? await img.jpeg({ quality: 90 }).toBuffer() : await img.png().toBuffer();
    const t: number[] = [];
    for (let i = 0; i < runs; i++) t.push(await timeMsAsync(() => preprocessImage(bytes, cfg)));
    rows.push(
      `| preprocess ${w}×${h} ${format.toUpperCase()} (${(bytes.length / 1024).toFixed(0)} KiB) | ${median(t).toFixed(1)} | ${Math.min(...t).toFixed(1)} |`,
    );
    console.log(rows[rows.length - 1]);
  }
  const text = [
    'Command: `npm run bench:preprocess` (builds, then `node dist/bench/preprocess.js [--runs N]`). Synthetic images,',
    `${runs} runs each, one process; "preprocess" = sharp decode + smart resize (docs/model.md "Smart resize",`,
    'default 512²–1024² bounds) + Pillow-exact bicubic + normalise to a float32 [3,H,W] tensor.',
    '',
    ...rows,
    '',
    `Machine: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, load average ${loadavg()[0].toFixed(1)} at the end (shared machine).`,
  ].join('\n');
  if (!args.includes('--no-write')) writeBenchSection('Image preprocessing', text);
}

await main();
