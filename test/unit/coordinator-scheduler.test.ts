import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ResourceExhaustedError } from '../../services/coordinator/errors.js';
import {
  applyDecision,
  completeBatch,
  type MicroBatchPlan,
  type SchedulerConfig,
  type SchedulerState,
  schedule,
  type WaitingRequest,
} from '../../services/coordinator/scheduler.js';

const config = (c: Partial<SchedulerConfig> = {}): SchedulerConfig => ({
  stages: 2,
  maxBatchTokens: 64,
  maxBatchSeqs: 16,
  maxRunning: 100,
  ...c,
});

function initial(waiting: WaitingRequest[], kv: { slots: number; tokens: number; blockSize?: number }): SchedulerState {
  return {
    step: 0,
    running: [],
    waiting,
    inFlightBatches: 0,
    kv: {
      freeSlots: kv.slots,
      freeTokens: kv.tokens,
      totalSlots: kv.slots,
      totalTokens: kv.tokens,
      blockSize: kv.blockSize ?? 16,
    },
  };
}

const req = (id: string, promptLength: number, maxNewTokens: number, arrival: number, cachedLength = 0) => ({
  id,
  promptLength,
  maxNewTokens,
  cachedLength,
  arrival,
});

interface Trace {
  batches: MicroBatchPlan[];
  finishedAt: Map<string, number>;
  admittedAt: Map<string, number>;
  rejected: Map<string, ResourceExhaustedError>;
}

/**
 * Drives schedule() like the coordinator's loop: results come back oldest micro-batch first (a pipeline), a
 * sequence finishes after maxNewTokens sampled tokens and gives its KV back. Checks the invariants on every step.
 */
function simulate(
  state: SchedulerState,
  cfg: SchedulerConfig,
  arrivals: Map<number, WaitingRequest[]> = new Map(),
  maxSteps = 10000,
): Trace {
  const trace: Trace = { batches: [], finishedAt: new Map(), admittedAt: new Map(), rejected: new Map() };
  const inFlight: MicroBatchPlan[] = [];
  const info = new Map<string, { maxNew: number; generated: number; reserved: number; nextPrefill: number }>();
  const pending = new Map([...state.waiting].map((w) => [w.id, w]));
  for (let t = 0; t < maxSteps; t++) {
    for (const w of arrivals.get(t) ?? []) pending.set(w.id, w);
    state = { ...state, waiting: [...state.waiting, ...(arrivals.get(t) ?? [])] };
    const d = schedule(state, cfg);
    for (const r of d.reject) trace.rejected.set(r.id, r.error);
    for (const a of d.admit) {
      const w = pending.get(a.id)!;
      trace.admittedAt.set(a.id, t);
      info.set(a.id, {
        maxNew: w.maxNewTokens,
        generated: 0,
        reserved: Math.ceil(a.reserveTokens / state.kv.blockSize) * state.kv.blockSize,
        nextPrefill: a.cachedLength,
      });
    }
    if (d.batch) {
      const ids = d.batch.items.map((i) => i.seqId);
      assert.equal(new Set(ids).size, ids.length, 'a sequence twice in one micro-batch');
      for (const b of inFlight)
        for (const i of b.items) assert.ok(!ids.includes(i.seqId), `${i.seqId} already in flight in step ${b.step}`);
      assert.ok(d.batch.tokens <= cfg.maxBatchTokens && ids.length <= cfg.maxBatchSeqs);
      for (const i of d.batch.items) {
        const s = info.get(i.seqId)!;
        if (i.kind === 'prefill') {
          assert.equal(i.start, s.nextPrefill, `${i.seqId} prefill chunks are contiguous`);
          s.nextPrefill += i.count;
        }
      }
      trace.batches.push(d.batch);
      inFlight.push(d.batch);
    }
    state = applyDecision(state, d);
    assert.ok(state.inFlightBatches <= cfg.stages);
    assert.ok(state.kv.freeSlots >= 0 && state.kv.freeTokens >= 0, 'KV over-committed');
    if (!d.batch || state.inFlightBatches === cfg.stages) {
      const done = inFlight.shift();
      if (!done) {
        if (state.waiting.length === 0 && state.running.length === 0 && t > Math.max(0, ...arrivals.keys())) break;
        continue;
      }
      state = completeBatch(state, done);
      for (const i of done.items) {
        if (!i.sample) continue;
        const s = info.get(i.seqId)!;
        if (++s.generated === s.maxNew) {
          state = {
            ...state,
            running: state.running.filter((r) => r.id !== i.seqId),
            kv: { ...state.kv, freeSlots: state.kv.freeSlots + 1, freeTokens: state.kv.freeTokens + s.reserved },
          };
          trace.finishedAt.set(i.seqId, t);
        }
      }
    }
  }
  return trace;
}

