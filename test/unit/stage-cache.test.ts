// The graph cache (built once, reused by key, never half-written) and the KV arena's slot placement.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { Checkpoint } from '../../lib/model/checkpoint.js';
import { writeTinyEmu3 } from '../../lib/model/tiny.js';
import { ensureStageGraph, resolveCacheDir, stageCacheKey } from '../../lib/onnx/graph-cache.js';
import { KvArena } from '../../lib/runtime/kv-arena.js';

const root = mkdtempSync(join(tmpdir(), 'emu3-cache-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

test('a stage graph is built once, then reused from the cache and the reuse is logged', () => {
  const dir = join(root, 'tiny');
  writeTinyEmu3(dir, { seed: 3, preset: 'tiny', dtype: 'f32', shards: 1 });
  const ckpt = Checkpoint.open(dir);
  try {
    const cacheDir = join(root, 'cache');
    const logs: string[] = [];
    const spec = { first: 1, end: 3, precision: 'fp32' as const };
    const built = ensureStageGraph(ckpt, spec, { cacheDir, log: (m) => logs.push(m) });
    assert.equal(built.reused, false);
    assert.ok(existsSync(built.onnxPath) && existsSync(join(built.dir, 'stage.weights')));
    assert.deepEqual(built.shape.layers, [1, 2]);
    const again = ensureStageGraph(ckpt, spec, { cacheDir, log: (m) => logs.push(m) });
    assert.equal(again.reused, true);
    assert.equal(again.onnxPath, built.onnxPath);
    assert.match(logs[logs.length - 1], /reusing cached/);
    // Different range or precision: a different entry. No temporary directory is left behind.
    assert.notEqual(
      stageCacheKey(ckpt.fingerprint(), spec),
      stageCacheKey(ckpt.fingerprint(), { ...spec, precision: 'int4' }),
    );
    assert.deepEqual(
      readdirSync(cacheDir).filter((f) => f.startsWith('.tmp')),
      [],
    );
    assert.throws(
      () => ensureStageGraph(ckpt, { first: 2, end: 5, precision: 'fp32' }, { cacheDir }),
      /layer range \[2, 5\) must satisfy 0 ≤ first < end ≤ 4 \(num_hidden_layers\)/,
    );
    assert.deepEqual(
      readdirSync(cacheDir).filter((f) => f.startsWith('.tmp')),
      [],
    );
  } finally {
    ckpt.close();
  }
});

test('the cache directory: explicit, then $EMU3_CACHE_DIR, then beside the model', () => {
  assert.equal(resolveCacheDir('/m', '/explicit'), '/explicit');
  const saved = process.env.EMU3_CACHE_DIR;
  try {
    process.env.EMU3_CACHE_DIR = '/from-env';
    assert.equal(resolveCacheDir('/m'), '/from-env');
    delete process.env.EMU3_CACHE_DIR;
    assert.equal(resolveCacheDir(root), join(root, '.emu3-cache'));
  } finally {
    if (saved === undefined) delete process.env.EMU3_CACHE_DIR;
    else process.env.EMU3_CACHE_DIR = saved;
  }
});

test('the KV arena makes a batch of slots contiguous, moving only filled prefixes, and keeps each sequence intact', () => {
  const shape = { layers: 2, rows: 6, kvHeads: 2, maxLen: 8, headDim: 4 };
  const arena = new KvArena(shape);
  // Slot s holds 3 tokens whose K values are 100·s + position (every element of the head vector).
  const stamp = (slot: number) => {
    const kv = new Float32Array(3 * shape.kvHeads * shape.headDim);
    for (let t = 0; t < 3; t++)
      for (let j = 0; j < shape.kvHeads * shape.headDim; j++)
        kv[t * shape.kvHeads * shape.headDim + j] = 100 * slot + t;
    for (let l = 0; l < shape.layers; l++) arena.write(l, slot, 0, 3, kv, kv, 0);
    arena.filled[slot] = 3;
  };
  for (let s = 0; s < 6; s++) stamp(s);
  const first = arena.gather([0, 2, 5]);
  const rows = [0, 2, 5].map((s) => arena.row(s)).sort();
  assert.deepEqual(rows, [first, first + 1, first + 2]);
  assert.ok(arena.movedTokens > 0 && arena.movedTokens <= 2 * 3 * 2, `moved ${arena.movedTokens} tokens`);
  for (let s = 0; s < 6; s++) {
    for (let l = 0; l < shape.layers; l++) {
      const v = arena.view(l, arena.row(s), 1).key;
      for (let h = 0; h < shape.kvHeads; h++)
        for (let t = 0; t < 3; t++) assert.equal(v[h * shape.maxLen * shape.headDim + t * shape.headDim], 100 * s + t);
    }
  }
  // Already contiguous: nothing moves.
  const moved = arena.movedTokens;
  arena.gather([0, 2, 5]);
  assert.equal(arena.movedTokens, moved);
});

test('the KV arena arranges groups of slots side by side, each contiguous, choosing the order that moves less', () => {
  const shape = { layers: 1, rows: 8, kvHeads: 2, maxLen: 8, headDim: 2 };
  const arena = new KvArena(shape);
  // Slot s holds s + 1 tokens whose K values are 100·s + position.
  for (let s = 0; s < 8; s++) {
    const n = s + 1;
    const kv = new Float32Array(n * shape.kvHeads * shape.headDim);
    for (let t = 0; t < n; t++) kv.fill(100 * s + t, t * shape.kvHeads * shape.headDim, (t + 1) * 4);
    arena.write(0, s, 0, n, kv, kv, 0);
    arena.filled[s] = n;
  }
  const intact = () => {
    for (let s = 0; s < 8; s++) {
      const v = arena.view(0, arena.row(s), 1).key;
      for (let h = 0; h < shape.kvHeads; h++)
        for (let t = 0; t <= s; t++)
          assert.equal(v[h * shape.maxLen * shape.headDim + t * shape.headDim], 100 * s + t, `slot ${s} t ${t}`);
    }
  };
  const groups = [
    [6, 1, 3],
    [2, 7],
  ];
  const [a, b] = arena.arrange(groups);
  const rows = (g: number[]) => g.map((s) => arena.row(s)).sort((x, y) => x - y);
  assert.deepEqual(rows(groups[0]), [a, a + 1, a + 2]);
  assert.deepEqual(rows(groups[1]), [b, b + 1]);
  assert.ok(b === a + 3 || a === b + 2, `groups side by side: ${a}, ${b}`);
  intact();
  // A layout that fits in the other order moves nothing; nor does a group that is empty.
  const moved = arena.movedTokens;
  assert.deepEqual(arena.arrange([groups[1], groups[0]]), [b, a]);
  const [c, d] = arena.arrange([[], groups[0]]);
  assert.equal(d, a);
  assert.ok(c === a || c === a + 3);
  assert.equal(arena.movedTokens, moved);
  // Slots in the window interleaved between groups: each group still ends up contiguous, data intact.
  const [e, f] = arena.arrange([
    [0, 2, 4],
    [1, 3, 5],
  ]);
  assert.deepEqual(rows([0, 2, 4]), [e, e + 1, e + 2]);
  assert.deepEqual(rows([1, 3, 5]), [f, f + 1, f + 2]);
  intact();
});
