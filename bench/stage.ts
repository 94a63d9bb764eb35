// Stage benchmark: decode tokens/s at batch 1/4/16 and context 128/2048, prefill tokens/s of 128- and 2048-token
// prompts, fp32 and int4 (with and without its int8 prefill path), on the
// `small` preset (whole model in one stage) and on ONE decoder layer with the real Emu3 shapes (hidden 4096,
// intermediate 14336, 32 heads, 8 KV heads: a middle stage of a 3-layer checkpoint). Also: weight bytes read per
// token, bandwidth efficiency (achieved weight GB/s ÷ this machine's read bandwidth, measured in the same run),
// peak RSS while building / loading ÷ weight bytes (each in a fresh child process), int4-vs-fp32 greedy agreement,
// and a mixed micro-batch step (15 decode rows + one 256-token prefill chunk) as one run against the same work as
// two runs (decodes, then the chunk), measured side by side.
// Usage: node dist/bench/stage.js [--dir DIR] [--runs N] [--no-write] [--mixed]   (DIR keeps the generated
// checkpoints; --mixed runs only the mixed-step comparison and rewrites only its part of the Stage section)
//
// --device webgpu [--precisions fp16,int4] [--model small|layer|tiny] [--quick] [--device-gbps N]: the same table on
// ONNX Runtime's WebGPU provider (KV arena on the device), plus the host↔device bytes of a decode step and the GB/s
// against the device's read bandwidth (measured: ReduceSum over 1 GiB already on the device; --device-gbps adds the
// nominal figure, e.g. 4800 for an H200). Prints only (never rewrites docs/benchmarks.md). --quick: context 128/512,
// batch 1/4, 3 runs, no RSS probes (minutes on lavapipe with --model tiny).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ort from 'onnxruntime-node';
import { expectedTensors } from '../lib/model/checkpoint.js';
import { loadEmu3Config, parseEmu3Config } from '../lib/model/config.js';
import { writeSafetensors } from '../lib/model/safetensors.js';
import { tinyConfigJson, writeTinyEmu3 } from '../lib/model/tiny.js';
import { GraphBuilder } from '../lib/onnx/graph.js';
import { type Device, PRECISIONS, type Precision } from '../lib/onnx/stage-graph.js';
import { type ForwardInput, StageRuntime } from '../lib/runtime/stage-runtime.js';
import { Rng } from '../lib/util/rng.js';
import { benchmarksPath, writeBenchSection } from './report.js';

const args = process.argv.slice(2);
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
const benchDir = flag('dir') ?? join(tmpdir(), 'emu3-bench-stage');
const DEVICE = (flag('device') ?? 'cpu') as Device;
const QUICK = args.includes('--quick');
const RUNS = Number(flag('runs') ?? (QUICK ? 3 : 7));
const CTX = QUICK ? [128, 512] : [128, 2048];
const BATCH = QUICK ? [1, 4] : [1, 4, 16];