test('decodes go first and a long prompt is prefilled in chunks beside them', () => {
  const cfg = config({ stages: 1, maxBatchTokens: 64 });
  const tr = simulate(initial([req('short', 4, 30, 0), req('long', 300, 2, 1)], { slots: 4, tokens: 4096 }), cfg);
  const withLong = tr.batches.filter((b) => b.items.some((i) => i.seqId === 'long' && i.kind === 'prefill'));
  assert.ok(withLong.length >= 5, 'the 300-token prompt takes several chunks');
  for (const b of withLong.slice(1)) {
    // From step 1 on, "short" has its prompt done and is decoding.
    const decode = b.items.find((i) => i.seqId === 'short');
    assert.equal(decode?.kind, 'decode', `step ${b.step}: the running decode is not stalled`);
    assert.equal(b.items[0].kind, 'decode', 'decodes come first');
    if (b !== withLong[withLong.length - 1])
      assert.equal(b.tokens, 64, 'the prefill chunk fills the rest of the budget');
  }
  const chunks = withLong.map((b) => b.items.find((i) => i.seqId === 'long')!);
  assert.deepEqual(
    chunks.map((c) => c.sample),
    chunks.map((_, k) => k === chunks.length - 1),
    'only the last chunk samples',
  );
  assert.equal(
    chunks.reduce((s, c) => s + c.count, 0),
    300,
  );
  assert.equal(tr.finishedAt.size, 2);
});

test('a cached prefix is not prefilled again', () => {
  const tr = simulate(initial([req('a', 100, 1, 0, 90)], { slots: 1, tokens: 1024 }), config());
  const first = tr.batches[0].items[0];
  assert.deepEqual(first, { seqId: 'a', kind: 'prefill', start: 90, count: 10, sample: true });
  const whole = simulate(initial([req('b', 100, 1, 0, 100)], { slots: 1, tokens: 1024 }), config());
  assert.deepEqual(whole.batches[0].items[0], { seqId: 'b', kind: 'prefill', start: 99, count: 1, sample: true });
});

test('decoders are spread over the S micro-batches in flight', () => {
  const state = initial(
    Array.from({ length: 32 }, (_, i) => req(`r${i}`, 1, 100, i, 0)),
    { slots: 64, tokens: 1 << 20 },
  );
  const cfg = config({ stages: 2, maxBatchSeqs: 64, maxBatchTokens: 512 });
  const tr = simulate(state, cfg);
  const steady = tr.batches.slice(4, 40);
  for (const b of steady) assert.equal(b.items.length, 16, `step ${b.step} holds half of the 32 decoders`);
});

test('no decode starves when there are more decoders than a micro-batch holds', () => {
  const n = 40;
  const cfg = config({ stages: 2, maxBatchSeqs: 8, maxBatchTokens: 64 });
  const arrivals = new Map<number, WaitingRequest[]>();
  for (let t = 5; t < 200; t += 7) arrivals.set(t, [req(`late${t}`, 120, 3, 1000 + t)]);
  const tr = simulate(
    initial(
      Array.from({ length: n }, (_, i) => req(`d${i}`, 2, 60, i)),
      { slots: 200, tokens: 1 << 20 },
    ),
    cfg,
    arrivals,
  );
  const last = new Map<string, number>();
  let worstGap = 0;
  for (const b of tr.batches)
    for (const i of b.items) {
      if (i.kind !== 'decode') continue;
      if (last.has(i.seqId)) worstGap = Math.max(worstGap, b.step - last.get(i.seqId)!);
      last.set(i.seqId, b.step);
    }
  // 40 decoders, 8 per micro-batch: each waits at most ~40/8 micro-batches (+1 for in-flight slack).
  assert.ok(worstGap <= 6, `a decoder waited ${worstGap} micro-batches`);
  for (let i = 0; i < n; i++) assert.ok(tr.finishedAt.has(`d${i}`));
  for (const id of [...arrivals.values()].flat().map((w) => w.id)) assert.ok(tr.finishedAt.has(id), `${id} finished`);
});

