// Where prefill time goes: ORT's per-node profile of one stage graph (the `small` preset, whole model) running a
// prefill chunk, grouped into the projections (linear layers), attention, and the rest, and by op type.
// Usage: node dist/bench/prefill-profile.js [--dir DIR] [--precision fp32|int4] [--chunk 512] [--past 0] [--runs 5]
//        [--no-write]
// --past N prefills N positions first, so that the profiled chunk attends over N cached positions as well.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import ort from 'onnxruntime-node';
import { Checkpoint } from '../lib/model/checkpoint.js';
import { writeTinyEmu3 } from '../lib/model/tiny.js';
import { ensureStageGraph } from '../lib/onnx/graph-cache.js';
import { PRECISIONS, type Precision } from '../lib/onnx/stage-graph.js';
import { StageExecutor } from '../lib/runtime/stage-executor.js';
import { Rng } from '../lib/util/rng.js';
import { median, writeBenchSection } from './report.js';

const args = process.argv.slice(2);
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
const benchDir = flag('dir') ?? join(tmpdir(), 'emu3-bench-stage');
const precision = (flag('precision') ?? 'int4') as Precision;
if (!PRECISIONS.includes(precision)) throw new Error(`--precision must be one of ${PRECISIONS.join('|')}`);
const CHUNK = Number(flag('chunk') ?? 512);
const PAST = Number(flag('past') ?? 0);
const RUNS = Number(flag('runs') ?? 5);

interface ProfileEvent {
  cat: string;
  name: string;
  dur: number;
  args?: { op_name?: string };
}

/**
 * A linear layer's nodes by name (stage-graph.ts linear, linearPair, linearInt8): the product and, on the int8 path,
 * its row scaling (abs, row max, divide, scale back) and the gate/up split.
 */
const LINEAR_NODE = /(^|\.)(attn\.(qkv|o)|mlp\.(gate|up|gate_up|down)|lm_head)(\.|$)/;

function category(node: string): string {
  if (node.includes('.attn.decode.') || node.includes('.attn.chunk.')) return 'attention (scores, softmax, ·V)';
  if (LINEAR_NODE.test(node)) return 'linear layers (qkv, o, gate/up, down, lm_head)';
  return 'the rest (norms, rotary, embedding, activations, gathers)';
}

async function main(): Promise<void> {
  const dir = join(benchDir, 'small');
  if (!existsSync(join(dir, 'config.json')))
    writeTinyEmu3(dir, { seed: 1, preset: 'small', dtype: 'f32', shards: 2 }, console.error);
  const ckpt = Checkpoint.open(dir);
  const layers = ckpt.config.numHiddenLayers;
  const cacheDir = join(benchDir, `cache-0-${layers}-${precision}`);
  const cached = ensureStageGraph(ckpt, { first: 0, end: layers, precision }, { cacheDir, log: console.error });
  ckpt.close();
  const profileDir = join(benchDir, 'profile');
  rmSync(profileDir, { recursive: true, force: true });
  mkdirSync(profileDir, { recursive: true });
  const session = await ort.InferenceSession.create(cached.onnxPath, {
    intraOpNumThreads: availableParallelism(),
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
    enableProfiling: true,
    profileFilePrefix: join(profileDir, 'stage'),
  });
  const executor = new StageExecutor(session, cached.shape, 1, PAST + CHUNK + 8);
  const rng = new Rng(3);
  const tokens = (n: number) => ({ tokens: Int32Array.from({ length: n }, () => rng.nextU32() % 151643) });
  for (let start = 0; start < PAST; start += 512) {
    const length = Math.min(512, PAST - start);
    await executor.forward([{ slot: 0, start, length }], tokens(length));
  }
  const wall: number[] = [];
  for (let i = 0; i < RUNS + 1; i++) {
    const t0 = performance.now();
    await executor.forward([{ slot: 0, start: PAST, length: CHUNK }], tokens(CHUNK));
    wall.push(performance.now() - t0);
  }
  session.endProfiling();
  await session.release();
  const file = readdirSync(profileDir).find((f) => f.endsWith('.json'));
  if (!file) throw new Error(`ORT wrote no profile into ${profileDir}`);
  const events = JSON.parse(readFileSync(join(profileDir, file), 'utf8')) as ProfileEvent[];
  // The last RUNS runs of the chunk (the first is a warm-up, and the past prefill runs come before it).
  const runs = events.filter((e) => e.cat === 'Session' && e.name === 'model_run');
  const last = runs[runs.length - 1];
  const byCategory = new Map<string, number>();
  const byOp = new Map<string, number>();
  let total = 0;
  // Node events of a run precede its model_run event, so take node events after the last excluded run.
  const excluded = runs[runs.length - RUNS - 1];
  const startAt = excluded ? events.indexOf(excluded) + 1 : 0;
  for (const e of events.slice(startAt, events.indexOf(last) + 1)) {
    if (e.cat !== 'Node' || !e.name.endsWith('_kernel_time')) continue;
    const node = e.name.slice(0, -'_kernel_time'.length);
    const op = e.args?.op_name ?? '?';
    if (op === 'If') continue; // its time is that of the branch's nodes, which are profiled themselves
    const us = e.dur / RUNS;
    total += us;
    const part = category(node);
    byCategory.set(part, (byCategory.get(part) ?? 0) + us);
    byOp.set(op, (byOp.get(op) ?? 0) + us);
  }
  const runMs = median(wall.slice(1));
  const lines = [
    `Command: \`node dist/bench/prefill-profile.js --precision ${precision} --chunk ${CHUNK} --past ${PAST} --runs ${RUNS}\`.`,
    `ORT's node profile (\`enableProfiling\`) of the whole \`small\` model (${layers} layers + lm_head) as one ${precision}`,
    `stage, running one ${CHUNK}-token prefill chunk after ${PAST} cached positions, ${availableParallelism()} threads; kernel`,
    `time per run averaged over ${RUNS} runs after a warm-up. Wall time of a run (median, profiling on):`,
    `${runMs.toFixed(1)} ms = ${(CHUNK / (runMs / 1000)).toFixed(0)} tok/s; kernel time summed over nodes: ${(total / 1000).toFixed(1)} ms.`,
    '',
    '| part | ms per run | share |',
    '|---|---|---|',
    ...[...byCategory]
      .sort((a, b) => b[1] - a[1])
      .map(([k, us]) => `| ${k} | ${(us / 1000).toFixed(1)} | ${((100 * us) / total).toFixed(0)}% |`),
    '',
    '| op type | ms per run | share |',
    '|---|---|---|',
    ...[...byOp]
      .sort((a, b) => b[1] - a[1])
      .filter(([, us]) => us / total >= 0.005)
      .map(([k, us]) => `| ${k} | ${(us / 1000).toFixed(2)} | ${((100 * us) / total).toFixed(1)}% |`),
  ];
  const text = lines.join('\n');
  console.log(text);
  if (!args.includes('--no-write'))
    writeBenchSection(`Prefill profile (${precision}, chunk ${CHUNK}, past ${PAST})`, text);
}

await main();