interface Model {
  name: string;
  dir: string;
  layers: [number, number];
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function ensureSmall(): Model {
  const dir = join(benchDir, 'small');
  if (!existsSync(join(dir, 'config.json')))
    writeTinyEmu3(dir, { seed: 1, preset: 'small', dtype: 'f32', shards: 2 }, console.error);
  return { name: 'small (12 layers + embed + lm_head)', dir, layers: [0, 12] };
}

/** A 3-layer checkpoint with the real Emu3 layer shapes (bf16, tied embeddings); the bench runs layer 1 alone. */
function ensureRealLayer(): Model {
  const dir = join(benchDir, 'emu3-layer');
  if (!existsSync(join(dir, 'config.json'))) {
    mkdirSync(dir, { recursive: true });
    const json = {
      ...tinyConfigJson('small', 'bf16'),
      hidden_size: 4096,
      intermediate_size: 14336,
      num_hidden_layers: 3,
      num_attention_heads: 32,
      num_key_value_heads: 8,
      tie_word_embeddings: true,
      max_position_embeddings: 4096,
    };
    const config = parseEmu3Config(json, 'bench emu3-layer');
    const rng = new Rng(5);
    const tensors = expectedTensors(config).map((t) => ({
      name: t.name,
      dtype: 'BF16' as const,
      shape: t.shape,
      produce: () => {
        const n = t.shape.reduce((a, b) => a * b, 1);
        const out = new Float32Array(n);
        if (t.shape.length === 1) return out.fill(1);
        const scale = 1 / Math.sqrt(t.shape[t.shape.length - 1]);
        let x = rng.nextU32() | 1;
        for (let i = 0; i < n; i++) {
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          out[i] = ((x >>> 0) / 2 ** 32 - 0.5) * 3.4 * scale;
        }
        return out;
      },
    }));
    writeSafetensors(join(dir, 'model.safetensors'), tensors);
    writeFileSync(join(dir, 'config.json'), `${JSON.stringify(json, null, 2)}\n`);
  }
  return { name: 'one Emu3 layer (4096/14336/32/8)', dir, layers: [1, 2] };
}

/** Bytes of the int8 prefill path's weights for `layers` decoder layers of the checkpoint in `dir`. */
function int8PathBytes(dir: string, layers: number): number {
  const c = loadEmu3Config(dir);
  const D = c.hiddenSize;
  const qkv = (c.numAttentionHeads + 2 * c.numKeyValueHeads) * c.headDim;
  const o = c.numAttentionHeads * c.headDim;
  const I = c.intermediateSize;
  const weights = qkv * D + D * o + 2 * I * D + D * I;
  const scales = 4 * (qkv + D + 2 * I + D);
  return layers * (weights + scales);
}

/** Machine read bandwidth: ORT ReduceSum over 1 GiB fed from JS (all cores), and a JS Float64Array sum. */
async function readBandwidth(): Promise<{ ort: number; js: number }> {
  const n = 2 ** 28;
  const data = new Float32Array(n).fill(1);
  const dir = join(benchDir, 'bw');
  mkdirSync(dir, { recursive: true });
  const g = new GraphBuilder(dir, 'sum');
  g.input('x', 'float', [n]);
  g.output(g.op('ReduceSum', ['x'], 'y', { keepdims: 0 }), 'float', []);
  const session = await ort.InferenceSession.create(g.save());
  const feeds = { x: new ort.Tensor('float32', data, [n]) };
  const ortRates: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    ortRates.push((n * 4) / ((performance.now() - t0) / 1000) / 1e9);
  }
  await session.release();
  const f64 = new Float64Array(data.buffer);
  const jsRates: number[] = [];
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    let s = 0;
    for (let j = 0; j < f64.length; j++) s += f64[j];
    if (s === -1) console.log('');
    jsRates.push((f64.length * 8) / ((performance.now() - t0) / 1000) / 1e9);
  }
  return { ort: median(ortRates), js: median(jsRates) };
}

/** Child-process probe: opens the stage and reports peak RSS (sampled) and weight bytes. */
async function rssProbe(
  dir: string,
  first: number,
  end: number,
  precision: Precision,
  cacheDir: string,
  int8Prefill: boolean,
): Promise<void> {
  const base = process.memoryUsage().rss;
  let peak = base;
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage().rss);
  }, 5);
  const rt = await StageRuntime.open({
    modelDir: dir,
    layers: [first, end],
    precision,
    maxSequences: 1,
    maxSequenceLength: 16,
    cacheDir,
    int8Prefill,
  });
  peak = Math.max(peak, process.memoryUsage().rss);
  clearInterval(timer);
  console.log(JSON.stringify({ base, peak, weightBytes: rt.weightBytes, reused: rt.reusedGraph }));
  await rt.close();
}

