// The stage graph on ONNX Runtime's WebGPU execution provider (docs/gpu.md), against the float64 reference and the
// CPU graph, on emu3-tiny. Machines without a GPU run it on Mesa's software Vulkan device (lavapipe), which .ci/run
// installs; a machine with neither fails here with the error naming what to install (it is not skipped).
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import type { Device } from '../../lib/onnx/stage-graph.js';
import { type ForwardItem, StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { Rng } from '../../lib/util/rng.js';
import { argmax, Emu3Reference } from '../reference/emu3-f64.js';

const root = mkdtempSync(join(tmpdir(), 'emu3-webgpu-test-'));
const dir = join(root, 'tiny');
const cacheDir = join(root, 'cache');
let ref: Emu3Reference;

before(() => {
  writeTinyEmu3(dir, { seed: 7, preset: 'tiny', dtype: 'f32', shards: 1 });
  ref = Emu3Reference.load(dir);
});
after(() => rmSync(root, { recursive: true, force: true }));

function prompt(seed: number, length: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length }, () => rng.nextU32() % ref.config.vocabSize);
}

async function open(device: Device, cuts: number[]): Promise<StageRuntime[]> {
  const stages: StageRuntime[] = [];
  for (let i = 0; i + 1 < cuts.length; i++)
    stages.push(
      await StageRuntime.open({
        modelDir: dir,
        layers: [cuts[i], cuts[i + 1]],
        precision: 'fp32',
        device,
        maxSequences: 4,
        maxSequenceLength: 64,
        cacheDir,
        threads: 1,
      }),
    );
  return stages;
}

async function logits(stages: StageRuntime[], items: ForwardItem[], tokens: number[]): Promise<Float32Array> {
  let out = await stages[0].forward(items, { tokens: Int32Array.from(tokens) });
  for (const s of stages.slice(1)) {
    assert.ok('hidden' in out);
    out = await s.forward(items, { hidden: out.hidden });
  }
  assert.ok('logits' in out);
  return out.logits;
}

async function greedy(
  stages: StageRuntime[],
  ids: number[],
  steps: number,
): Promise<{ tokens: number[]; first: Float32Array }> {
  const first = await logits(stages, [{ slot: 0, start: 0, length: ids.length }], ids);
  const tokens = [argmax(first)];
  while (tokens.length < steps)
    tokens.push(
      argmax(await logits(stages, [{ slot: 0, start: ids.length + tokens.length - 1, length: 1 }], [tokens.at(-1)!])),
    );
  return { tokens, first };
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test(
  'webgpu, one stage: logits within 1e-3 of the float64 reference, greedy tokens identical',
  { timeout: 300_000 },
  async () => {
    const stages = await open('webgpu', [0, 4]);
    try {
      const ids = prompt(1, 12);
      const { tokens, first } = await greedy(stages, ids, 6);
      const diff = maxAbsDiff(first, ref.logits(ids));
      assert.ok(diff < 1e-3, `max |logit − reference| = ${diff}`);
      assert.deepEqual(tokens, ref.greedy(ids, 6));
    } finally {
      for (const s of stages) await s.close();
    }
  },
);

test(
  'webgpu, two stages: the same greedy tokens as one CPU stage; a mixed batch equals the CPU graph',
  { timeout: 300_000 },
  async () => {
    const gpu = await open('webgpu', [0, 2, 4]);
    const cpu = await open('cpu', [0, 4]);
    try {
      const ids = prompt(2, 10);
      const want = await greedy(cpu, ids, 5);
      const got = await greedy(gpu, ids, 5);
      assert.deepEqual(got.tokens, want.tokens);
      assert.ok(maxAbsDiff(got.first, want.first) < 1e-3);
      // A decode row of slot 0 beside a fresh 4-token chunk in slot 1: one run of each graph.
      const history = [...ids, ...want.tokens];
      const items = [
        { slot: 0, start: history.length - 1, length: 1 },
        { slot: 1, start: 0, length: 4 },
      ];
      const tokens = [history.at(-1)!, ...prompt(3, 4)];
      const diff = maxAbsDiff(await logits(gpu, items, tokens), await logits(cpu, items, tokens));
      assert.ok(diff < 1e-3, `mixed batch: max |webgpu − cpu| = ${diff}`);
    } finally {
      for (const s of [...gpu, ...cpu]) await s.close();
    }
  },
);
