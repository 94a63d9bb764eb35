// Which execution provider ORT places each node of the webgpu graphs on (its verbose session log), per graph: the
// whole-model stage (with lm_head and the sampling head), a first stage of half the layers, and the device KV
// arena's init and copy graphs, for each precision. Each session opens in a child process, whose stderr carries
// ORT's log.
// Usage: node dist/bench/webgpu-placement.js [--model DIR] [--precisions fp32,fp16,int4] [--cache-dir DIR]
//   (default model: emu3-tiny, generated in a temporary directory)
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ort from 'onnxruntime-node';
import { Checkpoint } from '../lib/model/checkpoint.js';
import { writeTinyEmu3 } from '../lib/model/tiny.js';
import { ensureStageGraph } from '../lib/onnx/graph-cache.js';
import { PRECISIONS, type Precision } from '../lib/onnx/stage-graph.js';

const args = process.argv.slice(2);
const flag = (name: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};

interface Placed {
  count: number;
  /** Listed only when the graph's nodes are split between providers. */
  nodes: string[];
}

/** The nodes per provider, from ORT's verbose "Node(s) | All nodes placed on [EP]. Number of nodes: N" lines. */
export function parsePlacement(log: string): Map<string, Placed> {
  const placed = new Map<string, Placed>();
  let current: string[] | null = null;
  for (const line of log.split('\n')) {
    const head = /(?:Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)/.exec(line);
    if (head) {
      current = [];
      placed.set(head[1], { count: Number(head[2]), nodes: current });
      continue;
    }
    const node = /VerifyEachNodeIsAssignedToAnEp\] {3}(\S+ \(.*\))\s*$/.exec(line);
    if (node && current) current.push(node[1]);
    else if (!/VerifyEachNodeIsAssignedToAnEp/.test(line)) current = null;
  }
  return placed;
}

async function openVerbose(path: string): Promise<void> {
  process.env.XDG_RUNTIME_DIR ??= tmpdir();
  await ort.InferenceSession.create(path, {
    executionProviders: ['webgpu'],
    logSeverityLevel: 0,
    logVerbosityLevel: 0,
  });
}

function placement(path: string): Map<string, Placed> {
  const run = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--open', path], {
    encoding: 'utf8',
    maxBuffer: 256 * 2 ** 20,
  });
  if (run.status !== 0) throw new Error(`opening ${path} failed (exit ${run.status}): ${run.stderr.slice(-2000)}`);
  const placed = parsePlacement(`${run.stdout}\n${run.stderr}`);
  if (placed.size === 0) throw new Error(`no placement block in ORT's verbose log of ${path}`);
  return placed;
}

async function main(): Promise<void> {
  if (args[0] === '--open') {
    await openVerbose(args[1]);
    return;
  }
  let modelDir = flag('model');
  const root = mkdtempSync(join(tmpdir(), 'emu3-placement-'));
  if (!modelDir) {
    modelDir = join(root, 'tiny');
    if (!existsSync(join(modelDir, 'config.json')))
      writeTinyEmu3(modelDir, { seed: 1, preset: 'tiny', dtype: 'f32', shards: 1 });
  }
  const cacheDir = flag('cache-dir') ?? join(root, 'cache');
  const precisions = (flag('precisions') ?? 'fp32,fp16,int4').split(',') as Precision[];
  for (const p of precisions) if (!PRECISIONS.includes(p)) throw new Error(`--precisions: unknown precision ${p}`);
  const ckpt = Checkpoint.open(modelDir);
  const L = ckpt.config.numHiddenLayers;
  const graphs: { name: string; path: string }[] = [];
  try {
    for (const precision of precisions) {
      for (const [first, end] of [
        [0, L],
        [0, Math.max(1, L >> 1)],
      ]) {
        const spec = { first, end, precision, device: 'webgpu' as const, kvOnDevice: true };
        const cached = ensureStageGraph(ckpt, spec, { cacheDir });
        graphs.push({ name: `stage [${first}, ${end}) ${precision}`, path: cached.onnxPath });
        if (first === 0 && end === L && cached.kvGraphs) {
          graphs.push({ name: `kv-init ${precision}`, path: cached.kvGraphs.init });
          graphs.push({ name: `kv-copy ${precision}`, path: cached.kvGraphs.copy });
        }
      }
    }
  } finally {
    ckpt.close();
  }
  for (const g of graphs) {
    const placed = placement(g.path);
    const counts = [...placed].map(([ep, p]) => `${ep} ${p.count}`).join(', ');
    console.log(`${g.name}: ${counts}`);
    for (const [ep, p] of placed)
      if (ep !== 'WebGpuExecutionProvider') console.log(`  on ${ep}: ${p.nodes.join(', ')}`);
  }
}

await main();