function probe(
  model: Model,
  precision: Precision,
  cacheDir: string,
  int8Prefill: boolean,
): { ratio: number; reused: boolean } {
  const out = execFileSync(
    process.execPath,
    [
      fileURLToPath(import.meta.url),
      '--rss-probe',
      model.dir,
      String(model.layers[0]),
      String(model.layers[1]),
      precision,
      cacheDir,
      String(int8Prefill),
    ],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const r = JSON.parse(out.trim().split('\n').pop() as string);
  return { ratio: (r.peak - r.base) / r.weightBytes, reused: r.reused };
}

interface Row {
  model: string;
  /** The precision, and for int4 whether its int8 prefill path was built. */
  variant: string;
  precision: Precision;
  weightMiB: number;
  readMiB: number;
  buildRss: number;
  loadRss: number;
  /** tok/s of a 128-token prompt (one run) and of a 2048-token prompt (4 runs of 512). */
  prefill128: number;
  prefill2048: number;
  decode: Record<string, number>;
  gbps: number;
  /** Host↔device bytes of the last b1 ctx128 decode step (StageRuntime.stats). */
  busBytes: number;
}

async function benchModel(model: Model, precision: Precision, int8Prefill = true): Promise<Row> {
  // A fresh cache per configuration, so that the first probe really builds and the second really loads.
  const variant = precision === 'int4' && !int8Prefill ? 'int4, no int8 path' : precision;
  const cacheDir = join(
    benchDir,
    `cache-${model.layers.join('-')}-${precision}${DEVICE === 'cpu' ? '' : `-${DEVICE}`}${int8Prefill ? '' : '-no-int8'}`,
  );
  rmSync(cacheDir, { recursive: true, force: true });
  const rss = DEVICE === 'cpu' && !QUICK;
  const build = rss ? probe(model, precision, cacheDir, int8Prefill) : { ratio: Number.NaN, reused: false };
  const load = rss ? probe(model, precision, cacheDir, int8Prefill) : { ratio: Number.NaN, reused: false };
  const slots = Math.max(...BATCH);
  const rt = await StageRuntime.open({
    modelDir: model.dir,
    layers: model.layers,
    precision,
    device: DEVICE,
    maxSequences: slots,
    maxSequenceLength: Math.max(...CTX) + 8,
    cacheDir,
    int8Prefill,
    log: DEVICE === 'cpu' ? undefined : (m) => console.error(m),
  });
  const D = rt.hiddenSize;
  // The embedding is a Gather (one row per token), so a decode step reads every weight except the table.
  const tableBytes = precision === 'fp16' ? 2 : 4;
  // An int4 stage's int8 prefill path is a second copy of the layer weights that decode steps do not read: one byte
  // per weight and a float scale per output channel (stage-graph.ts).
  const int8Bytes = rt.shape.int8Prefill ? int8PathBytes(model.dir, rt.shape.layers.length) : 0;
  const readBytes = rt.weightBytes - (rt.isFirst ? rt.vocabSize * D * tableBytes : 0) - int8Bytes;
  const rng = new Rng(9);
  const input = (tokens: number): ForwardInput =>
    rt.isFirst
      ? { tokens: Int32Array.from({ length: tokens }, () => rng.nextU32() % 151643) }
      : { hidden: rng.fillNormal(new Float32Array(tokens * D), 1) };
  // A 128-token prompt as one run, then the longest context (2048) in runs of 512 (llama.cpp's default micro-batch)
  // into slot 0, each from position 0; then copy slot 0 to the others (KV contents do not change timing).
  const longest = Math.max(...CTX);
  await rt.forward([{ slot: 0, start: 0, length: 128 }], input(128)); // warm-up: first run at a new shape
  const short: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t = performance.now();
    await rt.forward([{ slot: 0, start: 0, length: 128 }], input(128));
    short.push(128 / ((performance.now() - t) / 1000));
  }
  const chunk = Math.min(512, longest);
  const long: number[] = [];
  for (let i = 0; i < Math.min(RUNS, 3); i++) {
    const t = performance.now();
    for (let start = 0; start < longest; start += chunk)
      await rt.forward([{ slot: 0, start, length: chunk }], input(chunk));
    long.push(longest / ((performance.now() - t) / 1000));
  }
  for (let s = 1; s < slots; s++) await rt.copyKv(0, s, longest);
  const decode: Record<string, number> = {};
  let gbps = 0;
  let busBytes = 0;
  for (const ctx of [...CTX].sort((a, b) => b - a)) {
    for (const batch of BATCH) {
      const items = Array.from({ length: batch }, (_, slot) => ({ slot, start: ctx, length: 1 }));
      const times: number[] = [];
      for (let i = 0; i < RUNS + 2; i++) {
        const inp = input(batch);
        const t = performance.now();
        await rt.forward(items, inp);
        if (i >= 2) times.push((performance.now() - t) / 1000);
      }
      const step = median(times);
      decode[`${batch}@${ctx}`] = batch / step;
      if (batch === 1 && ctx === 128) {
        gbps = readBytes / step / 1e9;
        const last = (await rt.stats()).last;
        busBytes = last ? last.hostToDevice + last.deviceToHost : 0;
      }
    }
  }
  await rt.close();
  return {
    model: model.name,
    variant,
    precision,
    weightMiB: rt.weightBytes / 2 ** 20,
    readMiB: readBytes / 2 ** 20,
    buildRss: build.ratio,
    loadRss: load.ratio,
    prefill128: median(short),
    prefill2048: median(long),
    decode,
    gbps,
    busBytes,
  };
}

