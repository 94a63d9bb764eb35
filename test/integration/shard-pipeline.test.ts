// Real shard processes (`emu3 shard`, layers 0-2 → 2-4 of emu3-tiny, chained with --next) driven the way the
// coordinator drives them: a Forward stream to stage 0 carrying the coordinator epoch, results on a ResultSink served
// by this test process. Truth: `emu3 logits --steps` (single-stage greedy); for candidates and full rows the
// single-stage logits of the same history run through the float64 reference of the last stage's row processing; for
// refusals and penalty deltas the same requests without the refused item or with the whole penalised list. Tests of
// the lease and of a lost stage start shards of their own.
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
  type ForwardRequest,
  type ForwardResponse,
  type KvCommand,
  type MicroBatch,
  RESULT_SINK_SERVICE,
  type SamplingSide,
  SHARD_PROTO,
  SHARD_SERVICE,
  type StageError,
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
/** Shards a single test starts (killed in `after` if the test could not stop them). */
const extraShards: Shard[] = [];
let sink: RunningServer;
const results = new Map<number, StepResult>();
const waiters = new Map<number, (r: StepResult) => void>();
let stage0: grpc.Client;
let stage1: grpc.Client;
let reference: StageRuntime;
let nextBatchId = 1;

/** The coordinator epoch the tests speak with (a test of epochs raises it). */
let epoch = 1;

function startShard(layers: string, next?: string, extra: string[] = []): Promise<Shard> {
  const args = ['shard', '--model', modelDir, '--layers', layers, '--listen', '127.0.0.1:0'];
  args.push('--allow-reply-to', sink.address);
  if (next) args.push('--next', next);
  args.push('--max-slots', String(SLOTS), '--slot-tokens', String(SLOT_TOKENS), '--threads', '1', ...extra);
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
    const timer = setTimeout(() => {
      waiters.delete(id);
      reject(new Error(`no StepResult for micro-batch ${id} in 20 s`));
    }, 20_000);
    waiters.set(id, (r) => {
      clearTimeout(timer);
      waiters.delete(id);
      resolve(r);
    });
  });
}

interface Item {
  seq: number;
  slot: number;
  start: number;
  tokens: number[];
  sample?: SamplingSide;
  copyFrom?: number;
}

