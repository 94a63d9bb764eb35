import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../../lib/onnx/graph.js';
import { Rng } from '../../lib/util/rng.js';

test('GraphBuilder writes a model whose large weights live in one external file and ORT runs it by path', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-graph-'));
  try {
    const rng = new Rng(7);
    const [n, k, m] = [3, 64, 40];
    const w = rng.fillNormal(new Float32Array(k * m), 1);
    const bias = rng.fillNormal(new Float32Array(m), 1);
    const g = new GraphBuilder(dir, 'tiny');
    const x = g.input('x', 'float', ['batch', k]);
    const wName = g.weight('layers.0.w', 'float', [k, m], w);
    const bName = g.weight('layers.0.b', 'float', [m], bias);
    const y = g.op('MatMul', [x, wName], 'layers.0.matmul');
    const z = g.op('Add', [y, bName], 'layers.0.add');
    const s = g.op('Softmax', [z], 'probs', { axis: -1 });
    const top = g.node('TopK', [s, g.constInt64('k', [2])], ['top_values', 'top_ids'], { axis: -1 });
    g.output(s, 'float', ['batch', m]);
    g.output(top[1], 'int64', ['batch', 2]);
    const path = g.save();

    // The 64×40 weight went to the external file (4096-aligned), the 40-float bias was inlined.
    assert.equal(statSync(join(dir, 'tiny.weights')).size, k * m * 4);
    assert.ok(!existsSync(join(dir, 'tiny.weights.tmp')));

    const xs = rng.fillNormal(new Float32Array(n * k), 1);
    const session = await ort.InferenceSession.create(path);
    const out = await session.run({ x: new ort.Tensor('float32', xs, [n, k]) });
    const probs = out.probs.data as Float32Array;
    const ids = out.top_ids.data as BigInt64Array;
    for (let r = 0; r < n; r++) {
      const logits: number[] = [];
      for (let j = 0; j < m; j++) {
        let acc = bias[j];
        for (let i = 0; i < k; i++) acc += xs[r * k + i] * w[i * m + j];
        logits.push(acc);
      }
      const max = Math.max(...logits);
      const sum = logits.reduce((a, l) => a + Math.exp(l - max), 0);
      logits.forEach((l, j) => assert.ok(Math.abs(probs[r * m + j] - Math.exp(l - max) / sum) < 1e-5));
      const order = logits.map((l, j) => [l, j]).sort((a, b) => b[0] - a[0]);
      assert.deepEqual([Number(ids[r * 2]), Number(ids[r * 2 + 1])], [order[0][1], order[1][1]]);
    }
    await session.release();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('unique names: a repeated tensor name gets a suffix, so nodes never collide', () => {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-graph-'));
  try {
    const g = new GraphBuilder(dir, 'names');
    assert.equal(g.uniq('a'), 'a');
    assert.equal(g.uniq('a'), 'a_1');
    assert.equal(g.uniq('a'), 'a_2');
    g.save();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