interface MixedRow {
  model: string;
  precision: Precision;
  /** Median ms of the mixed step as one forward call (one session run). */
  oneRun: number;
  /** Median ms of the same work as two calls: the decode rows, then the chunk. */
  twoRuns: number;
  /** The two parts of twoRuns, medians. */
  decodeOnly: number;
  chunkOnly: number;
  /** Fastest of the runs: other processes on the machine only ever add time. */
  oneRunMin: number;
  twoRunsMin: number;
}

const MIXED = { decodes: 15, context: 1024, chunk: 256 };

/**
 * 15 sequences at context 1024 decoding one token each, plus a 256-token prefill chunk of a 16th: one call against
 * two calls, alternating in the same loop so that both see the same machine load.
 */
async function benchMixed(model: Model, precision: Precision): Promise<MixedRow> {
  const { decodes, context, chunk } = MIXED;
  const rt = await StageRuntime.open({
    modelDir: model.dir,
    layers: model.layers,
    precision,
    maxSequences: decodes + 1,
    maxSequenceLength: context + chunk + 8,
    cacheDir: join(benchDir, `cache-${model.layers.join('-')}-${precision}`),
  });
  const D = rt.hiddenSize;
  const rng = new Rng(11);
  const input = (tokens: number): ForwardInput =>
    rt.isFirst
      ? { tokens: Int32Array.from({ length: tokens }, () => rng.nextU32() % 151643) }
      : { hidden: rng.fillNormal(new Float32Array(tokens * D), 1) };
  for (let start = 0; start < context; start += 512) await rt.forward([{ slot: 0, start, length: 512 }], input(512));
  for (let s = 1; s < decodes; s++) await rt.copyKv(0, s, context);
  const decodeItems = Array.from({ length: decodes }, (_, slot) => ({ slot, start: context, length: 1 }));
  // The chunk re-prefills positions [0, 256) of its slot each time (the same work every run).
  const chunkItem = { slot: decodes, start: 0, length: chunk };
  const one: number[] = [];
  const dec: number[] = [];
  const chk: number[] = [];
  const two: number[] = [];
  for (let i = 0; i < RUNS + 1; i++) {
    const mixedInput = input(decodes + chunk);
    const [decodeInput, chunkInput] = [input(decodes), input(chunk)];
    let t = performance.now();
    await rt.forward([...decodeItems, chunkItem], mixedInput);
    const oneMs = performance.now() - t;
    t = performance.now();
    await rt.forward(decodeItems, decodeInput);
    const decMs = performance.now() - t;
    t = performance.now();
    await rt.forward([chunkItem], chunkInput);
    const chkMs = performance.now() - t;
    if (i === 0) continue; // warm-up: the first run at a new shape grows ORT's arena
    one.push(oneMs);
    dec.push(decMs);
    chk.push(chkMs);
    two.push(decMs + chkMs);
  }
  await rt.close();
  return {
    model: model.name,
    precision,
    oneRun: median(one),
    twoRuns: median(two),
    decodeOnly: median(dec),
    chunkOnly: median(chk),
    oneRunMin: Math.min(...one),
    twoRunsMin: Math.min(...two),
  };
}