test('admission only with KV capacity, FIFO without overtaking; freed KV admits the next', () => {
  // 48 tokens = 3 blocks of 16: a needs 1 block, big 3, small 1.
  const state = initial([req('a', 10, 6, 0), req('big', 40, 8, 1), req('small', 8, 8, 2)], { slots: 3, tokens: 48 });
  const d = schedule(state, config());
  assert.deepEqual(
    d.admit.map((a) => a.id),
    ['a'],
    'big does not fit beside a, and small, which would fit, may not overtake big',
  );
  const tr = simulate(state, config());
  assert.ok(tr.admittedAt.get('big')! > tr.admittedAt.get('a')!);
  assert.ok(tr.admittedAt.get('big')! >= tr.finishedAt.get('a')!, 'big waited for a to free its KV');
  assert.ok(tr.admittedAt.get('small')! >= tr.admittedAt.get('big')!, 'small did not overtake big');
  assert.equal(tr.finishedAt.size, 3);
});

test('a request larger than the whole KV budget is rejected naming the budget; the queue moves on', () => {
  const state = initial([req('huge', 1000, 100, 0), req('ok', 10, 5, 1)], { slots: 2, tokens: 512 });
  const d = schedule(state, config());
  assert.equal(d.reject.length, 1);
  assert.ok(d.reject[0].error instanceof ResourceExhaustedError);
  assert.match(d.reject[0].error.message, /1000 prompt \+ 100 new tokens/);
  assert.match(d.reject[0].error.message, /512 tokens/);
  assert.deepEqual(
    d.admit.map((a) => a.id),
    ['ok'],
  );
});

test('maxRunning caps admitted sequences', () => {
  const state = initial(
    Array.from({ length: 5 }, (_, i) => req(`r${i}`, 4, 4, i)),
    { slots: 10, tokens: 4096 },
  );
  assert.equal(schedule(state, config({ maxRunning: 3 })).admit.length, 3);
});

test('older prompts get prefill budget first (fairness between prefills)', () => {
  const cfg = config({ stages: 1, maxBatchTokens: 50 });
  const tr = simulate(initial([req('old', 120, 1, 0), req('new', 120, 1, 1)], { slots: 4, tokens: 4096 }), cfg);
  const firstNew = tr.batches.findIndex((b) => b.items.some((i) => i.seqId === 'new'));
  const lastOld = tr.batches.findIndex((b) => b.items.some((i) => i.seqId === 'old' && i.sample));
  assert.ok(firstNew >= lastOld, 'new starts only when old has had all the budget it can use');
  assert.deepEqual(
    tr.batches[lastOld].items.map((i) => [i.seqId, i.count]),
    [
      ['old', 20],
      ['new', 30],
    ],
    'the rest of the budget goes to the next prompt',
  );
});

test('nothing new is scheduled while S micro-batches are in flight, but admission still happens', () => {
  const state: SchedulerState = {
    ...initial([req('w', 4, 4, 5)], { slots: 4, tokens: 4096 }),
    running: [{ id: 'r', promptLength: 4, computed: 4, inFlight: false, lastScheduled: 0, arrival: 0 }],
    inFlightBatches: 2,
  };
  const d = schedule(state, config({ stages: 2 }));
  assert.equal(d.batch, null);
  assert.deepEqual(
    d.admit.map((a) => a.id),
    ['w'],
  );
});
