// Two real shard processes (`emu3 shard`, layers 0-2 → 2-4 of emu3-tiny, chained with --next) driven the way the
// coordinator drives them: one Forward stream to stage 0, results on a ResultSink served by this test process.
// Truth: `emu3 logits --steps` (single-stage greedy), and for candidates and full rows the single-stage logits of
// the same history run through the float64 reference of the last stage's row processing.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { createLogger } from '../../lib/rpc/log.js';
import { protoRoot, serviceDefinition } from '../../lib/rpc/proto.js';
import { type RunningServer, serve } from '../../lib/rpc/serve.js';
import {
  type ForwardResponse,
  type MicroBatch,
  RESULT_SINK_SERVICE,
  type ReceivedForwardRequest,
  type SamplingSide,
  SHARD_PROTO,
  SHARD_SERVICE,
  type StepResult,
  type Tensor,
} from '../../lib/rpc/shard-wire.js';
import { StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { type LastStageParams, processLastStageRow } from '../../services/coordinator/logits.js';
import { type SpawnedService, spawnService } from './spawn-service.js';

const root = dirname(protoRoot());
const work = mkdtempSync(join(tmpdir(), 'emu3-shard-it-'));
const modelDir = join(work, 'tiny');
const SLOTS = 8;
const SLOT_TOKENS = 128;
const STEPS = 6;

type Shard = SpawnedService;

const shards: Shard[] = [];
let sink: RunningServer;
const results = new Map<number, StepResult>();
const waiters = new Map<number, (r: StepResult) => void>();
let stage0: grpc.Client;
let stage1: grpc.Client;
let forward: grpc.ClientDuplexStream<ReceivedForwardRequest, ForwardResponse>;
const acks: ForwardResponse[] = [];
const ackWaiters: ((a: ForwardResponse) => void)[] = [];
let reference: StageRuntime;
let nextBatchId = 1;

function startShard(layers: string, next?: string): Promise<Shard> {
  const args = ['shard', '--model', modelDir, '--layers', layers, '--listen', '127.0.0.1:0'];
  if (next) args.push('--next', next);
  args.push('--max-slots', String(SLOTS), '--slot-tokens', String(SLOT_TOKENS), '--threads', '1');
  return spawnService(args, `shard ${layers}`, 60_000);
}

function resultSink(): grpc.UntypedServiceImplementation {
  return {
    Deliver: (call: grpc.ServerReadableStream<StepResult, unknown>, done: grpc.sendUnaryData<unknown>) => {
      let received = 0;
      call.on('data', (r: StepResult) => {
        received++;
        results.set(r.micro_batch_id, r);
        waiters.get(r.micro_batch_id)?.(r);
      });
      call.on('end', () => done(null, { received }));
      call.on('error', () => {});
    },
  };
}

function stepResult(id: number): Promise<StepResult> {
  const have = results.get(id);
  if (have) return Promise.resolve(have);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no StepResult for micro-batch ${id} in 20 s`)), 20_000);
    waiters.set(id, (r) => {
      clearTimeout(timer);
      resolve(r);
    });
  });
}

function nextAck(): Promise<ForwardResponse> {
  const have = acks.shift();
  if (have) return Promise.resolve(have);
  return new Promise((resolve) => ackWaiters.push(resolve));
}

interface Item {
  seq: number;
  slot: number;
  start: number;
  tokens: number[];
  sample?: SamplingSide;
  copyFrom?: number;
}

/** Sends one micro-batch to stage 0; resolves with stage 0's ack and the last stage's StepResult. */
async function run(items: Item[], patch: Partial<MicroBatch> = {}) {
  const id = nextBatchId++;
  const batch: MicroBatch = {
    micro_batch_id: id,
    items: items.map((it) => ({
      sequence_id: it.seq,
      slot: it.slot,
      start_position: it.start,
      token_count: it.tokens.length,
      sample: it.sample !== undefined,
      copy_prefix: it.copyFrom === undefined ? null : { from_slot: it.copyFrom, length: it.start },
    })),
    token_ids: items.flatMap((it) => it.tokens),
    sampling: items.flatMap((it) => (it.sample ? [it.sample] : [])),
    reply_to: sink.address,
    traceparent: '',
    ...patch,
  };
  forward.write({ batch });
  const [ack, result] = await Promise.all([nextAck(), stepResult(id)]);
  assert.equal(ack.micro_batch_id, id);
  return { ack, result };
}

function side(seq: number, over: Partial<SamplingSide> = {}): SamplingSide {
  return {
    sequence_id: seq,
    mask: 'MASK_KIND_UNSPECIFIED',
    temperature: 0,
    repetition_penalty: 1,
    penalised_ids: [],
    top_k: 8,
    full_row: false,
    ...over,
  };
}

function values(t: Tensor | null, kind: 'int32' | 'float32'): number[] {
  assert.ok(t && t.data.length > 0, 'tensor present');
  const n = t.data.length / 4;
  return Array.from({ length: n }, (_, i) =>
    kind === 'int32' ? t.data.readInt32LE(i * 4) : t.data.readFloatLE(i * 4),
  );
}

function params(s: SamplingSide, visual: { begin: number; end: number }): LastStageParams {
  return {
    mask: s.mask === 'MASK_KIND_TEXT' ? { kind: 'exclude', start: visual.begin, end: visual.end } : { kind: 'none' },
    temperature: s.temperature,
    repetitionPenalty: s.repetition_penalty === 0 ? 1 : s.repetition_penalty,
    penalisedIds: s.penalised_ids,
    topK: s.top_k,
    fullRow: s.full_row,
  };
}

/** The single-stage logits of `tokens` appended to what `slot` of the reference holds. */
async function referenceLogits(slot: number, start: number, tokens: number[]): Promise<Float32Array> {
  const out = await reference.forward([{ slot, start, length: tokens.length }], { tokens: Int32Array.from(tokens) });
  assert.ok('logits' in out);
  return out.logits;
}

function info(client: grpc.Client) {
  return unaryCall<object, Record<string, number | string | boolean>>(client, 'Info', {}, { deadlineMs: 5000 });
}

before(async () => {
  await promisify(execFile)(process.execPath, ['bin/emu3.js', 'make-tiny', '--out', modelDir], { cwd: root });
  sink = await serve({
    address: '127.0.0.1:0',
    services: [
      {
        name: RESULT_SINK_SERVICE,
        definition: serviceDefinition(SHARD_PROTO, RESULT_SINK_SERVICE),
        implementation: resultSink(),
      },
    ],
    log: createLogger('test-sink', { level: 'warn' }),
    handleSignals: false,
  });
  const last = await startShard('2-4');
  shards.push(await startShard('0-2', last.address), last);
  stage0 = createClient(SHARD_PROTO, SHARD_SERVICE, shards[0].address);
  stage1 = createClient(SHARD_PROTO, SHARD_SERVICE, shards[1].address);
  forward = (stage0 as unknown as { Forward(): typeof forward }).Forward();
  forward.on('data', (a: ForwardResponse) => {
    const w = ackWaiters.shift();
    if (w) w(a);
    else acks.push(a);
  });
  forward.on('error', () => {});
  reference = await StageRuntime.open({
    modelDir,
    layers: [0, 4],
    precision: 'fp32',
    maxSequences: 4,
    maxSequenceLength: SLOT_TOKENS,
    threads: 1,
  });
});

after(async () => {
  forward?.end();
  stage0?.close();
  stage1?.close();
  await reference?.close();
  for (const s of shards) if (s.proc.exitCode === null) s.proc.kill('SIGKILL');
  await sink?.shutdown('test done');
  rmSync(work, { recursive: true, force: true });
});

test('Info: layer ranges, shared fingerprint, KV capacity from the flags, visual range on the last stage', async () => {
  const [a, b] = [await info(stage0), await info(stage1)];
  assert.deepEqual([a.layer_begin, a.layer_end, a.is_first, a.is_last], [0, 2, true, false]);
  assert.deepEqual([b.layer_begin, b.layer_end, b.is_first, b.is_last], [2, 4, false, true]);
  assert.equal(a.model_fingerprint, b.model_fingerprint);
  assert.match(String(a.model_fingerprint), /^[0-9a-f]{64}$/);
  for (const i of [a, b]) {
    assert.deepEqual([i.num_layers, i.kv_slots, i.kv_slot_tokens, i.kv_capacity_tokens], [4, SLOTS, SLOT_TOKENS, 1024]);
    assert.deepEqual(
      [i.kv_tokens_in_use, i.kv_slots_in_use, i.precision, i.hidden_dtype],
      [0, 0, 'fp32', 'DTYPE_FLOAT32'],
    );
    // 2 layers × (K + V) × 2 kv heads × head_dim 16 × 4 bytes
    assert.equal(i.kv_bytes_per_token, 2 * 2 * 2 * 16 * 4);
  }
  // docs/model.md, "Special tokens and ids": visual code k is id 151854 + k, 32768 codes.
  assert.deepEqual([b.visual_token_begin, b.visual_token_end, b.vocab_size], [151854, 151854 + 32768, 184622]);
});

test('prefill chunks + decodes of several sequences: greedy = emu3 logits --steps; candidates and full rows = reference', async () => {
  const visual = { begin: 151854, end: 151854 + 32768 };
  const prompts = [
    [151849, 791, 3974, 14198, 35935, 34208, 916, 279, 16053, 5679, 13, 151850, 1234],
    [151849, 9906, 11, 1917, 0, 358, 1097],
    [151849, 40, 1093, 311, 7197, 1614, 369, 13, 555, 279, 3363, 323, 21, 88, 4000],
  ];
  const truthGreedy = Promise.all(
    prompts.map(async (p) => {
      const { stdout } = await promisify(execFile)(
        process.execPath,
        ['bin/emu3.js', 'logits', '--model', modelDir, '--tokens', p.join(','), '--steps', String(STEPS), '--top', '1'],
        { cwd: root, maxBuffer: 1 << 26 },
      );
      return JSON.parse(stdout).greedy as number[];
    }),
  );
  truthGreedy.catch(() => {}); // awaited below; a failure before then must not leave it unhandled
  // seq 0: greedy, two prefill chunks. seq 1: text mask + penalty + temperature, top 16. seq 2: greedy, full rows.
  const sides = [
    (_h: number[]) => side(10),
    (h: number[]) =>
      side(11, {
        mask: 'MASK_KIND_TEXT',
        repetition_penalty: 1.3,
        penalised_ids: [...new Set(h)],
        temperature: 0.8,
        top_k: 16,
      }),
    (_h: number[]) => side(12, { full_row: true, top_k: 0 }),
  ];
  const history = prompts.map((p) => [...p]);
  const generated: number[][] = [[], [], []];
  const refStart = [0, 0, 0];
  const check = async (seqIndex: number, r: StepResult, s: SamplingSide, fed: number[]) => {
    const logits = await referenceLogits(seqIndex, refStart[seqIndex], fed);
    refStart[seqIndex] += fed.length;
    const got = r.results.find((x) => x.sequence_id === s.sequence_id);
    assert.ok(got, `result for sequence ${s.sequence_id}`);
    const want = processLastStageRow(logits, params(s, visual));
    if (want.kind === 'full') {
      assert.equal(got.candidate_ids, null);
      const row = values(got.logprobs, 'float32');
      assert.equal(row.length, 184622);
      let worst = 0;
      for (let i = 0; i < row.length; i++) worst = Math.max(worst, Math.abs(row[i] - want.logprobs[i]));
      assert.ok(worst < 1e-4, `full row max |Δ| ${worst}`);
      return argmax(row);
    }
    const ids = values(got.candidate_ids, 'int32');
    const lps = values(got.logprobs, 'float32');
    assert.deepEqual(ids, Array.from(want.candidates.ids), `sequence ${s.sequence_id} candidate ids`);
    lps.forEach((lp, j) =>
      assert.ok(
        Math.abs(lp - want.candidates.logprobs[j]) < 1e-4,
        `seq ${s.sequence_id} logprob ${j}: ${lp} vs ${want.candidates.logprobs[j]}`,
      ),
    );
    if (s.mask === 'MASK_KIND_TEXT') for (const id of ids) assert.ok(id < visual.begin || id >= visual.end);
    return ids[0];
  };

  // Micro-batch 1: seq 0's first chunk (no sample), seq 1 and 2 whole prompts.
  const s1 = sides[1](history[1]);
  const s2 = sides[2](history[2]);
  let { ack, result } = await run([
    { seq: 10, slot: 0, start: 0, tokens: prompts[0].slice(0, 8) },
    { seq: 11, slot: 1, start: 0, tokens: prompts[1], sample: s1 },
    { seq: 12, slot: 2, start: 0, tokens: prompts[2], sample: s2 },
  ]);
  assert.equal(ack.error, '');
  assert.equal(result.error, '');
  assert.equal(result.stage_compute_ms.length, 2, 'compute time of both stages');
  assert.deepEqual(
    result.results.map((r) => r.sequence_id),
    [11, 12],
  );
  await referenceLogits(0, 0, prompts[0].slice(0, 8));
  refStart[0] = 8;
  generated[1].push(await check(1, result, s1, prompts[1]));
  generated[2].push(await check(2, result, s2, prompts[2]));

  // Micro-batch 2: seq 0's last chunk samples; 1 and 2 decode. Then decodes of all three.
  for (let step = 0; step < STEPS; step++) {
    const fed: number[][] = [];
    if (step > 0) history[0].push(generated[0][step - 1]);
    fed[0] = step === 0 ? prompts[0].slice(8) : [generated[0][step - 1]];
    const s = [sides[0](history[0]), null, null] as (SamplingSide | null)[];
    const items: Item[] = [
      { seq: 10, slot: 0, start: history[0].length - fed[0].length, tokens: fed[0], sample: s[0] as SamplingSide },
    ];
    for (const k of [1, 2]) {
      if (generated[k].length >= STEPS) continue;
      const last = generated[k][generated[k].length - 1];
      history[k].push(last);
      s[k] = sides[k](history[k]);
      fed[k] = [last];
      items.push({
        seq: 10 + k,
        slot: k,
        start: history[k].length - 1,
        tokens: [last],
        sample: s[k] as SamplingSide,
      });
    }
    ({ ack, result } = await run(items));
    assert.equal(ack.error, '');
    assert.equal(result.error, '');
    generated[0].push(await check(0, result, s[0] as SamplingSide, fed[0]));
    for (const k of [1, 2]) if (s[k]) generated[k].push(await check(k, result, s[k] as SamplingSide, fed[k]));
  }
  const truth = await truthGreedy;
  assert.deepEqual(generated[0], truth[0], 'sequence 0 (greedy, chunked prefill) = emu3 logits --steps');
  assert.deepEqual(generated[2], truth[2], 'sequence 2 (greedy from full rows) = emu3 logits --steps');

  // A prefix-cache hit: seq 3 copies slot 0's prompt and must continue exactly like seq 0 did.
  const copied = await run([
    { seq: 13, slot: 3, start: prompts[0].length, tokens: [generated[0][0]], sample: side(13), copyFrom: 0 },
  ]);
  assert.equal(copied.result.error, '');
  assert.equal(values(copied.result.results[0].candidate_ids, 'int32')[0], generated[0][1]);

  // KV in use: what each slot holds, on both stages; after a KvCommand free, zero on both.
  const held = history[0].length + history[1].length + history[2].length + prompts[0].length + 1;
  for (const c of [stage0, stage1]) {
    const i = await info(c);
    assert.equal(i.kv_tokens_in_use, held);
    assert.equal(i.kv_slots_in_use, 4);
  }
  forward.write({ kv: { free_slots: [0, 1, 2, 3], copies: [] } });
  assert.equal((await nextAck()).error, '');
  for (const c of [stage0, stage1]) {
    let i = await info(c);
    for (let t = 0; t < 50 && i.kv_tokens_in_use !== 0; t++)
      i = await new Promise((r) => setTimeout(r, 20)).then(() => info(c));
    assert.deepEqual([i.kv_tokens_in_use, i.kv_slots_in_use], [0, 0]);
  }
});

function argmax(row: number[]): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

test('bad micro-batches and KV commands get errors naming the problem; the stream and the next good one work', async () => {
  const bad: [Item[], Partial<MicroBatch>, RegExp][] = [
    [
      [{ seq: 20, slot: 99, start: 0, tokens: [1, 2] }],
      {},
      /items\[0\] \(sequence 20\)\.slot 99 is out of range \[0, 8\)/,
    ],
    [
      [{ seq: 20, slot: 0, start: 0, tokens: new Array(129).fill(5) }],
      {},
      /token_count 129 exceeds the slot capacity 128/,
    ],
    [
      [{ seq: 20, slot: 0, start: 0, tokens: [5, 184622] }],
      {},
      /token_ids\[1\] = 184622 is outside the vocabulary \[0, 184622\)/,
    ],
    [
      [
        { seq: 20, slot: 0, start: 0, tokens: [5] },
        { seq: 20, slot: 1, start: 0, tokens: [6] },
      ],
      {},
      /sequence 20 appears twice in one micro-batch/,
    ],
    [[{ seq: 20, slot: 5, start: 3, tokens: [5] }], {}, /start_position 3 is beyond the 0 positions slot 5 holds/],
    [
      [{ seq: 20, slot: 5, start: 4, tokens: [5], copyFrom: 6 }],
      {},
      /copy_prefix\.length 4 exceeds the 0 positions slot 6 holds/,
    ],
    [
      [{ seq: 20, slot: 5, start: 0, tokens: [5, 6] }],
      { token_ids: [5] },
      /token_ids has 1 ids but the items' token_count add up to 2/,
    ],
  ];
  for (const [items, patch, message] of bad) {
    const { ack, result } = await run(items, patch);
    assert.match(ack.error, message);
    assert.match(result.error, message, 'the coordinator hears of it on its ResultSink too');
  }
  // Errors only the last stage can see: stage 0 runs the batch, the last stage refuses it.
  const lastOnly: [SamplingSide, RegExp][] = [
    [side(21, { top_k: 0 }), /sampling\[0\] \(sequence 21\)\.top_k 0 must be in \[1, 4096\] \(max_top_k\)/],
    [side(99), /sampling\[0\]\.sequence_id 99 does not match items\[0\]\.sequence_id 21/],
    [side(21, { mask: 'MASK_KIND_IMAGE_LAYOUT' }), /MASK_KIND_IMAGE_LAYOUT is not supported yet/],
    [side(21, { repetition_penalty: 1.2, penalised_ids: [184622] }), /penalised_ids\[0\] = 184622 is outside/],
  ];
  for (const [s, message] of lastOnly) {
    const { ack, result } = await run([{ seq: 21, slot: 6, start: 0, tokens: [151849, 42], sample: s }]);
    assert.equal(ack.error, '');
    assert.match(result.error, /^stage \[2, 4\): /);
    assert.match(result.error, message);
  }
  // A hidden-size mismatch, sent straight to the last stage on its own stream.
  const direct = (stage1 as unknown as { Forward(): typeof forward }).Forward();
  const directAck = new Promise<ForwardResponse>((resolve) => direct.once('data', resolve));
  direct.write({
    batch: {
      micro_batch_id: 900,
      items: [{ sequence_id: 22, slot: 6, start_position: 0, token_count: 1, sample: false, copy_prefix: null }],
      token_ids: [],
      hidden_states: { data: Buffer.alloc(12), dtype: 'DTYPE_FLOAT32', shape: [1, 3] },
      sampling: [],
      reply_to: sink.address,
      traceparent: '',
    },
  });
  assert.match((await directAck).error, /hidden_states\.shape \[1, 3\] must be \[1, 64\] \(tokens, hidden_size\)/);
  direct.end();
  forward.write({ kv: { free_slots: [99], copies: [] } });
  assert.match((await nextAck()).error, /kv\.free_slots\[0\] 99 is out of range \[0, 8\)/);
  await assert.rejects(unaryCall(stage0, 'Free', { slots: [3, 99] }), (err: grpc.ServiceError) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /slots\[1\] 99 is out of range \[0, 8\)/);
    return true;
  });

  // Refused requests left no KV behind; only stage 0 ran the batches the last stage refused (slot 6, 2 positions).
  assert.deepEqual([(await info(stage0)).kv_tokens_in_use, (await info(stage1)).kv_tokens_in_use], [2, 0]);
  forward.write({ kv: { free_slots: [6], copies: [] } });
  assert.equal((await nextAck()).error, '');
  // A good request now works.
  const good = await run([{ seq: 23, slot: 4, start: 0, tokens: [151849, 9906, 11], sample: side(23) }]);
  assert.equal(good.result.error, '');
  assert.equal(values(good.result.results[0].candidate_ids, 'int32').length, 8);
  for (const c of [stage0, stage1]) assert.equal((await info(c)).kv_tokens_in_use, 3);
  // Out-of-band Free on each stage, then Reset.
  for (const c of [stage0, stage1])
    assert.equal(
      (await unaryCall<object, { kv_tokens_in_use: number }>(c, 'Free', { slots: [4] })).kv_tokens_in_use,
      0,
    );
  await run([{ seq: 24, slot: 2, start: 0, tokens: [151849, 5], sample: side(24) }]);
  for (const c of [stage0, stage1]) await unaryCall(c, 'Reset', {});
  for (const c of [stage0, stage1])
    assert.deepEqual([(await info(c)).kv_tokens_in_use, (await info(c)).kv_slots_in_use], [0, 0]);
});

test('SIGTERM: both shards end the open Forward stream, drain and exit 0', async () => {
  const ended = new Promise<void>((resolve) => forward.once('end', resolve));
  forward.resume();
  const started = Date.now();
  for (const s of shards) s.proc.kill('SIGTERM');
  const codes = await Promise.all(shards.map((s) => s.exited));
  assert.deepEqual(codes, [0, 0]);
  await ended;
  assert.ok(Date.now() - started < 10_000, `drained in ${Date.now() - started} ms`);
});