function mixedText(rows: MixedRow[], mixedOnly: boolean): string {
  const { decodes, context, chunk } = MIXED;
  const lines = [
    MIXED_HEADING,
    '',
    `Command: \`node dist/bench/stage.js --mixed --runs ${RUNS}\` (part of \`npm run bench:stage\`). One micro-batch of ${decodes} decode rows at`,
    `context ${context} plus one ${chunk}-token prefill chunk, as ONE forward call (one session run: every weight read once)`,
    'against the same work as two calls (the decode rows, then the chunk), alternating in one loop; medians of',
    `${RUNS} runs after a warm-up, and the fastest run of each. Tokens/s counts the ${decodes + chunk} new tokens of`,
    'the step. What one run saves is one pass over the weights, which costs about one batch-1 decode step (the',
    "table's tok/s b1 ctx128, inverted); beside a 256-token chunk that is a few percent of the step.",
    ...(mixedOnly
      ? ['This block was rewritten alone by `--mixed`; the table above is from the last full `npm run bench:stage`.']
      : []),
    '',
    '| model | prec | one run ms | two runs ms (decodes + chunk) | one ÷ two | tok/s one run | tok/s two runs | fastest: one / two ms | fastest one ÷ two |',
    '|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of rows) {
    const tokens = decodes + chunk;
    lines.push(
      `| ${[
        r.model,
        r.precision,
        r.oneRun.toFixed(1),
        `${r.twoRuns.toFixed(1)} (${r.decodeOnly.toFixed(1)} + ${r.chunkOnly.toFixed(1)})`,
        (r.oneRun / r.twoRuns).toFixed(2),
        (tokens / (r.oneRun / 1000)).toFixed(1),
        (tokens / (r.twoRuns / 1000)).toFixed(1),
        `${r.oneRunMin.toFixed(1)} / ${r.twoRunsMin.toFixed(1)}`,
        (r.oneRunMin / r.twoRunsMin).toFixed(2),
      ].join(' | ')} |`,
    );
  }
  lines.push('', `1-minute load average at the end: ${loadavg()[0].toFixed(1)} (this machine has 2 cores, shared).`);
  return lines.join('\n');
}

const MIXED_HEADING = '### Mixed micro-batch step: one run against separate runs';

/** Replaces only the mixed-step block at the end of the Stage section (for --mixed), keeping the rest as it is. */
function writeMixedOnly(block: string): void {
  const doc = readFileSync(benchmarksPath, 'utf8');
  const start = doc.indexOf('## Stage\n');
  if (start < 0) throw new Error(`${benchmarksPath} has no Stage section: run the whole bench first`);
  const next = doc.indexOf('\n## ', start + 1);
  const section = doc.slice(start + '## Stage\n'.length, next >= 0 ? next : doc.length);
  const at = section.indexOf(MIXED_HEADING);
  writeBenchSection('Stage', `${(at >= 0 ? section.slice(0, at) : section).trim()}\n\n${block}`);
}

async function mixedRows(models: Model[]): Promise<MixedRow[]> {
  const rows: MixedRow[] = [];
  for (const model of models) {
    for (const precision of ['fp32', 'int4'] as const) {
      const row = await benchMixed(model, precision);
      console.error(JSON.stringify(row));
      rows.push(row);
    }
  }
  return rows;
}

/** Greedy agreement int4 vs fp32 on `small`: first 8 tokens on 3 prompts. */
async function int4Agreement(model: Model): Promise<number[]> {
  const open = (precision: Precision) =>
    StageRuntime.open({
      modelDir: model.dir,
      layers: model.layers,
      precision,
      maxSequences: 1,
      maxSequenceLength: 64,
      cacheDir: join(benchDir, `cache-${model.layers.join('-')}-${precision}`),
    });
  const greedy = async (rt: StageRuntime, prompt: number[]) => {
    const tokens: number[] = [];
    let out = await rt.forward([{ slot: 0, start: 0, length: prompt.length }], { tokens: Int32Array.from(prompt) });
    while (tokens.length < 8) {
      if (!('logits' in out)) throw new Error('not the last stage');
      const logits = out.logits;
      let best = 0;
      for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
      tokens.push(best);
      if (tokens.length < 8)
        out = await rt.forward([{ slot: 0, start: prompt.length + tokens.length - 1, length: 1 }], {
          tokens: Int32Array.of(best),
        });
    }
    return tokens;
  };
  const prompts = [0, 1, 2].map((p) => {
    const rng = new Rng(200 + p);
    return Array.from({ length: 16 }, () => rng.nextU32() % 151643);
  });
  const results: number[][][] = [];
  for (const precision of ['fp32', 'int4'] as const) {
    const rt = await open(precision);
    results.push([]);
    for (const p of prompts) results[results.length - 1].push(await greedy(rt, p));
    await rt.close();
  }
  return prompts.map((_, i) => {
    let n = 0;
    while (n < 8 && results[0][i][n] === results[1][i][n]) n++;
    return n;
  });
}

