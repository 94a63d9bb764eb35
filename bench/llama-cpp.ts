// llama.cpp on our weights, for side-by-side reading with bench/stage.ts: the `small` preset (the same generated
// checkpoint the stage bench uses) converted to GGUF (bench/gguf.ts) as F32 and as Q4_0, then prefill tokens/s (one
// evaluation of a whole 128- or 2048-token prompt in a fresh context) and batch-1 decode tokens/s at context 128 and
// 2048, through node-llama-cpp's prebuilt CPU binary. Token ids are fed directly (random, fixed seed); every timed
// evaluation ends with logits for its last token and a greedy pick, as a served request would.
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
import { Rng } from '../lib/util/rng.js';
import { Emu3Reference } from '../test/reference/emu3-f64.js';
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

interface Row {
  precision: GgufPrecision;
  fileMiB: number;
  /** tokens/s: median and fastest run (other processes on this shared machine only ever add time). */
  prefill: Record<number, Rate>;
  decode: Record<number, Rate>;
  /** llama.cpp's log lines on where the weights went (buffer types, repacking), from loading this model. */
  buffers: string[];
}

async function benchPrecision(llama: Llama, dir: string, precision: GgufPrecision, vocab: number): Promise<Row> {
  const path = ensureGguf(dir, precision);
  const logStart = logs.length;
  const model = await llama.loadModel({ modelPath: path, gpuLayers: 0 });
  const buffers = summariseLoadLog(logs.slice(logStart));
  for (const line of buffers) console.error(`  llama.cpp (${precision}): ${line}`);
  const rng = new Rng(9);
  const ids = (n: number) => Array.from({ length: n }, () => rng.nextU32() % vocab);
  const prefill: Record<number, Rate> = {};
  const decode: Record<number, Rate> = {};
  for (const n of CTX) {
    // A fresh context per run; one warm-up run first (it also pages the mapped weights in).
    const rates: number[] = [];
    for (let i = 0; i < RUNS + 1; i++) {
      const ctx = await newContext(model, n, n);
      const prompt = ids(n);
      const t0 = performance.now();
      await evaluate(ctx.getSequence(), prompt);
      if (i > 0) rates.push(n / ((performance.now() - t0) / 1000));
      await ctx.dispose();
    }
    prefill[n] = { median: median(rates), best: Math.max(...rates) };
    console.error(`${precision} prefill ${n}: ${fmtRate(prefill[n], 1)} tok/s`);
  }
  for (const n of CTX) {
    // Fill the context to n, then time single-token steps at positions n, n+1, … (two warm-up steps first).
    const ctx = await newContext(model, n + RUNS + 8, n);
    const seq = ctx.getSequence();
    await evaluate(seq, ids(n));
    const times: number[] = [];
    for (let i = 0; i < RUNS + 2; i++) {
      const [token] = ids(1);
      const t0 = performance.now();
      await evaluate(seq, [token]);
      if (i >= 2) times.push((performance.now() - t0) / 1000);
    }
    await ctx.dispose();
    decode[n] = { median: 1 / median(times), best: 1 / Math.min(...times) };
    console.error(`${precision} decode ctx ${n}: ${fmtRate(decode[n], 2)} tok/s`);
  }
  await model.dispose();
  return { precision, fileMiB: statSync(path).size / 2 ** 20, prefill, decode, buffers };
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
  const rows: Row[] = [];
  for (const precision of ['f32', 'q4_0'] as GgufPrecision[])
    rows.push(await benchPrecision(llama, dir, precision, vocab));
  await llama.dispose();
  const flash = [
    ...new Set(logs.filter((l) => /Flash Attention|flash_attn\s*=/.test(l)).map((l) => l.replace(/^\[\w+\] /, ''))),
  ];

  const table = [
    '| weights | GGUF MiB | prefill tok/s (128) | prefill tok/s (2048) | decode tok/s b1 ctx128 | decode tok/s b1 ctx2048 |',
    '|---|---|---|---|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.precision === 'f32' ? 'F32' : 'Q4_0'} | ${r.fileMiB.toFixed(0)} | ${fmtRate(r.prefill[128], 1)} | ` +
        `${fmtRate(r.prefill[2048], 1)} | ${fmtRate(r.decode[128], 2)} | ${fmtRate(r.decode[2048], 2)} |`,
    ),
  ];
  console.log(table.join('\n'));
  const command = `npm run bench:llama-cpp -- --runs ${RUNS} --threads ${THREADS}`;
  const body = [
    `Command: \`${command}\` (builds, then \`node dist/bench/llama-cpp.js [--dir DIR] [--llama-dir DIR] [--runs N]`,
    '[--threads N]`; needs node-llama-cpp installed outside the project, see README.md "Benchmarks"). The `small` preset',
    "(the stage bench's checkpoint) converted by bench/gguf.ts to a llama-architecture GGUF: F32, or Q4_0 for every",
    'Linear weight including lm_head (token embedding and norms F32, as in our int4 stage). llama.cpp through',
    `node-llama-cpp ${NODE_LLAMA_CPP_VERSION}'s prebuilt CPU binary, ${THREADS} threads, its default flash attention.`,
    `Prefill: one evaluation of the whole prompt (logits for its last token) in a fresh context, median of ${RUNS} runs`,
    `after a warm-up. Decode: batch 1, one token per step at context 128 / 2048, median of ${RUNS} steps after two`,
    'warm-ups. Random token ids, fixed seed. Compare with the `small` rows of the Stage section (same weights;',
    "our prefill there runs in chunks of 512). Each cell: median (fastest run): llama.cpp's threads wait for each other",
    'at every op, so on this shared 2-core machine one descheduled thread stalls the step; the fastest run is the',
    'least disturbed one. lm_head (184,622 rows, not a multiple of 8) is the one Q4_0 weight llama.cpp does not repack.',
    '',
    ...table,
    '',
    `CPU: ${cpus()[0]?.model ?? 'unknown'}. llama.cpp ${release} (node-llama-cpp's release tag): ${backend.join('; ')}.`,
    `Attention: ${flash.join('; ') || 'llama.cpp logged nothing about flash attention'}.`,
    `System info: \`${systemInfo}\`.`,
    ...rows.map((r) => `llama.cpp's log on loading the ${r.precision.toUpperCase()} GGUF: ${r.buffers.join('; ')}.`),
    check,
    `Total bench time ${((performance.now() - started) / 1000).toFixed(0)} s; 1-minute load average at the end:`,
    `${loadavg()[0].toFixed(1)} (this machine has 2 cores, shared).`,
  ].join('\n');
  if (!args.includes('--no-write')) writeBenchSection('llama.cpp', body);
}

await main();
