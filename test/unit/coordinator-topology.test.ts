import assert from 'node:assert/strict';
import { test } from 'node:test';
import { splitLayers } from '../../cli/system.js';
import type { ShardInfo } from '../../lib/rpc/shard-wire.js';
import { checkTopology, TopologyError } from '../../services/coordinator/topology.js';

function info(begin: number, end: number, over: Partial<ShardInfo> = {}): ShardInfo {
  return {
    layer_begin: begin,
    layer_end: end,
    num_layers: 8,
    is_first: begin === 0,
    is_last: end === 8,
    precision: 'fp32',
    model_fingerprint: 'f00d',
    hidden_size: 64,
    vocab_size: 184622,
    hidden_dtype: 'DTYPE_FLOAT32',
    kv_slots: 16,
    kv_slot_tokens: 2048,
    kv_capacity_tokens: 8192,
    kv_tokens_in_use: 0,
    kv_slots_in_use: 0,
    kv_bytes_per_token: 512,
    visual_token_begin: 151854,
    visual_token_end: 184622,
    max_top_k: 2048,
    lease_ms: 10_000,
    epoch: 0,
    device: 'cpu',
    adapter: '',
    ...over,
  };
}

const stages = (...infos: ShardInfo[]) => infos.map((i, n) => ({ address: `h:${n}`, info: i }));

test('shards covering [0, L) once, in order, with one fingerprint: the smallest KV wins', () => {
  const shape = checkTopology(stages(info(0, 3), info(3, 8, { kv_slots: 8, kv_capacity_tokens: 4096 })), 8);
  assert.equal(shape.numLayers, 8);
  assert.equal(shape.kvSlots, 8);
  assert.equal(shape.kvCapacityTokens, 4096);
});

test('a gap, an overlap, a short pipeline, a mixed checkpoint or a wrong model are named', () => {
  const fails = (s: ReturnType<typeof stages>, re: RegExp, layers?: number) =>
    assert.throws(
      () => checkTopology(s, layers),
      (e: Error) => e instanceof TopologyError && re.test(e.message),
    );
  fails(stages(info(0, 3), info(4, 8)), /gap: no shard serves layers \[3, 4\) \(shard h:1/);
  fails(
    stages(info(0, 5), info(3, 8)),
    /overlap: shard h:1 serves layers \[3, 5\)|overlap: shard h:1 serves layers \[3, 8\)/,
  );
  fails(stages(info(0, 3), info(3, 6)), /gap: no shard serves layers \[6, 8\).*h:1/);
  fails(stages(info(1, 8)), /gap: no shard serves layers \[0, 1\)/);
  fails(stages(info(0, 3), info(3, 8, { model_fingerprint: 'beef' })), /shard h:1 serves checkpoint beef/);
  fails(stages(info(0, 8)), /num_hidden_layers/, 12);
  fails([], /--shards/);
});

test('layers are split so the slowest stage does the least work; lm_head weighs on the last stage', () => {
  assert.deepEqual(splitLayers(4, 2), [
    [0, 2],
    [2, 4],
  ]);
  assert.deepEqual(splitLayers(5, 3), [
    [0, 2],
    [2, 4],
    [4, 5],
  ]);
  // lm_head worth 2 layers: 12 layers + head = 14 units over 2 stages → 7 + (5 + 2).
  assert.deepEqual(splitLayers(12, 2, { layer: 10, head: 20 }), [
    [0, 7],
    [7, 12],
  ]);
  // A head heavier than all the layers: the last stage keeps one layer.
  assert.deepEqual(splitLayers(12, 2, { layer: 1, head: 100 }), [
    [0, 11],
    [11, 12],
  ]);
  assert.deepEqual(splitLayers(3, 1, { layer: 1, head: 5 }), [[0, 3]]);
  assert.throws(() => splitLayers(2, 3), /--shards 3 must be in \[1, 2\]/);
  // Emu3-8B (hidden 4096, 32 layers, vocab 184,622): lm_head ≈ 3.5 layers, so the last of 4 stages gets fewer.
  const real = { layer: 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336, head: 184622 * 4096 };
  const cuts = splitLayers(32, 4, real);
  assert.equal(cuts[3][1], 32);
  assert.ok(cuts[3][1] - cuts[3][0] < 8);
});