function table(rows: Row[], bw: { ort: number; js: number }): string {
  const machine = Math.max(bw.ort, bw.js);
  const cols = CTX.flatMap((c) => BATCH.map((b) => `${b}@${c}`));
  const head = [
    'model',
    'prec',
    'weight file MiB',
    'read/step MiB',
    ...cols.map((c) => `tok/s b${c.replace('@', ' ctx')}`),
    'prefill tok/s 128',
    'prefill tok/s 2048',
    'GB/s b1 ctx128',
    'bw eff',
    `ctx${CTX[1]}/ctx${CTX[0]} b1`,
    'RSS build',
    'RSS load',
    'host↔device B/step b1',
  ];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`];
  for (const r of rows) {
    lines.push(
      `| ${[
        r.model,
        r.variant,
        r.weightMiB.toFixed(0),
        r.readMiB.toFixed(0),
        ...cols.map((c) => r.decode[c].toFixed(2)),
        r.prefill128.toFixed(1),
        r.prefill2048.toFixed(1),
        r.gbps.toFixed(2),
        (r.gbps / machine).toFixed(2),
        (r.decode[`1@${CTX[0]}`] / r.decode[`1@${CTX[1]}`]).toFixed(2),
        Number.isNaN(r.buildRss) ? '—' : r.buildRss.toFixed(2),
        Number.isNaN(r.loadRss) ? '—' : r.loadRss.toFixed(2),
        String(r.busBytes),
      ].join(' | ')} |`,
    );
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  if (args[0] === '--rss-probe') {
    await rssProbe(args[1], Number(args[2]), Number(args[3]), args[4] as Precision, args[5], args[6] !== 'false');
    return;
  }
  mkdirSync(benchDir, { recursive: true });
  if (DEVICE !== 'cpu') {
    await deviceBench();
    return;
  }
  const started = Date.now();
  const models = [ensureSmall(), ensureRealLayer()];
  if (args.includes('--mixed')) {
    const block = `${mixedText(await mixedRows(models), true)}\n\nMixed-step time ${((Date.now() - started) / 1000).toFixed(0)} s.`;
    console.log(block);
    if (!args.includes('--no-write')) writeMixedOnly(block);
    return;
  }
  const bw = await readBandwidth();
  console.error(
    `read bandwidth: ORT ReduceSum ${bw.ort.toFixed(1)} GB/s, JS Float64Array sum ${bw.js.toFixed(1)} GB/s`,
  );
  const rows: Row[] = [];
  for (const model of models) {
    // int4 twice: with its int8 prefill path (the default) and without (MatMulNBits for every run), side by side.
    for (const [precision, int8Prefill] of [
      ['fp32', true],
      ['int4', true],
      ['int4', false],
    ] as const) {
      const row = await benchModel(model, precision, int8Prefill);
      console.error(JSON.stringify(row));
      rows.push(row);
    }
  }
  const agree = await int4Agreement(models[0]);
  const mixed = await mixedRows(models);
  const text = [
    table(rows, bw),
    '',
    `Machine read bandwidth in this run: ORT ReduceSum over 1 GiB ${bw.ort.toFixed(1)} GB/s, JS Float64Array sum ${bw.js.toFixed(1)} GB/s (efficiency uses the larger).`,
    `Weight bytes read per token = read/step MiB ÷ batch (a decode step reads every weight once, except the embedding table, which is gathered, and for int4 the int8 prefill copy, which only runs of ≥ 16 tokens read: batch 16 and prefill). GB/s = read/step bytes ÷ step time. int4 vs fp32 on small, first 8 greedy tokens agreeing on 3 prompts: ${agree.join(', ')}.`,
    `Total bench time ${((Date.now() - started) / 1000).toFixed(0)} s.`,
    '',
    mixedText(mixed, false),
  ].join('\n');
  console.log(text);
  if (!args.includes('--no-write')) writeSection(text);
}

/** Device read bandwidth: ReduceSum over 1 GiB that already lies on the device (made there by ConstantOfShape). */
async function deviceBandwidth(): Promise<number> {
  const n = 2 ** 28;
  const dir = join(benchDir, 'bw-device');
  mkdirSync(dir, { recursive: true });
  const make = new GraphBuilder(dir, 'make');
  make.input('shape', 'int64', [1]);
  make.op('ConstantOfShape', ['shape'], 'x', {
    value: { tensor: { type: 'float', dims: [1], raw: new Uint8Array(4) } },
  });
  make.output('x', 'float', [n]);
  const sum = new GraphBuilder(dir, 'sum');
  sum.input('x', 'float', [n]);
  sum.output(sum.op('ReduceSum', ['x'], 'y', { keepdims: 0 }), 'float', []);
  const opts = { executionProviders: [DEVICE] };
  const maker = await ort.InferenceSession.create(make.save(), { ...opts, preferredOutputLocation: 'gpu-buffer' });
  const summer = await ort.InferenceSession.create(sum.save(), opts);
  const x = (await maker.run({ shape: new ort.Tensor('int64', BigInt64Array.of(BigInt(n)), [1]) })).x;
  const rates: number[] = [];
  for (let i = 0; i < RUNS + 1; i++) {
    const t0 = performance.now();
    await summer.run({ x });
    if (i > 0) rates.push((n * 4) / ((performance.now() - t0) / 1000) / 1e9);
  }
  x.dispose();
  return median(rates);
}

function ensureTiny(): Model {
  const dir = join(benchDir, 'tiny');
  if (!existsSync(join(dir, 'config.json'))) writeTinyEmu3(dir, { seed: 1, preset: 'tiny', dtype: 'f32', shards: 1 });
  return { name: 'tiny (4 layers + embed + lm_head)', dir, layers: [0, 4] };
}

async function deviceBench(): Promise<void> {
  const started = Date.now();
  const which = flag('model') ?? 'layer';
  const model = which === 'tiny' ? ensureTiny() : which === 'small' ? ensureSmall() : ensureRealLayer();
  const precisions = (flag('precisions') ?? 'fp16,int4').split(',') as Precision[];
  for (const p of precisions) if (!PRECISIONS.includes(p)) throw new Error(`--precisions: unknown precision ${p}`);
  const measured = await deviceBandwidth();
  const nominal = flag('device-gbps') ? Number(flag('device-gbps')) : null;
  console.error(`device read bandwidth: ReduceSum over 1 GiB on the device ${measured.toFixed(1)} GB/s`);
  const rows: Row[] = [];
  for (const precision of precisions) {
    const row = await benchModel(model, precision);
    console.error(JSON.stringify(row));
    rows.push(row);
  }
  const machine = nominal ?? measured;
  const lines = [
    `Device ${DEVICE}${QUICK ? ' (--quick)' : ''}: ${model.name}, KV arena on the device.`,
    table(rows, { ort: machine, js: 0 }),
    '',
    `Device read bandwidth: measured ${measured.toFixed(1)} GB/s (ReduceSum over 1 GiB on the device)` +
      (nominal ? `, nominal ${nominal} GB/s (--device-gbps; "bw eff" uses it)` : ' ("bw eff" uses it)') +
      '. RSS columns are not measured on a device. host↔device B/step: bytes fed from and returned to host memory by',
    'one batch-1 decode step (StageRuntime.stats).',
    `Total bench time ${((Date.now() - started) / 1000).toFixed(0)} s.`,
  ];
  console.log(lines.join('\n'));
}

function writeSection(text: string): void {
  writeBenchSection(
    'Stage',
    [
      'Command: `npm run bench:stage` (builds, then `node dist/bench/stage.js [--dir DIR] [--runs N]`). Generates the',
      '`small` preset and a 3-layer checkpoint with the real Emu3 layer shapes (bench runs its layer 1 as a middle stage),',
      'builds each stage graph, then times decode steps (median of N runs; batch b = b sequences, one new token each, at',
      'context c), prefill of a 128-token prompt (one run, median of N) and of a 2048-token prompt (runs of 512, median',
      'of 3); int4 with its int8 prefill path (the default) and without it. RSS columns: peak RSS growth of a fresh process while',
      'building (cold cache) / loading (warm cache) the stage, divided by the weight file size. "bw eff" above 1 means',
      'the Gemm read weights faster than the ReduceSum probe did (the probe does not saturate the memory bus): read the',
      "GB/s column against the machine's memory read bandwidth (~20–24 GB/s measured here with 2 threads).",
      '',
      text,
    ].join('\n'),
  );
}

await main();
