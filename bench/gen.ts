// `npm run bench:gen`: Emu3-Gen through the whole system (vq + 2 shards + coordinator as processes, cli/system.ts) on
// the `small` preset (image_area 256² → a 32×32 grid, 1,059 steps per image, each step one guidance pair). Measures
// steps/s and images/min at 1 and 4 concurrent images, and projects one 720×720 image (8,193 steps) of the real
// model from the per-layer decode figures of BENCHMARKS.md "Stage" (`npm run bench:stage`). Writes its section.
//   node dist/bench/gen.js [--dir DIR] [--rounds N] [--no-write]
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism, homedir, loadavg } from 'node:os';
import { join } from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../cli/chat.js';
import { startSystem } from '../cli/system.js';
import { loadEmu3Config } from '../lib/model/config.js';
import { writeTinyEmu3 } from '../lib/model/tiny.js';
import { generationGrid } from '../lib/prompt/generation-size.js';
import { imageLayoutLength } from '../lib/prompt/layout.js';
import { writeTokenizerFiles } from '../lib/tokenizer/files.js';
import { writeTinyVq } from '../lib/vq/tiny.js';
import { benchmarksPath, median, writeBenchSection } from './report.js';

const args = process.argv.slice(2);
const arg = (name: string, def: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : def;
};
const dir = arg('dir', join(process.env.EMU3_CACHE_DIR ?? join(homedir(), '.cache', 'emu3-serve'), 'bench-small'));
const rounds = Number(arg('rounds', '1'));

/** One image to the end: its wall ms and the steps it took (completion tokens). */
function oneImage(client: grpc.Client, seed: number): Promise<{ ms: number; steps: number }> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const call = (
      client as unknown as {
        Generate(r: object): grpc.ClientReadableStream<{ final?: { usage: { completionTokens: number } } }>;
      }
    ).Generate({ task: 'TASK_GENERATE_IMAGE', parts: [{ text: `a landscape, number ${seed}` }], sampling: { seed } });
    let steps = 0;
    call.on('data', (m) => {
      if (m.final) steps = m.final.usage.completionTokens;
    });
    call.on('error', reject);
    call.on('end', () => resolve({ ms: performance.now() - started, steps }));
  });
}

interface LayerFigures {
  /** Per-layer decode step ms at batch 1 and 4, context 128, and the context-2048 ÷ 128 slowdown at batch 4. */
  b1: number;
  b4: number;
  ctxSlowdown: number;
  bandwidthGBs: number;
}

/** The "one Emu3 layer" rows of BENCHMARKS.md's Stage table, fp32 and int4; null when the section is missing. */
function stageFigures(): Record<'fp32' | 'int4', LayerFigures> | null {
  if (!existsSync(benchmarksPath)) return null;
  const doc = readFileSync(benchmarksPath, 'utf8');
  const bw = /ORT ReduceSum over 1 GiB ([\d.]+) GB\/s/.exec(doc);
  const out: Partial<Record<'fp32' | 'int4', LayerFigures>> = {};
  for (const prec of ['fp32', 'int4'] as const) {
    const line = doc.split('\n').find((l) => l.startsWith('| one Emu3 layer') && l.includes(`| ${prec} |`));
    if (!line || !bw) return null;
    const cells = line.split('|').map((c) => c.trim());
    // | model | prec | weight MiB | read MiB | b1 c128 | b4 c128 | b16 c128 | b1 c2048 | b4 c2048 | ...
    const [b1c128, b4c128, , , b4c2048] = cells.slice(5, 10).map(Number);
    out[prec] = { b1: 1000 / b1c128, b4: 4000 / b4c128, ctxSlowdown: b4c128 / b4c2048, bandwidthGBs: Number(bw[1]) };
  }
  return out as Record<'fp32' | 'int4', LayerFigures>;
}

/**
 * One 720×720 image of the real model (32 layers, hidden 4096, vocabulary 184,622) on one CPU like this one: per step
 * a batch of 2 (the pair) through 32 layers, with the per-layer step interpolated between batch 1 and 4 and scaled
 * linearly in context from the Stage table's 128 → 2048 slowdown to the image's mean context, plus lm_head (the
 * vocabulary × hidden weight read once per step at the measured bandwidth).
 */
function projection(f: LayerFigures, prec: 'fp32' | 'int4') {
  const steps = imageLayoutLength(generationGrid('1:1', 720 * 720));
  const promptTokens = 60;
  const meanContext = promptTokens + steps / 2;
  const b2 = f.b1 + (f.b4 - f.b1) / 3;
  const ctxFactor = 1 + (f.ctxSlowdown - 1) * ((meanContext - 128) / (2048 - 128));
  const lmHeadBytes = 184622 * 4096 * (prec === 'fp32' ? 4 : 0.5 + 1 / 16);
  const lmHeadMs = (lmHeadBytes / (f.bandwidthGBs * 1e9)) * 1000;
  const stepMs = 32 * b2 * ctxFactor + lmHeadMs;
  return { steps, stepMs, lmHeadMs, ctxFactor, minutes: (steps * stepMs) / 60000 };
}

