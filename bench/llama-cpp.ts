// llama.cpp and our stage on the same weights, side by side in one run: the `small` preset (the same generated
// checkpoint the stage bench uses) converted to GGUF (bench/gguf.ts) as F32 and as Q4_0, through node-llama-cpp's
// prebuilt CPU binary, against our stage (all 12 layers as one StageRuntime) in fp32 and int4 (with and without its
// int8 prefill path). Figures: prefill tokens/s (a whole 128- or 2048-token prompt in a fresh context / slot; ours in
// runs of 512, llama.cpp's default micro-batch) and batch-1 decode tokens/s at context 128 and 2048. The engines take
// turns run by run, so that load on this shared machine falls on all of them alike; the table gives ours ÷ theirs.
// Token ids are fed directly (random, fixed seed); every timed evaluation ends with logits for its last token and a
// greedy pick, as a served request would.
// Before timing, a correctness check: on the `tiny` preset, llama.cpp's greedy continuation of the F32 GGUF must equal
// the float64 reference's (test/reference/emu3-f64.ts), so the GGUF is the same function as the checkpoint.
//
// node-llama-cpp is not a dependency of this project (its optional packages include GPU builds of hundreds of MB); it
// is loaded from --llama-dir, installed there once with INSTALL_COMMAND below.
// Usage: node dist/bench/llama-cpp.js [--dir DIR] [--llama-dir DIR] [--runs N] [--threads N] [--no-write]
import { existsSync, statSync } from 'node:fs';
import { cpus, homedir, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { EMU3_VOCAB_SIZE, writeTinyEmu3 } from '../lib/model/tiny.js';
import type { Precision } from '../lib/onnx/stage-graph.js';
import { StageRuntime } from '../lib/runtime/stage-runtime.js';
import { Rng } from '../lib/util/rng.js';
import { argmax, Emu3Reference } from '../test/reference/emu3-f64.js';
import { convertCheckpointToGguf, type GgufPrecision } from './gguf.js';
import { median, writeBenchSection } from './report.js';

const NODE_LLAMA_CPP_VERSION = '3.21.1';
const DEFAULT_LLAMA_DIR = join(homedir(), '.cache', 'emu3-serve', 'llama-cpp');
const installCommand = (dir: string) =>
  `npm install --prefix ${dir} --omit=optional --ignore-scripts ` +
  `node-llama-cpp@${NODE_LLAMA_CPP_VERSION} @node-llama-cpp/linux-x64@${NODE_LLAMA_CPP_VERSION}`;

const HELP = `Usage: node dist/bench/llama-cpp.js [options]
  --dir DIR        where the generated checkpoints and GGUF files are kept (default ${join(tmpdir(), 'emu3-bench-stage')})
  --llama-dir DIR  where node-llama-cpp is installed (default ${DEFAULT_LLAMA_DIR}); install it with
                   ${installCommand('DIR')}
  --runs N         timed runs per figure, median reported (default 5)
  --threads N      llama.cpp threads (default 2)
  --no-write       do not rewrite the "llama.cpp" section of BENCHMARKS.md`;

const args = process.argv.slice(2);
if (args.includes('--help') || args.includes('-h')) {
  console.log(HELP);
  process.exit(0);
}
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
const positiveInt = (name: string, fallback: number): number => {
  const raw = flag(name);
  const v = raw === undefined ? fallback : Number(raw);
  if (!Number.isInteger(v) || v < 1) {
    console.error(`--${name} must be a positive integer, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return v;
};
const benchDir = flag('dir') ?? join(tmpdir(), 'emu3-bench-stage');
const llamaDir = flag('llama-dir') ?? DEFAULT_LLAMA_DIR;
const RUNS = positiveInt('runs', 5);
const THREADS = positiveInt('threads', 2);
const CTX = [128, 2048];
/** Timed decode steps per figure: single steps are short, so more of them than prefill runs. */
const DECODE_STEPS = 4 * RUNS;
const VOCAB_CHECK_STEPS = 8;

// The few parts of node-llama-cpp's API this bench uses (it is not installed as a dependency, so no types).
type LogLevel = 'disabled' | 'fatal' | 'error' | 'warn' | 'info' | 'log' | 'debug';
type EvalItem = number | [number, { generateNext: { token: true } }];
interface Sequence {
  controlledEvaluate(input: EvalItem[]): Promise<({ next: { token?: number | null } } | undefined)[]>;
}
interface Context {
  getSequence(): Sequence;
  dispose(): Promise<void>;
}
interface Model {
  createContext(o: {
    contextSize: number;
    batchSize: number;
    sequences: number;
    threads: { ideal: number; min: number };
  }): Promise<Context>;
  dispose(): Promise<void>;
}
interface Llama {
  systemInfo: string;
  buildType: string;
  llamaCppRelease: { repo: string; release: string };
  loadModel(o: { modelPath: string; gpuLayers: number }): Promise<Model>;
  dispose(): Promise<void>;
}
interface NodeLlamaCpp {
  getLlama(o: {
    build: 'never';
    gpu: false;
    usePrebuiltBinaries: true;
    skipDownload: true;
    progressLogs: false;
    maxThreads: number;
    logLevel: LogLevel;
    logger: (level: LogLevel, message: string) => void;
  }): Promise<Llama>;
}

async function loadNodeLlamaCpp(): Promise<NodeLlamaCpp> {
  const entry = join(llamaDir, 'node_modules', 'node-llama-cpp', 'dist', 'index.js');
  const binary = join(llamaDir, 'node_modules', '@node-llama-cpp', 'linux-x64', 'bins', 'linux-x64');
  if (!existsSync(entry) || !existsSync(binary)) {
    console.error(`node-llama-cpp ${NODE_LLAMA_CPP_VERSION} is not installed in ${llamaDir}. Install it with:\n`);
    console.error(`  ${installCommand(llamaDir)}\n`);
    console.error('(or pass --llama-dir DIR where it is installed)');
    process.exit(2);
  }
  return (await import(pathToFileURL(entry).href)) as NodeLlamaCpp;
}

/** Every llama.cpp log line, kept so that the backend and buffer choices can be reported. */
const logs: string[] = [];
const REPORTED_LOG = /REPACK|AMX|model buffer size/i;

function ensureModel(preset: 'tiny' | 'small'): string {
  const dir = join(benchDir, preset);
  if (!existsSync(join(dir, 'config.json')))
    writeTinyEmu3(dir, { seed: 1, preset, dtype: 'f32', shards: preset === 'small' ? 2 : 1 }, console.error);
  return dir;
}

function ensureGguf(dir: string, precision: GgufPrecision): string {
  const out = `${dir}.${precision}.gguf`;
  if (!existsSync(out)) {
    const t0 = performance.now();
    convertCheckpointToGguf(dir, out, precision);
    console.error(`wrote ${out} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  }
  return out;
}

const withNext = (token: number): EvalItem => [token, { generateNext: { token: true } }];

/** Evaluates `tokens` (logits for the last one only) and returns the greedy next token. */
async function evaluate(seq: Sequence, tokens: number[]): Promise<number> {
  const items: EvalItem[] = tokens.map((t, i) => (i === tokens.length - 1 ? withNext(t) : t));
  const out = await seq.controlledEvaluate(items);
  const next = out[tokens.length - 1]?.next.token;
  if (next === undefined || next === null) throw new Error('llama.cpp returned no next token');
  return next;
}

const fmtRate = (r: Rate, digits: number) => `${r.median.toFixed(digits)} (${r.best.toFixed(digits)})`;

/**
 * The load log lines that say where the weights went: buffer sizes by type, tensors that could not be repacked, and
 * the repacked tensors counted by layout (llama.cpp logs one line per tensor).
 */
function summariseLoadLog(lines: string[]): string[] {
  const out: string[] = [];
  const repacked = new Map<string, number>();
  for (const raw of lines) {
    const line = raw.replace(/^\[\w+\] /, '').replace(/\s+/g, ' ');
    const m = /repack tensor \S+ with (\S+)/.exec(line);
    if (m) repacked.set(m[1], (repacked.get(m[1]) ?? 0) + 1);
    else if (REPORTED_LOG.test(line) && !/llama_model_loader: - /.test(line) && !out.includes(line)) out.push(line);
  }
  for (const [layout, n] of repacked) out.push(`repacked ${n} tensors with ${layout}`);
  return out;
}

const newContext = (model: Model, contextSize: number, batchSize: number) =>
  model.createContext({ contextSize, batchSize, sequences: 1, threads: { ideal: THREADS, min: THREADS } });

async function checkAgainstReference(llama: Llama): Promise<string> {
  const dir = ensureModel('tiny');
  const model = await llama.loadModel({ modelPath: ensureGguf(dir, 'f32'), gpuLayers: 0 });
  const ref = Emu3Reference.load(dir);
  const rng = new Rng(3);
  const prompt = Array.from({ length: 8 }, () => rng.nextU32() % ref.config.vocabSize);
  const ctx = await newContext(model, 64, 64);
  const seq = ctx.getSequence();
  const got = [await evaluate(seq, prompt)];
  while (got.length < VOCAB_CHECK_STEPS) got.push(await evaluate(seq, [got[got.length - 1]]));
  await ctx.dispose();
  await model.dispose();
  const want = ref.greedy(prompt, VOCAB_CHECK_STEPS);
  if (got.join() !== want.join()) {
    console.error(`llama.cpp greedy ${got.join(', ')} differs from the float64 reference ${want.join(', ')}`);
    process.exit(1);
  }
  return `llama.cpp's greedy continuation of the F32 GGUF of \`tiny\` equals the float64 reference's (${VOCAB_CHECK_STEPS} tokens).`;
}

interface Rate {
  median: number;
  best: number;
}

/**
 * One engine under test: llama.cpp on a GGUF, or our stage (the whole `small` model as one StageRuntime). Each
 * method times one thing and returns seconds, so that the engines can take turns run by run and see the same load.
 */
interface Engine {
  name: string;
  /** Evaluates an n-token prompt from position 0 in a fresh context / slot; returns its seconds. */
  prefill(tokens: number[]): Promise<number>;
  /** Fills the context / slot with n tokens; later decodeStep calls continue it. */
  fill(tokens: number[]): Promise<void>;
  decodeStep(token: number): Promise<number>;
  close(): Promise<void>;
}

async function llamaEngine(llama: Llama, dir: string, precision: GgufPrecision): Promise<Engine & { row: Row }> {
  const path = ensureGguf(dir, precision);
  const logStart = logs.length;
  const model = await llama.loadModel({ modelPath: path, gpuLayers: 0 });
  const buffers = summariseLoadLog(logs.slice(logStart));
  for (const line of buffers) console.error(`  llama.cpp (${precision}): ${line}`);
  let decodeCtx: Context | undefined;
  let seq: Sequence | undefined;
  const name = `llama.cpp ${precision === 'f32' ? 'F32' : 'Q4_0'}`;
  return {
    name,
    row: { name, fileMiB: statSync(path).size / 2 ** 20, prefill: {}, decode: {}, buffers },
    async prefill(tokens) {
      const ctx = await newContext(model, tokens.length, tokens.length);
      const t0 = performance.now();
      await evaluate(ctx.getSequence(), tokens);
      const s = (performance.now() - t0) / 1000;
      await ctx.dispose();
      return s;
    },
    async fill(tokens) {
      await decodeCtx?.dispose();
      decodeCtx = await newContext(model, tokens.length + DECODE_STEPS + 8, tokens.length);
      seq = decodeCtx.getSequence();
      await evaluate(seq, tokens);
    },
    async decodeStep(token) {
      if (!seq) throw new Error('decodeStep before fill');
      const t0 = performance.now();
      await evaluate(seq, [token]);
      return (performance.now() - t0) / 1000;
    },
    async close() {
      await decodeCtx?.dispose();
      await model.dispose();
    },
  };
}

/** Our stage on the same checkpoint: one StageRuntime with all layers, prefill in runs of 512 (llama.cpp's ubatch). */
async function ourEngine(dir: string, precision: Precision, int8Prefill: boolean): Promise<Engine & { row: Row }> {
  const rt = await StageRuntime.open({
    modelDir: dir,
    layers: [0, 12],
    precision,
    int8Prefill,
    maxSequences: 2,
    maxSequenceLength: Math.max(...CTX) + DECODE_STEPS + 8,
    threads: THREADS,
    cacheDir: join(benchDir, `cache-0-12-${precision}${int8Prefill ? '' : '-no-int8'}`),
    log: console.error,
  });
  const CHUNK = 512;
  const run = async (slot: number, start: number, tokens: number[]) => {
    for (let at = 0; at < tokens.length; at += CHUNK) {
      const part = tokens.slice(at, at + CHUNK);
      const out = await rt.forward([{ slot, start: start + at, length: part.length }], {
        tokens: Int32Array.from(part),
      });
      if (at + CHUNK >= tokens.length) {
        if (!('logits' in out)) throw new Error('not the last stage');
        argmax(out.logits); // the greedy pick, as llama.cpp's evaluation makes one
      }
    }
  };
  let position = 0;
  const name =
    precision === 'fp32' ? 'emu3-serve fp32' : int8Prefill ? 'emu3-serve int4' : 'emu3-serve int4, no int8 path';
  return {
    name,
    row: { name, fileMiB: rt.weightBytes / 2 ** 20, prefill: {}, decode: {}, buffers: [] },
    async prefill(tokens) {
      const t0 = performance.now();
      await run(0, 0, tokens);
      return (performance.now() - t0) / 1000;
    },
    async fill(tokens) {
      await run(1, 0, tokens);
      position = tokens.length;
    },
    async decodeStep(token) {
      const t0 = performance.now();
      await run(1, position++, [token]);
      return (performance.now() - t0) / 1000;
    },
    close: () => rt.close(),
  };
}

interface Row {
  name: string;
  fileMiB: number;
  /** tokens/s: median and fastest run (other processes on this shared machine only ever add time). */
  prefill: Record<number, Rate>;
  decode: Record<number, Rate>;
  /** llama.cpp's log lines on where the weights went (buffer types, repacking), from loading this model. */
  buffers: string[];
}

const rate = (rates: number[]): Rate => ({ median: median(rates), best: Math.max(...rates) });

/**
 * Every figure for every engine, the engines taking turns within each run (A B C, A B C, …) so that load on this
 * shared machine falls on all of them alike; the first turn of each figure is a warm-up.
 */
async function measure(engines: (Engine & { row: Row })[], vocab: number): Promise<void> {
  const rng = new Rng(9);
  const ids = (n: number) => Array.from({ length: n }, () => rng.nextU32() % vocab);
  for (const n of CTX) {
    const rates = engines.map(() => [] as number[]);
    for (let i = 0; i < RUNS + 1; i++) {
      const prompt = ids(n);
      for (const [e, engine] of engines.entries()) {
        const s = await engine.prefill(prompt);
        if (i > 0) rates[e].push(n / s);
      }
    }
    for (const [e, engine] of engines.entries()) {
      engine.row.prefill[n] = rate(rates[e]);
      console.error(`${engine.name} prefill ${n}: ${fmtRate(engine.row.prefill[n], 1)} tok/s`);
    }
  }
  for (const n of CTX) {
    const prompt = ids(n);
    for (const engine of engines) await engine.fill(prompt);
    const times = engines.map(() => [] as number[]);
    for (let i = 0; i < DECODE_STEPS + 2; i++) {
      const [token] = ids(1);
      for (const [e, engine] of engines.entries()) {
        const s = await engine.decodeStep(token);
        if (i >= 2) times[e].push(s);
      }
    }
    for (const [e, engine] of engines.entries()) {
      engine.row.decode[n] = { median: 1 / median(times[e]), best: 1 / Math.min(...times[e]) };
      console.error(`${engine.name} decode ctx ${n}: ${fmtRate(engine.row.decode[n], 2)} tok/s`);
    }
  }
}

async function main(): Promise<void> {
  const { getLlama } = await loadNodeLlamaCpp();
  const started = performance.now();
  const llama = await getLlama({
    // The prebuilt CPU binary only: never build from source, never download, no GPU probing.
    build: 'never',
    gpu: false,
    usePrebuiltBinaries: true,
    skipDownload: true,
    progressLogs: false,
    maxThreads: THREADS,
    logLevel: 'debug',
    logger: (level, message) => logs.push(`[${level}] ${message.trimEnd()}`),
  });
  // "load_backend: loaded CPU backend from …/libggml-cpu-zen4.so": the file name is the CPU variant.
  const backend = logs
    .filter((l) => /load_backend/.test(l))
    .map((l) => l.replace(/^\[\w+\] /, '').replace(/ from \S*\/([^/]+)$/, ' $1'));
  console.error(`llama.cpp ${llama.llamaCppRelease.release} (${llama.buildType}); ${backend.join('; ')}`);
  const systemInfo = llama.systemInfo.trim();
  const release = llama.llamaCppRelease.release;
  console.error(`system info: ${systemInfo}`);
  const check = await checkAgainstReference(llama);
  console.error(check);

  const dir = ensureModel('small');
  const vocab = EMU3_VOCAB_SIZE;
  // llama.cpp Q4_0 and our int4 (with and without its int8 prefill path) take turns; then F32 against our fp32.
  const groups = [
    [await llamaEngine(llama, dir, 'q4_0'), await ourEngine(dir, 'int4', true), await ourEngine(dir, 'int4', false)],
    [await llamaEngine(llama, dir, 'f32'), await ourEngine(dir, 'fp32', true)],
  ];
  const rows: Row[] = [];
  for (const engines of groups) {
    await measure(engines, vocab);
    for (const engine of engines) {
      rows.push(engine.row);
      await engine.close();
    }
  }
  await llama.dispose();
  const flash = [
    ...new Set(logs.filter((l) => /Flash Attention|flash_attn\s*=/.test(l)).map((l) => l.replace(/^\[\w+\] /, ''))),
  ];

  const ratio = (r: Row, of: Row, pick: (x: Row) => Rate) => (pick(r).median / pick(of).median).toFixed(2);
  const figures: [string, (r: Row) => Rate][] = [
    ['prefill tok/s (128)', (r) => r.prefill[128]],
    ['prefill tok/s (2048)', (r) => r.prefill[2048]],
    ['decode tok/s b1 ctx128', (r) => r.decode[128]],
    ['decode tok/s b1 ctx2048', (r) => r.decode[2048]],
  ];
  const table = [
    `| engine | weights MiB | ${figures.map(([h]) => h).join(' | ')} |`,
    `|---|---|${figures.map(() => '---').join('|')}|`,
    ...rows.map(
      (r) =>
        `| ${r.name} | ${r.fileMiB.toFixed(0)} | ${figures.map(([, pick], i) => fmtRate(pick(r), i < 2 ? 1 : 2)).join(' | ')} |`,
    ),
  ];
  // Ours ÷ llama.cpp, medians of the same turns (engines of one group took turns run by run).
  const [q4, int4, int4Plain, f32, fp32] = rows;
  const ratios = [
    `| ratio (medians) | ${figures.map(([h]) => h).join(' | ')} |`,
    `|---|${figures.map(() => '---').join('|')}|`,
    `| emu3-serve int4 ÷ llama.cpp Q4_0 | ${figures.map(([, pick]) => ratio(int4, q4, pick)).join(' | ')} |`,
    `| emu3-serve int4 without the int8 path ÷ llama.cpp Q4_0 | ${figures.map(([, pick]) => ratio(int4Plain, q4, pick)).join(' | ')} |`,
    `| emu3-serve int4 ÷ without the int8 path | ${figures.map(([, pick]) => ratio(int4, int4Plain, pick)).join(' | ')} |`,
    `| emu3-serve fp32 ÷ llama.cpp F32 | ${figures.map(([, pick]) => ratio(fp32, f32, pick)).join(' | ')} |`,
  ];
  table.push('', ...ratios);
  console.log(table.join('\n'));
  const command = `npm run bench:llama-cpp -- --runs ${RUNS} --threads ${THREADS}`;
  const body = [
    `Command: \`${command}\` (builds, then \`node dist/bench/llama-cpp.js [--dir DIR] [--llama-dir DIR] [--runs N]`,
    '[--threads N]`; needs node-llama-cpp installed outside the project, see README.md "Benchmarks"). The `small` preset',
    "(the stage bench's checkpoint) converted by bench/gguf.ts to a llama-architecture GGUF: F32, or Q4_0 for every",
    'Linear weight including lm_head (token embedding and norms F32, as in our int4 stage). llama.cpp through',
    `node-llama-cpp ${NODE_LLAMA_CPP_VERSION}'s prebuilt CPU binary, ${THREADS} threads, its default flash attention; ours: the`,
    `whole model as one stage (StageRuntime, ${THREADS} ORT threads), prefill in runs of 512 (llama.cpp's default micro-batch).`,
    `Prefill: the whole prompt (logits for its last token) in a fresh context / from position 0, median of ${RUNS} runs`,
    `after a warm-up. Decode: batch 1, one token per step at context 128 / 2048, median of ${DECODE_STEPS} steps after two`,
    'warm-ups. Random token ids, fixed seed. Within each group (Q4_0 with our int4s, F32 with our fp32) the engines',
    'take turns run by run, so the ratios compare runs made under the same load. Each cell: median (fastest run).',
    'lm_head (184,622 rows, not a multiple of 8) is the one Q4_0 weight llama.cpp does not repack.',
    '',
    ...table,
    '',
    `CPU: ${cpus()[0]?.model ?? 'unknown'}. llama.cpp ${release} (node-llama-cpp's release tag): ${backend.join('; ')}.`,
    `Attention: ${flash.join('; ') || 'llama.cpp logged nothing about flash attention'}.`,
    `System info: \`${systemInfo}\`.`,
    ...rows
      .filter((r) => r.buffers.length > 0)
      .map((r) => `${r.name}: llama.cpp's log on loading the GGUF: ${r.buffers.join('; ')}.`),
    check,
    `Total bench time ${((performance.now() - started) / 1000).toFixed(0)} s; 1-minute load average at the end:`,
    `${loadavg()[0].toFixed(1)} (this machine has 2 cores, shared).`,
  ].join('\n');
  if (!args.includes('--no-write')) writeBenchSection('llama.cpp', body);
}

await main();