function microBatch(items: Item[], patch: Partial<MicroBatch> = {}): MicroBatch {
  return {
    micro_batch_id: nextBatchId++,
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
}

type ForwardCall = grpc.ClientDuplexStream<ForwardRequest, ForwardResponse>;

/** One Forward stream to a stage, as the coordinator holds it: writes in order, acks read in order. */
class Driver {
  private readonly stream: ForwardCall;
  private readonly acks: ForwardResponse[] = [];
  private readonly ackWaiters: ((a: ForwardResponse) => void)[] = [];
  private failure: Error | null = null;

  constructor(client: grpc.Client) {
    this.stream = (client as unknown as { Forward(): ForwardCall }).Forward();
    this.stream.on('data', (a: ForwardResponse) => {
      const w = this.ackWaiters.shift();
      if (w) w(a);
      else this.acks.push(a);
    });
    this.stream.on('error', (err: Error) => {
      this.failure = err;
    });
  }

  write(request: ForwardRequest): void {
    this.stream.write(request);
  }

  /** The next ack; rejects after `ms` (or at once if the stream failed) rather than hang. */
  nextAck(ms = 20_000): Promise<ForwardResponse> {
    const have = this.acks.shift();
    if (have) return Promise.resolve(have);
    if (this.failure) return Promise.reject(new Error(`Forward stream failed: ${this.failure.message}`));
    return new Promise((resolve, reject) => {
      const waiter = (a: ForwardResponse) => {
        clearTimeout(timer);
        resolve(a);
      };
      const timer = setTimeout(() => {
        const at = this.ackWaiters.indexOf(waiter);
        if (at >= 0) this.ackWaiters.splice(at, 1);
        reject(new Error(`no ForwardResponse in ${ms} ms`));
      }, ms);
      this.ackWaiters.push(waiter);
    });
  }

  /** Sends one micro-batch; resolves with this stage's ack and the StepResult. */
  async run(items: Item[], patch: Partial<MicroBatch> = {}, withEpoch = epoch) {
    const batch = microBatch(items, patch);
    this.write({ batch, epoch: withEpoch });
    const [ack, result] = await Promise.all([this.nextAck(), stepResult(batch.micro_batch_id)]);
    assert.equal(ack.micro_batch_id, batch.micro_batch_id);
    return { ack, result };
  }

  /** Sends a KvCommand; resolves with its ack. */
  kv(cmd: Partial<KvCommand>, withEpoch = epoch): Promise<ForwardResponse> {
    this.write({ kv: { free_slots: [], copies: [], ...cmd }, epoch: withEpoch });
    return this.nextAck();
  }

  heartbeat(withEpoch = epoch): Promise<ForwardResponse> {
    this.write({ heartbeat: {}, epoch: withEpoch });
    return this.nextAck();
  }

  end(): void {
    this.stream.end();
  }

  get raw() {
    return this.stream;
  }
}

let pipeline: Driver;
const run = (items: Item[], patch: Partial<MicroBatch> = {}) => pipeline.run(items, patch);

function side(seq: number, over: Partial<SamplingSide> = {}): SamplingSide {
  return {
    sequence_id: seq,
    mask: 'MASK_KIND_UNSPECIFIED',
    temperature: 0,
    repetition_penalty: 1,
    penalised_ids: [],
    top_k: 8,
    full_row: false,
    penalty_reset: false,
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

/** kv_tokens_in_use of stage 0 and the last stage. */
async function inUse(): Promise<number[]> {
  return [(await info(stage0)).kv_tokens_in_use as number, (await info(stage1)).kv_tokens_in_use as number];
}

/** Polls `read` every 50 ms until `ok` holds (a later stage applies a command after stage 0 acknowledged it). */
async function waitFor<T>(read: () => Promise<T>, ok: (v: T) => boolean, ms = 5000): Promise<T> {
  const until = Date.now() + ms;
  let v = await read();
  while (!ok(v) && Date.now() < until) {
    await sleep(50);
    v = await read();
  }
  return v;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A refusal's fields, for one deepEqual. */
function refusal(e: StageError) {
  return { kind: e.kind, sequence_id: e.sequence_id, status_code: e.status_code };
}

/** A StepResult's results keyed by sequence, with their bytes (for exact comparison). */
function resultBytes(r: StepResult) {
  return [...r.results]
    .sort((a, b) => a.sequence_id - b.sequence_id)
    .map((x) => ({
      seq: x.sequence_id,
      ids: x.candidate_ids ? x.candidate_ids.data.toString('hex') : null,
      logprobs: x.logprobs ? x.logprobs.data.toString('hex') : null,
    }));
}

before(
  async () => {
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
    pipeline = new Driver(stage0);
    reference = await StageRuntime.open({
      modelDir,
      layers: [0, 4],
      precision: 'fp32',
      maxSequences: 4,
      maxSequenceLength: SLOT_TOKENS,
      threads: 1,
    });
  },
  { timeout: 240_000 },
);

after(
  async () => {
    pipeline?.end();
    stage0?.close();
    stage1?.close();
    await reference?.close();
    for (const s of [...shards, ...extraShards]) if (s.proc.exitCode === null) s.proc.kill('SIGKILL');
    await sink?.shutdown('test done');
    rmSync(work, { recursive: true, force: true });
  },
  { timeout: 30_000 },
);

test(
  'Info: layer ranges, shared fingerprint, KV capacity from the flags, visual range on the last stage, lease',
  { timeout: 30_000 },
  async () => {
    const [a, b] = [await info(stage0), await info(stage1)];
    assert.deepEqual([a.layer_begin, a.layer_end, a.is_first, a.is_last], [0, 2, true, false]);
    assert.deepEqual([b.layer_begin, b.layer_end, b.is_first, b.is_last], [2, 4, false, true]);
    assert.equal(a.model_fingerprint, b.model_fingerprint);
    assert.match(String(a.model_fingerprint), /^[0-9a-f]{64}$/);
    for (const i of [a, b]) {
      assert.deepEqual(
        [i.num_layers, i.kv_slots, i.kv_slot_tokens, i.kv_capacity_tokens],
        [4, SLOTS, SLOT_TOKENS, 1024],
      );
      assert.deepEqual(
        [i.kv_tokens_in_use, i.kv_slots_in_use, i.precision, i.hidden_dtype],
        [0, 0, 'fp32', 'DTYPE_FLOAT32'],
      );
      // 2 layers × (K + V) × 2 kv heads × head_dim 16 × 4 bytes
      assert.equal(i.kv_bytes_per_token, 2 * 2 * 2 * 16 * 4);
      assert.deepEqual([i.lease_ms, i.epoch], [10_000, 0], 'the default lease; no coordinator yet');
    }
    // docs/model.md, "Special tokens and ids": visual code k is id 151854 + k, 32768 codes.
    assert.deepEqual([b.visual_token_begin, b.visual_token_end, b.vocab_size], [151854, 151854 + 32768, 184622]);
  },
);

test(
  'prefill chunks + decodes of several sequences: greedy = emu3 logits --steps; candidates and full rows = reference',
  { timeout: 180_000 },
  async () => {
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
          [
            'bin/emu3.js',
            'logits',
            '--model',
            modelDir,
            '--tokens',
            p.join(','),
            '--steps',
            String(STEPS),
            '--top',
            '1',
          ],
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
          penalty_reset: true,
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
    assert.equal(ack.error, null);
    assert.equal(result.error, null);
    assert.deepEqual(result.refusals, []);
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
      assert.equal(ack.error, null);
      assert.equal(result.error, null);
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
    assert.equal(copied.result.error, null);
    assert.equal(values(copied.result.results[0].candidate_ids, 'int32')[0], generated[0][1]);

    // KV in use: what each slot holds, on both stages; after a KvCommand free, zero on both.
    const held = history[0].length + history[1].length + history[2].length + prompts[0].length + 1;
    for (const c of [stage0, stage1]) {
      const i = await info(c);
      assert.equal(i.kv_tokens_in_use, held);
      assert.equal(i.kv_slots_in_use, 4);
    }
    assert.equal((await pipeline.kv({ free_slots: [0, 1, 2, 3] })).error, null);
    for (const c of [stage0, stage1]) {
      let i = await info(c);
      for (let t = 0; t < 50 && i.kv_tokens_in_use !== 0; t++)
        i = await new Promise((r) => setTimeout(r, 20)).then(() => info(c));
      assert.deepEqual([i.kv_tokens_in_use, i.kv_slots_in_use], [0, 0]);
    }
  },
);

function argmax(row: number[]): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

test(
  'refused items and whole-batch errors are typed and name the stage and the problem; the stream goes on',
  { timeout: 120_000 },
  async () => {
    // Refused by stage 0, each alone in its micro-batch: no stage ran it, and the last stage reports the refusal.
    const refused: [Item[], Partial<MicroBatch>, RegExp, number][] = [
      [
        [{ seq: 20, slot: 99, start: 0, tokens: [1, 2] }],
        {},
        /^stage \[0, 2\): items\[0\] \(sequence 20\)\.slot 99 is out of range \[0, 8\)/,
        3,
      ],
      [
        [{ seq: 20, slot: 0, start: 0, tokens: new Array(129).fill(5) }],
        {},
        /start_position 0 \+ token_count 129 exceeds the slot capacity 128/,
        8,
      ],
      [
        [{ seq: 20, slot: 0, start: 0, tokens: [5, 184622] }],
        {},
        /items\[0\] \(sequence 20\): token_ids\[1\] = 184622 is outside the vocabulary \[0, 184622\)/,
        3,
      ],
      [[{ seq: 20, slot: 5, start: 3, tokens: [5] }], {}, /start_position 3 but slot 5 holds 0 positions/, 9],
      [
        [{ seq: 20, slot: 5, start: 4, tokens: [5], copyFrom: 6 }],
        {},
        /copy_prefix\.length 4 exceeds the 0 positions slot 6 holds/,
        9,
      ],
      // Sampling entries are checked by every stage, so stage 0 refuses them before any KV is written.
      [
        [{ seq: 21, slot: 6, start: 0, tokens: [151849, 42], sample: side(21, { top_k: 0 }) }],
        {},
        /^stage \[0, 2\): sampling\[0\] \(sequence 21\)\.top_k 0 must be in \[1, 4096\] \(max_top_k\)/,
        3,
      ],
      [
        [{ seq: 21, slot: 6, start: 0, tokens: [151849, 42], sample: side(21, { mask: 'MASK_KIND_IMAGE_LAYOUT' }) }],
        {},
        /MASK_KIND_IMAGE_LAYOUT needs allow_begin < allow_end/,
        3,
      ],
      // A guided row whose unconditional partner is not in the batch cannot run.
      [
        [
          {
            seq: 21,
            slot: 6,
            start: 0,
            tokens: [151849, 42],
            sample: side(21, { cfg_uncond_sequence_id: 99, guidance_scale: 3 }),
          },
        ],
        {},
        /^stage \[0, 2\): items\[0\] \(sequence 21\): its guidance partner \(sequence 99\) is not a sampled item/,
        9,
      ],
      [
        [
          {
            seq: 21,
            slot: 6,
            start: 0,
            tokens: [151849, 42],
            sample: side(21, { repetition_penalty: 1.2, penalised_ids: [184622] }),
          },
        ],
        {},
        /penalised_ids\[0\] = 184622 is outside/,
        3,
      ],
    ];
    for (const [items, patch, message, code] of refused) {
      const { ack, result } = await run(items, patch);
      assert.equal(ack.error, null, 'a refusal is not an error of the batch');
      assert.equal(result.error, null);
      assert.deepEqual(result.results, []);
      assert.equal(result.stage_compute_ms.length, 2, 'the emptied batch still went through every stage');
      assert.equal(result.refusals.length, 1, String(message));
      assert.deepEqual(refusal(result.refusals[0]), {
        kind: 'STAGE_ERROR_KIND_REFUSED',
        sequence_id: items[0].seq,
        status_code: code,
      });
      assert.match(result.refusals[0].message, message);
    }
    assert.deepEqual(await inUse(), [0, 0], 'refused items left no KV on any stage');

    // Whole-batch problems: INTERNAL, in the ack and (from the stage that stopped it) on the ResultSink.
    const whole: [Item[], Partial<MicroBatch>, RegExp][] = [
      [
        [
          { seq: 20, slot: 0, start: 0, tokens: [5] },
          { seq: 20, slot: 1, start: 0, tokens: [6] },
        ],
        {},
        /items\[0\] and items\[1\]: sequence 20 appears twice in one micro-batch/,
      ],
      [
        [{ seq: 20, slot: 5, start: 0, tokens: [5, 6] }],
        { token_ids: [5] },
        /token_ids has 1 ids but the items' token_count add up to 2/,
      ],
      [
        [{ seq: 21, slot: 6, start: 0, tokens: [151849, 42], sample: side(99) }],
        {},
        /sampling\[0\]\.sequence_id 99 does not match items\[0\]\.sequence_id 21/,
      ],
    ];
    for (const [items, patch, message] of whole) {
      const { ack, result } = await run(items, patch);
      assert.ok(ack.error, String(message));
      assert.equal(ack.error.kind, 'STAGE_ERROR_KIND_INTERNAL');
      assert.match(ack.error.message, /^stage \[0, 2\): micro-batch \d+: /);
      assert.match(ack.error.message, message);
      assert.deepEqual(result.error, ack.error, 'the coordinator hears of it on its ResultSink');
      assert.deepEqual([result.results, result.refusals], [[], []]);
    }

    // A hidden-size mismatch, sent straight to the last stage on its own stream.
    const direct = new Driver(stage1);
    const bad = await direct.run([{ seq: 22, slot: 6, start: 0, tokens: [0] }], {
      token_ids: [],
      hidden_states: { data: Buffer.alloc(12), dtype: 'DTYPE_FLOAT32', shape: [1, 3] },
    });
    assert.equal(bad.ack.error?.kind, 'STAGE_ERROR_KIND_INTERNAL');
    assert.match(
      bad.ack.error?.message ?? '',
      /^stage \[2, 4\): .*hidden_states\.shape \[1, 3\] must be \[1, 64\] \(tokens, hidden_size\)/,
    );
    assert.deepEqual(bad.result.error, bad.ack.error);
    direct.end();

    // A KvCommand applies its valid entries, reports the rest, and goes on to every stage.
    await run([
      { seq: 23, slot: 3, start: 0, tokens: [151849] },
      { seq: 24, slot: 4, start: 0, tokens: [151849, 9906] },
    ]);
    assert.deepEqual(await inUse(), [3, 3]);
    const kvAck = await pipeline.kv({ free_slots: [99, 3] });
    assert.deepEqual([kvAck.error?.kind, kvAck.error?.status_code], ['STAGE_ERROR_KIND_REFUSED', 3]);
    assert.match(kvAck.error?.message ?? '', /^stage \[0, 2\): kv\.free_slots\[0\] 99 is out of range \[0, 8\)/);
    assert.deepEqual(await waitFor(inUse, (v) => v[1] === 2), [2, 2], 'slot 3 freed on both stages');
    await assert.rejects(unaryCall(stage0, 'Free', { slots: [3, 99] }), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.match(err.details, /slots\[1\] 99 is out of range \[0, 8\)/);
      return true;
    });

    // A refusal only the last stage can make (its KV of slot 4 is gone): the item's hidden rows leave the batch there,
    // and the other item's candidates are still the reference's.
    await unaryCall(stage1, 'Free', { slots: [4] });
    const fresh = [151849, 9906, 11];
    const mixed = await run([
      { seq: 24, slot: 4, start: 2, tokens: [1097], sample: side(24) },
      { seq: 25, slot: 2, start: 0, tokens: fresh, sample: side(25, { top_k: 12 }) },
    ]);
    assert.equal(mixed.result.error, null);
    assert.deepEqual(mixed.result.refusals.map(refusal), [
      { kind: 'STAGE_ERROR_KIND_REFUSED', sequence_id: 24, status_code: 9 },
    ]);
    assert.match(
      mixed.result.refusals[0].message,
      /^stage \[2, 4\): items\[0\] \(sequence 24\)\.start_position 2 but slot 4 holds 0 positions/,
    );
    assert.deepEqual(
      mixed.result.results.map((r) => r.sequence_id),
      [25],
    );
    const want = processLastStageRow(
      await referenceLogits(3, 0, fresh),
      params(side(25, { top_k: 12 }), { begin: 0, end: 0 }),
    );
    await reference.free(3);
    assert.ok(want.kind === 'candidates');
    assert.deepEqual(values(mixed.result.results[0].candidate_ids, 'int32'), Array.from(want.candidates.ids));
    values(mixed.result.results[0].logprobs, 'float32').forEach((lp, j) =>
      assert.ok(
        Math.abs(lp - want.candidates.logprobs[j]) < 1e-4,
        `logprob ${j}: ${lp} vs ${want.candidates.logprobs[j]}`,
      ),
    );
    // Stage 0 ran sequence 24 (3 positions in slot 4), the last stage did not: the coordinator frees a refused sequence.
    assert.deepEqual(await inUse(), [6, 3]);
    assert.equal((await pipeline.kv({ free_slots: [4, 2] })).error, null);
    assert.deepEqual(await waitFor(inUse, (v) => v[1] === 0), [0, 0]);

    // Reset needs the coordinator epoch.
    await assert.rejects(unaryCall(stage0, 'Reset', {}), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      assert.match(err.details, /ResetRequest\.epoch must be ≥ 1/);
      return true;
    });
    const good = await run([{ seq: 26, slot: 2, start: 0, tokens: [151849, 5], sample: side(26) }]);
    assert.deepEqual([good.result.error, good.result.refusals, good.result.results.length], [null, [], 1]);
    for (const c of [stage0, stage1]) await unaryCall(c, 'Reset', { epoch });
    assert.deepEqual(await inUse(), [0, 0]);
  },
);

test(
  'one refused item among 8 sequences: the other 7 get exactly the results of a batch without it; the ledgers agree',
  { timeout: 180_000 },
  async () => {
    const prompts = Array.from({ length: 7 }, (_, k) => [
      151849,
      ...Array.from({ length: 3 + 2 * k }, (_, j) => 100 + 997 * k + 31 * j),
    ]);
    const sides = prompts.map((_, k) =>
      side(40 + k, {
        top_k: 4 + k,
        temperature: k % 2 === 0 ? 0 : 0.7,
        mask: k % 3 === 0 ? 'MASK_KIND_TEXT' : 'MASK_KIND_UNSPECIFIED',
        repetition_penalty: k === 5 ? 1.4 : 1,
        penalised_ids: k === 5 ? prompts[5] : [],
        penalty_reset: true,
      }),
    );
    const scenario = async (withBad: boolean) => {
      const items: Item[] = prompts.map((p, k) => ({ seq: 40 + k, slot: k, start: 0, tokens: p, sample: sides[k] }));
      // Prefill: sequence 47's token is outside the vocabulary (INVALID_ARGUMENT at stage 0).
      if (withBad) items.splice(3, 0, { seq: 47, slot: 7, start: 0, tokens: [151849, 184627], sample: side(47) });
      const prefill = (await run(items)).result;
      const next = new Map(prefill.results.map((r) => [r.sequence_id, values(r.candidate_ids, 'int32')[0]]));
      const decodes: Item[] = prompts.map((p, k) => ({
        seq: 40 + k,
        slot: k,
        start: p.length,
        tokens: [next.get(40 + k) as number],
        sample: sides[k],
      }));
      // Decode: sequence 47 claims 3 positions its slot does not hold (FAILED_PRECONDITION at stage 0).
      if (withBad) decodes.unshift({ seq: 47, slot: 7, start: 3, tokens: [5], sample: side(47) });
      const decode = (await run(decodes)).result;
      const kv = await inUse();
      assert.equal((await pipeline.kv({ free_slots: [0, 1, 2, 3, 4, 5, 6, 7] })).error, null);
      assert.deepEqual(await waitFor(inUse, (v) => v[1] === 0), [0, 0]);
      return { prefill, decode, kv };
    };
    const clean = await scenario(false);
    const mixed = await scenario(true);
    for (const step of ['prefill', 'decode'] as const) {
      assert.equal(clean[step].error, null);
      assert.equal(mixed[step].error, null);
      assert.equal(mixed[step].results.length, 7);
      assert.deepEqual(resultBytes(mixed[step]), resultBytes(clean[step]), `${step}: the 7 results, bit for bit`);
      assert.deepEqual(clean[step].refusals, []);
    }
    assert.deepEqual(mixed.prefill.refusals.map(refusal), [
      { kind: 'STAGE_ERROR_KIND_REFUSED', sequence_id: 47, status_code: 3 },
    ]);
    assert.match(
      mixed.prefill.refusals[0].message,
      /^stage \[0, 2\): items\[3\] \(sequence 47\): token_ids\[\d+\] = 184627 is outside the vocabulary \[0, 184622\)/,
    );
    assert.deepEqual(mixed.decode.refusals.map(refusal), [
      { kind: 'STAGE_ERROR_KIND_REFUSED', sequence_id: 47, status_code: 9 },
    ]);
    assert.match(
      mixed.decode.refusals[0].message,
      /^stage \[0, 2\): items\[0\] \(sequence 47\)\.start_position 3 but slot 7 holds 0 positions/,
    );
    const held = prompts.reduce((n, p) => n + p.length + 1, 0);
    assert.deepEqual(mixed.kv, [held, held], 'both stages hold the 7 sequences, nothing of the refused one');
    assert.deepEqual(clean.kv, mixed.kv);
  },
);

test(
  'penalty deltas: the set kept by the last stage gives the candidates of the whole list sent every step',
  { timeout: 180_000 },
  async () => {
    const prompt = [151849, 791, 3974, 791, 14198, 35935, 3974, 34208, 916];
    const base: Partial<SamplingSide> = {
      mask: 'MASK_KIND_TEXT',
      repetition_penalty: 1.5,
      temperature: 0.9,
      top_k: 32,
    };
    // Sequence 50 (slot 0): the whole set with penalty_reset every step (the stateless form). Sequence 51 (slot 1): the
    // prompt with penalty_reset once, then only each step's new token. Control 52 (slot 2): only the new token, reset
    // every step (what a stage that forgot its set would do) — it must differ, or this test could not tell.
    const history = [...prompt];
    let fed = prompt;
    let controlDiffers = false;
    for (let step = 0; step < STEPS; step++) {
      const start = history.length - fed.length;
      const newest = step === 0 ? prompt : fed;
      const full = await run([
        {
          seq: 50,
          slot: 0,
          start,
          tokens: fed,
          sample: side(50, { ...base, penalised_ids: [...new Set(history)], penalty_reset: true }),
        },
      ]);
      const delta = await run([
        {
          seq: 51,
          slot: 1,
          start,
          tokens: fed,
          sample: side(51, { ...base, penalised_ids: newest, penalty_reset: step === 0 }),
        },
      ]);
      const control = await run([
        {
          seq: 52,
          slot: 2,
          start,
          tokens: fed,
          sample: side(52, { ...base, penalised_ids: newest, penalty_reset: true }),
        },
      ]);
      const [a, b, c] = [full, delta, control].map((r) => {
        assert.deepEqual([r.result.error, r.result.refusals], [null, []]);
        return resultBytes(r.result)[0];
      });
      assert.deepEqual({ ...b, seq: 50 }, a, `step ${step}: deltas = whole list, bit for bit`);
      if (c.ids !== a.ids || c.logprobs !== a.logprobs) controlDiffers = true;
      const next = values(full.result.results[0].candidate_ids, 'int32')[0];
      history.push(next);
      fed = [next];
    }
    assert.ok(controlDiffers, 'penalising only the newest token gives other candidates: the set mattered');
    // A freed slot's set is gone: a new sequence there without penalty_reset starts from an empty set.
    assert.equal((await pipeline.kv({ free_slots: [0, 1, 2] })).error, null);
    const again = await run([{ seq: 53, slot: 1, start: 0, tokens: prompt, sample: side(53, { ...base }) }]);
    const plain = await run([
      { seq: 54, slot: 2, start: 0, tokens: prompt, sample: side(54, { ...base, repetition_penalty: 1 }) },
    ]);
    assert.deepEqual({ ...resultBytes(again.result)[0], seq: 54 }, resultBytes(plain.result)[0]);
    assert.equal((await pipeline.kv({ free_slots: [1, 2] })).error, null);
    assert.deepEqual(await waitFor(inUse, (v) => v[1] === 0), [0, 0]);
  },
);

test(
  'epoch: a larger one frees the old KV on every stage; a smaller one (or 0) is refused STALE_EPOCH and nothing runs',
  { timeout: 120_000 },
  async () => {
    await run([
      { seq: 60, slot: 0, start: 0, tokens: [151849, 1, 2, 3] },
      { seq: 61, slot: 1, start: 0, tokens: [151849, 4], sample: side(61) },
    ]);
    assert.deepEqual(await inUse(), [6, 6]);
    for (const c of [stage0, stage1]) assert.equal((await info(c)).epoch, epoch);
    const old = epoch;
    epoch += 1;
    // A heartbeat of a new coordinator: forwarded down the chain, so every stage takes over.
    assert.equal((await pipeline.heartbeat()).error, null);
    for (const c of [stage0, stage1]) {
      const i = await waitFor(
        () => info(c),
        (v) => v.epoch === epoch,
      );
      assert.deepEqual([i.epoch, i.kv_tokens_in_use, i.kv_slots_in_use], [epoch, 0, 0]);
    }
    for (const s of shards)
      assert.ok(
        s.logs.some((l) => l.msg === `coordinator epoch ${epoch} took over: freed 2 slots, 6 positions`),
        'the takeover is logged with what it freed',
      );

    // The old coordinator's requests are not executed.
    const stale = await pipeline.run([{ seq: 62, slot: 0, start: 0, tokens: [151849, 9], sample: side(62) }], {}, old);
    assert.equal(stale.ack.error?.kind, 'STAGE_ERROR_KIND_STALE_EPOCH');
    assert.match(
      stale.ack.error?.message ?? '',
      new RegExp(
        `^stage \\[0, 2\\): ForwardRequest\\.epoch ${old} is older than this stage's coordinator epoch ${epoch}`,
      ),
    );
    assert.deepEqual(stale.result.error, stale.ack.error);
    assert.deepEqual(stale.result.results, []);
    const unset = await pipeline.run([{ seq: 63, slot: 0, start: 0, tokens: [151849] }], {}, 0);
    assert.equal(unset.result.error?.kind, 'STAGE_ERROR_KIND_STALE_EPOCH');
    assert.match(unset.result.error?.message ?? '', /ForwardRequest\.epoch is 0 \(unset\)/);
    for (const ack of [await pipeline.kv({ free_slots: [0] }, old), await pipeline.heartbeat(old)]) {
      assert.equal(ack.error?.kind, 'STAGE_ERROR_KIND_STALE_EPOCH');
      assert.equal(ack.micro_batch_id, 0);
    }
    assert.deepEqual(await inUse(), [0, 0], 'nothing ran');
    await assert.rejects(unaryCall(stage1, 'Reset', { epoch: old }), (err: grpc.ServiceError) => {
      assert.equal(err.code, grpc.status.FAILED_PRECONDITION);
      assert.match(
        err.details,
        new RegExp(`ResetRequest\\.epoch ${old} is older than this stage's coordinator epoch ${epoch}`),
      );
      return true;
    });

    // Reset adopts a larger epoch too; then the new epoch's batches run.
    await run([{ seq: 64, slot: 0, start: 0, tokens: [151849, 7] }]);
    epoch += 1;
    for (const c of [stage0, stage1]) await unaryCall(c, 'Reset', { epoch });
    for (const c of [stage0, stage1]) {
      const i = await info(c);
      assert.deepEqual([i.epoch, i.kv_tokens_in_use], [epoch, 0]);
    }
    const fine = await run([{ seq: 65, slot: 0, start: 0, tokens: [151849, 7], sample: side(65) }]);
    assert.deepEqual([fine.result.error, fine.result.results.length], [null, 1]);
    assert.equal((await pipeline.kv({ free_slots: [0] })).error, null);
    assert.deepEqual(await waitFor(inUse, (v) => v[1] === 0), [0, 0]);
  },
);

test(
  'lease: --coordinator-lease 1500 frees all KV ~1.5 s after the last request; heartbeats keep it',
  { timeout: 120_000 },
  async () => {
    const solo = await startShard('0-4', undefined, ['--coordinator-lease', '1500']);
    extraShards.push(solo);
    const client = createClient(SHARD_PROTO, SHARD_SERVICE, solo.address);
    const d = new Driver(client);
    const held = async () => (await info(client)).kv_tokens_in_use;
    try {
      assert.deepEqual([(await info(client)).lease_ms, (await info(client)).epoch], [1500, 0]);
      // Acks are written one at a time per stream: a flood of requests while this client reads nothing (so the shard's
      // writes meet backpressure) must not pile listeners up on the call.
      const flood = 20_000;
      d.raw.pause();
      for (let i = 0; i < flood; i++) d.write({ heartbeat: {}, epoch });
      await sleep(1500);
      d.raw.resume();
      for (let i = 0; i < flood; i++) assert.equal((await d.nextAck()).error, null);
      assert.deepEqual(
        solo.logs.filter((l) => /MaxListenersExceeded/.test(String(l.raw ?? ''))),
        [],
        'no MaxListenersExceededWarning',
      );
      const first = await d.run([{ seq: 70, slot: 0, start: 0, tokens: [151849, 5, 6], sample: side(70) }]);
      assert.deepEqual([first.result.error, first.result.results.length], [null, 1]);
      assert.equal(await held(), 3);
      // Heartbeats every 300 ms for 3 s (twice the lease): the KV stays.
      let lastSent = Date.now();
      for (const until = Date.now() + 3000; Date.now() < until; ) {
        lastSent = Date.now();
        assert.equal((await d.heartbeat()).error, null);
        await sleep(300);
      }
      assert.equal(await held(), 3, 'heartbeats keep the lease');
      const freed = await waitFor(held, (v) => v === 0, 4000);
      const after = Date.now() - lastSent;
      assert.equal(freed, 0, 'all KV freed after the lease');
      assert.ok(after >= 1450 && after <= 2500, `freed ${after} ms after the last request (lease 1500 ms)`);
      assert.ok(
        solo.logs.some((l) => /^coordinator lease expired: .*freed 1 slots, 3 positions$/.test(String(l.msg))),
        'the expiry is logged with what it freed',
      );
      // The epoch is kept: a late decode of it is refused for the KV it no longer holds.
      const late = await d.run([{ seq: 70, slot: 0, start: 3, tokens: [7], sample: side(70) }]);
      assert.deepEqual(late.result.refusals.map(refusal), [
        { kind: 'STAGE_ERROR_KIND_REFUSED', sequence_id: 70, status_code: 9 },
      ]);
      assert.match(late.result.refusals[0].message, /start_position 3 but slot 0 holds 0 positions/);
      assert.equal((await info(client)).epoch, epoch);
    } finally {
      d.end();
      client.close();
      solo.proc.kill('SIGTERM');
      await solo.exited;
    }
  },
);

test(
  'stage lost: a batch the next stage never acknowledged is reported STAGE_LOST with its refusals so far',
  { timeout: 120_000 },
  async () => {
    const last = await startShard('2-4');
    extraShards.push(last);
    const head = await startShard('0-2', last.address);
    extraShards.push(head);
    const client = createClient(SHARD_PROTO, SHARD_SERVICE, head.address);
    const d = new Driver(client);
    try {
      const ok = await d.run([{ seq: 80, slot: 0, start: 0, tokens: [151849, 5], sample: side(80) }]);
      assert.deepEqual([ok.result.error, ok.result.results.length], [null, 1]);
      last.proc.kill('SIGKILL');
      await last.exited;
      const lost = await d.run([
        { seq: 81, slot: 1, start: 0, tokens: [151849, 6], sample: side(81) },
        { seq: 82, slot: 2, start: 4, tokens: [7], sample: side(82) },
      ]);
      assert.equal(lost.ack.error, null, 'stage 0 ran it');
      assert.equal(lost.result.error?.kind, 'STAGE_ERROR_KIND_STAGE_LOST');
      assert.match(
        lost.result.error?.message ?? '',
        new RegExp(`^stage \\[0, 2\\) could not pass micro-batch ${lost.ack.micro_batch_id} on: Forward stream to `),
      );
      assert.deepEqual(lost.result.results, []);
      assert.deepEqual(lost.result.refusals.map(refusal), [
        { kind: 'STAGE_ERROR_KIND_REFUSED', sequence_id: 82, status_code: 9 },
      ]);
      // The last stage comes back at the same address: the very next batch reaches it (stage 0 waits for its channel
      // to reconnect rather than failing on the connection refused a moment ago).
      const args = ['shard', '--model', modelDir, '--layers', '2-4', '--listen', last.address, '--threads', '1'];
      args.push('--max-slots', String(SLOTS), '--slot-tokens', String(SLOT_TOKENS), '--allow-reply-to', sink.address);
      extraShards.push(await spawnService(args, 'shard 2-4 restarted', 60_000));
      const again = await d.run([{ seq: 83, slot: 3, start: 0, tokens: [151849, 8], sample: side(83) }]);
      assert.deepEqual([again.result.error, again.result.results.map((r) => r.sequence_id)], [null, [83]]);
    } finally {
      d.end();
      client.close();
      head.proc.kill('SIGTERM');
      await head.exited;
      for (const s of extraShards) if (s.proc.exitCode === null) s.proc.kill('SIGTERM');
    }
  },
);

test('SIGTERM: both shards end the open Forward stream, drain and exit 0', { timeout: 60_000 }, async () => {
  const ended = new Promise<void>((resolve) => pipeline.raw.once('end', resolve));
  pipeline.raw.resume();
  const started = Date.now();
  for (const s of shards) s.proc.kill('SIGTERM');
  const codes = await Promise.all(shards.map((s) => s.exited));
  assert.deepEqual(codes, [0, 0]);
  await ended;
  assert.ok(Date.now() - started < 10_000, `drained in ${Date.now() - started} ms`);
});