async function main(): Promise<void> {
  if (!existsSync(join(dir, 'config.json'))) {
    console.error(`generating the small preset into ${dir} (once) ...`);
    writeTinyEmu3(dir, { seed: 0, preset: 'small', dtype: 'f32', shards: 1 });
    await writeTokenizerFiles(dir);
    writeTinyVq(join(dir, 'vq'), { seed: 0, preset: 'small' });
  }
  const config = loadEmu3Config(dir);
  const stepsPerImage = imageLayoutLength(generationGrid('1:1', config.imageArea));
  const started = Date.now();
  const system = await startSystem(
    { modelDir: dir, shards: 2, logDir: join(dir, 'logs-gen'), progress: (l) => console.error(`  ${l}`) },
    config,
  );
  const client = emu3Client(system.address);
  const rows: { concurrency: number; stepsPerS: number; imagesPerMin: number; imageS: number }[] = [];
  try {
    // Warm-up: one image at concurrency 4's batch shapes is too long; a short chat-free image at 1 is enough to load
    // the graphs and cache the unconditional prompt (every image below copies it from the prefix cache).
    console.error('warm-up: one image ...');
    await oneImage(client, 999);
    for (const concurrency of [1, 4]) {
      const sps: number[] = [];
      const ipm: number[] = [];
      const per: number[] = [];
      for (let r = 0; r < rounds; r++) {
        const t0 = performance.now();
        const runs = await Promise.all(Array.from({ length: concurrency }, (_, i) => oneImage(client, r * 10 + i)));
        const wall = performance.now() - t0;
        const steps = runs.reduce((a, x) => a + x.steps, 0);
        if (runs.some((x) => x.steps !== stepsPerImage))
          throw new Error(`an image took other than ${stepsPerImage} steps`);
        sps.push(steps / (wall / 1000));
        ipm.push(concurrency / (wall / 60000));
        per.push(median(runs.map((x) => x.ms)) / 1000);
        console.error(`  c=${concurrency} round ${r + 1}: ${(wall / 1000).toFixed(1)} s`);
      }
      rows.push({ concurrency, stepsPerS: median(sps), imagesPerMin: median(ipm), imageS: median(per) });
    }
  } finally {
    client.close();
    await system.stop();
  }
  const f = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
  const lines = [
    '| concurrent images | steps/s (pairs, all images) | images/min | seconds per image (median) |',
    '|---|---|---|---|',
    ...rows.map((r) => `| ${r.concurrency} | ${f(r.stepsPerS)} | ${f(r.imagesPerMin, 2)} | ${f(r.imageS)} |`),
    '',
  ];
  const figures = stageFigures();
  if (figures) {
    lines.push(
      '| projection: real model, one 720×720 image | steps | ms per step (pair) | of which lm_head | minutes per image |',
      '|---|---|---|---|---|',
    );
    for (const prec of ['fp32', 'int4'] as const) {
      const p = projection(figures[prec], prec);
      lines.push(`| ${prec} | ${p.steps} | ${f(p.stepMs)} | ${f(p.lmHeadMs)} | ${f(p.minutes)} |`);
    }
    lines.push('');
  } else lines.push('(No "Stage" figures in BENCHMARKS.md: run `npm run bench:stage` for the projection.)', '');
  lines.push(
    `Small preset, 2 shards, ${stepsPerImage} steps per image (a ${Math.sqrt(config.imageArea) / 8}×${Math.sqrt(config.imageArea) / 8} grid), ` +
      `defaults (guidance 3, top-k 2048, temperature 1), ${rounds} round(s) per concurrency after one warm-up image; ` +
      `${availableParallelism()} cores, load average at the end ${loadavg()[0].toFixed(1)} (shared machine). Total ${((Date.now() - started) / 1000).toFixed(0)} s.`,
  );
  const text = lines.join('\n');
  console.log(text);
  if (!args.includes('--no-write'))
    writeBenchSection(
      'Image generation',
      [
        'Command: `npm run bench:gen` (builds, then `node dist/bench/gen.js [--dir DIR] [--rounds N]`). Starts vq, 2 shards',
        'and the coordinator as processes on the `small` preset and generates whole images (TASK_GENERATE_IMAGE, each a',
        'conditional + unconditional pair: one step = one sampled token = two rows through every stage). The',
        'projection takes the "one Emu3 layer" rows of the Stage table: the per-layer decode step at batch 2 (between',
        'batch 1 and 4), scaled linearly in context from the 128 → 2048 slowdown to the mean context of a 720×720 image',
        '(~4,150 positions), × 32 layers, plus lm_head (184,622 × 4,096 weights read once per step at the measured',
        'bandwidth). One CPU, no pipelining across images; a projection, not a measurement.',
        '',
        text,
      ].join('\n'),
    );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
