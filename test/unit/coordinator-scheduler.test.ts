// The planner and the transition functions the engine runs (planStep → applyPlan → completeBatch), driven here as
// the engine drives them, with the invariants checked on every step: KV never over-committed, no slot held twice,
// a sequence in at most one in-flight micro-batch, prefill chunks contiguous, cached prefixes never keeping a
// request out.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ResourceExhaustedError } from '../../services/coordinator/errors.js';
import { KvManager } from '../../services/coordinator/kv-manager.js';
import { PrefixCache } from '../../services/coordinator/prefix-cache.js';
import {
  applyPlan,
  type CacheKv,
  completeBatch,
  loseAllKv,
  type MicroBatchPlan,
  planStep,
  type SchedSeq,
  type SchedulerConfig,
  type SchedulerState,
} from '../../services/coordinator/scheduler.js';

const config = (c: Partial<SchedulerConfig> = {}): SchedulerConfig => ({
  stages: 2,
  maxBatchTokens: 64,
  maxBatchSeqs: 16,
  maxRunning: 100,
  prefixCacheEntries: 0,
  minPrefixMatch: 4,
  ...c,
});

class Seq implements SchedSeq {
  history: number[];
  slot = -1;
  computed = 0;
  inFlight = false;
  lastScheduled = -1;
  cachedTokens = 0;
  pendingCopy: SchedSeq['pendingCopy'] = null;
  pinned: SchedSeq['pinned'] = null;
  ended: SchedSeq['ended'] = null;
  generated = 0;
  constructor(
    readonly id: string,
    prompt: number[],
    readonly maxNewTokens: number,
    readonly arrival: number,
  ) {
    this.history = [...prompt];
  }
  get promptLength(): number {
    return this.history.length - this.generated;
  }
}

const tokens = (n: number, salt = 0) => Array.from({ length: n }, (_, i) => 1000 + ((i * 7 + salt) % 500));
const req = (id: string, promptLength: number, maxNew: number, arrival: number, salt = arrival) =>
  new Seq(id, tokens(promptLength, salt), maxNew, arrival);

function initial(
  waiting: Seq[],
  kv: { slots: number; tokens: number },
  cfg: SchedulerConfig = config(),
): SchedulerState<Seq> {
  return {
    step: 0,
    waiting,
    running: new Map(),
    inFlight: new Map(),
    kv: new KvManager(kv),
    cache: new PrefixCache<CacheKv>({ maxEntries: Math.max(1, cfg.prefixCacheEntries), minMatch: cfg.minPrefixMatch }),
    nextCacheOwner: 1,
  };
}

interface Trace {
  batches: MicroBatchPlan[];
  finishedAt: Map<string, number>;
  admittedAt: Map<string, number>;
  rejected: Map<string, ResourceExhaustedError>;
  cachedAtAdmission: Map<string, number>;
}

function checkInvariants(state: SchedulerState<Seq>): void {
  const kv = state.kv.stats();
  assert.ok(kv.slotsInUse <= kv.slotsTotal && kv.tokensReserved <= kv.tokensTotal, 'KV over-committed');
  const slots = [...state.running.values()].map((s) => s.slot).concat(state.cache.all().map((e) => e.kv.slot));
  assert.equal(new Set(slots).size, slots.length, `a slot held twice: ${slots}`);
  assert.equal(slots.length, kv.slotsInUse, 'every held slot has one owner');
  const inFlight = [...state.inFlight.values()].flatMap((b) => b.items.map((i) => i.seqId));
  assert.equal(new Set(inFlight).size, inFlight.length, 'a sequence in two in-flight micro-batches');
}

/**
 * Drives the planner like the engine: results come back oldest micro-batch first (a pipeline), a sampled item
 * appends a token, a sequence ends after maxNewTokens and the next plan releases it.
 */
function simulate(
  state: SchedulerState<Seq>,
  cfg: SchedulerConfig,
  arrivals: Map<number, Seq[]> = new Map(),
  maxSteps = 10000,
): Trace {
  const trace: Trace = {
    batches: [],
    finishedAt: new Map(),
    admittedAt: new Map(),
    rejected: new Map(),
    cachedAtAdmission: new Map(),
  };
  const nextPrefill = new Map<string, number>();
  const lastArrival = Math.max(0, ...arrivals.keys());
  for (let t = 0; t < maxSteps; t++) {
    state.waiting.push(...(arrivals.get(t) ?? []));
    const plan = planStep(state, cfg);
    for (const r of plan.reject) trace.rejected.set(r.id, r.error);
    for (const a of plan.admit) {
      trace.admittedAt.set(a.id, t);
      trace.cachedAtAdmission.set(a.id, a.cachedLength);
      nextPrefill.set(a.id, a.cachedLength);
    }
    if (plan.batch) {
      for (const i of plan.batch.items) {
        if (i.kind !== 'prefill') continue;
        assert.equal(i.start, nextPrefill.get(i.seqId), `${i.seqId} prefill chunks are contiguous`);
        nextPrefill.set(i.seqId, i.start + i.count);
      }
      assert.ok(plan.batch.tokens <= cfg.maxBatchTokens && plan.batch.items.length <= cfg.maxBatchSeqs);
      trace.batches.push(plan.batch);
    }
    applyPlan(state, plan);
    checkInvariants(state);
    assert.ok(state.inFlight.size <= cfg.stages);
    if (!plan.batch || state.inFlight.size === cfg.stages) {
      const oldest = Math.min(...state.inFlight.keys());
      if (!Number.isFinite(oldest)) {
        if (state.waiting.length === 0 && state.running.size === 0 && t > lastArrival) break;
        continue;
      }
      for (const { item, seq } of completeBatch(state, oldest)) {
        if (!item.sample || seq.computed < seq.history.length) continue;
        seq.history.push(7);
        seq.generated++;
        if (seq.generated === seq.maxNewTokens) {
          seq.ended = 'finished';
          trace.finishedAt.set(seq.id, t);
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
    const decode = b.items.find((i) => i.seqId === 'short');
    assert.equal(decode?.kind, 'decode', `batch ${b.id}: the running decode is not stalled`);
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

test('decoders are spread over the S micro-batches in flight', () => {
  const state = initial(
    Array.from({ length: 32 }, (_, i) => req(`r${i}`, 1, 100, i)),
    { slots: 64, tokens: 1 << 20 },
  );
  const tr = simulate(state, config({ stages: 2, maxBatchSeqs: 64, maxBatchTokens: 512 }));
  for (const b of tr.batches.slice(4, 40)) assert.equal(b.items.length, 16, `batch ${b.id} holds half the decoders`);
});

test('no decode starves when there are more decoders than a micro-batch holds', () => {
  const n = 40;
  const cfg = config({ stages: 2, maxBatchSeqs: 8, maxBatchTokens: 64 });
  const arrivals = new Map<number, Seq[]>();
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
      if (last.has(i.seqId)) worstGap = Math.max(worstGap, b.id - last.get(i.seqId)!);
      last.set(i.seqId, b.id);
    }
  assert.ok(worstGap <= 6, `a decoder waited ${worstGap} micro-batches`);
  for (let i = 0; i < n; i++) assert.ok(tr.finishedAt.has(`d${i}`));
  for (const id of [...arrivals.values()].flat().map((w) => w.id)) assert.ok(tr.finishedAt.has(id), `${id} finished`);
});

test('admission only with KV capacity, FIFO without overtaking; freed KV admits the next', () => {
  const state = initial([req('a', 10, 6, 0), req('big', 40, 8, 1), req('small', 8, 8, 2)], { slots: 3, tokens: 60 });
  const plan = planStep(state, config());
  assert.deepEqual(
    plan.admit.map((a) => a.id),
    ['a'],
    'big does not fit beside a, and small, which would fit, may not overtake big',
  );
  assert.equal(plan.admit[0].slot, 0, 'the lowest free slot');
  assert.equal(plan.admit[0].reserveTokens, 16);
  const tr = simulate(state, config());
  assert.ok(tr.admittedAt.get('big')! >= tr.finishedAt.get('a')!, 'big waited for a to free its KV');
  assert.ok(tr.admittedAt.get('small')! >= tr.admittedAt.get('big')!, 'small did not overtake big');
  assert.equal(tr.finishedAt.size, 3);
});

test('a request larger than the whole KV budget is refused naming the budget; the queue moves on', () => {
  const state = initial([req('huge', 1000, 100, 0), req('ok', 10, 5, 1)], { slots: 2, tokens: 512 });
  const plan = planStep(state, config());
  assert.equal(plan.reject.length, 1);
  assert.ok(plan.reject[0].error instanceof ResourceExhaustedError);
  assert.match(plan.reject[0].error.message, /1000 prompt \+ 100 new tokens/);
  assert.match(plan.reject[0].error.message, /512 tokens/);
  assert.deepEqual(
    plan.admit.map((a) => a.id),
    ['ok'],
  );
  applyPlan(state, plan);
  assert.deepEqual(state.waiting, [], 'the refused request left the queue');
});

test('maxRunning caps admitted sequences', () => {
  const state = initial(
    Array.from({ length: 5 }, (_, i) => req(`r${i}`, 4, 4, i)),
    { slots: 10, tokens: 4096 },
  );
  assert.equal(planStep(state, config({ maxRunning: 3 })).admit.length, 3);
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
  );
});

test('nothing new is scheduled while S micro-batches are in flight, but admission still happens', () => {
  const state = initial([req('w', 4, 4, 5)], { slots: 4, tokens: 4096 });
  state.inFlight.set(1, { id: 1, items: [], tokens: 0 });
  state.inFlight.set(2, { id: 2, items: [], tokens: 0 });
  const plan = planStep(state, config({ stages: 2 }));
  assert.equal(plan.batch, null);
  assert.deepEqual(
    plan.admit.map((a) => a.id),
    ['w'],
  );
});

test('a finished prompt becomes a cached prefix in its own slot; a repeat copies it and prefills one token', () => {
  const cfg = config({ prefixCacheEntries: 4, stages: 1 });
  const state = initial([req('a', 40, 2, 0, 5)], { slots: 4, tokens: 4096 }, cfg);
  simulate(state, cfg);
  assert.equal(state.cache.size, 1);
  const entry = state.cache.all()[0];
  assert.equal(entry.tokens.length, 40);
  assert.equal(state.kv.stats().slotsInUse, 1, 'only the cache entry holds a slot');
  assert.equal(state.kv.stats().tokensReserved, 40);
  // The release that made the entry: copy from the sequence's slot to a free one, never the slot freed with it.
  const again = req('b', 40, 2, 1, 5);
  state.waiting.push(again);
  const plan = planStep(state, cfg);
  assert.equal(plan.admit[0].cachedLength, 39, 'the last prompt token still runs');
  assert.notEqual(plan.admit[0].slot, entry.kv.slot);
  assert.deepEqual(plan.batch!.items[0].copyPrefix, { fromSlot: entry.kv.slot, length: 39 });
  assert.equal(plan.batch!.items[0].start, 39);
  assert.equal(plan.batch!.items[0].count, 1);
});

test('cached prefixes never keep a live request out: they are evicted LRU before a request waits', () => {
  const cfg = config({ prefixCacheEntries: 8, stages: 1 });
  const state = initial([], { slots: 4, tokens: 4096 }, cfg);
  for (let i = 0; i < 4; i++) {
    state.waiting.push(req(`warm${i}`, 20, 1, i, 100 + i));
    simulate(state, cfg);
  }
  // The 4th prompt's copy needed a slot beside its own, so one older entry made room for it.
  assert.equal(state.cache.size, 3, 'cached prompts hold three of the four slots');
  assert.equal(state.kv.stats().slotsInUse, 3);
  const oldest = state.cache.all().sort((a, b) => a.lastUsed - b.lastUsed)[0];
  state.waiting.push(...Array.from({ length: 4 }, (_, i) => req(`new${i}`, 10, 5, 10 + i, 900 + i)));
  const plan = planStep(state, cfg);
  assert.equal(plan.admit.length, 4, 'every slot goes to a live request');
  assert.equal(plan.evict.length, 3);
  assert.equal(plan.evict[0], oldest, 'least recently used first');
  applyPlan(state, plan);
  checkInvariants(state);
});

test('an admission copying from a cached prefix keeps it: another admission of the same plan evicts others', () => {
  const cfg = config({ prefixCacheEntries: 8, stages: 1 });
  const state = initial([], { slots: 3, tokens: 4096 }, cfg);
  state.waiting.push(req('shared', 30, 1, 0, 1));
  simulate(state, cfg);
  state.waiting.push(req('other', 30, 1, 1, 2));
  simulate(state, cfg);
  const sharedEntry = state.cache
    .all()
    .find((e) => e.tokens[0] === tokens(30, 1)[0] && e.tokens[1] === tokens(30, 1)[1])!;
  // Make the shared entry the least recently used, then ask for it plus two fresh requests: 3 slots, 2 cached.
  state.cache.touch(state.cache.all().find((e) => e !== sharedEntry)!);
  state.waiting.push(new Seq('hit', [...tokens(30, 1), 5, 6], 3, 5), req('x', 8, 2, 6, 50), req('y', 8, 2, 7, 60));
  const plan = planStep(state, cfg);
  assert.deepEqual(
    plan.admit.map((a) => a.id),
    ['hit', 'x'],
    'x evicts the other entry; y must wait rather than evict the entry hit copies from',
  );
  assert.equal(plan.admit[0].hit, sharedEntry);
  assert.ok(!plan.evict.includes(sharedEntry));
  applyPlan(state, plan);
  checkInvariants(state);
});

test('after lost KV every running sequence is prefilled again up to its last sampled token, drawing nothing new', () => {
  const cfg = config({ stages: 1, maxBatchTokens: 16, prefixCacheEntries: 2 });
  const state = initial([req('a', 10, 50, 0)], { slots: 2, tokens: 4096 }, cfg);
  for (let i = 0; i < 6; i++) {
    const plan = planStep(state, cfg);
    applyPlan(state, plan);
    for (const { item, seq } of completeBatch(state, plan.batch!.id))
      if (item.sample) {
        seq.history.push(9);
        seq.generated++;
      }
  }
  const seq = state.running.get('a')!;
  assert.equal(seq.history.length, 16);
  loseAllKv(state);
  assert.equal(seq.computed, 0);
  assert.equal(state.cache.size, 0);
  const replay = planStep(state, cfg).batch!;
  assert.deepEqual(
    replay.items.map((i) => [i.start, i.count, i.sample]),
    [[0, 15, true]],
    'positions 0..14 run again; the last one samples (its token is known: the engine does not draw it)',
  );
});

// Classifier-free guidance pairs (Emu3-Gen): the conditional sequence and its unconditional partner are one unit.
class PairSeq extends Seq {
  pairOf: string | null = null;
  pairRole: 'cond' | 'uncond' | null = null;
}

function pair(id: string, promptLength: number, negativeLength: number, maxNew: number, arrival: number) {
  const c = new PairSeq(id, tokens(promptLength, arrival), maxNew, arrival);
  const u = new PairSeq(`${id}~u`, tokens(negativeLength, 999), maxNew, arrival);
  c.pairOf = u.id;
  c.pairRole = 'cond';
  u.pairOf = c.id;
  u.pairRole = 'uncond';
  return [c, u];
}

/** Like simulate, but a conditional sample appends the token to both sides; returns each pair's sampled steps. */
function simulatePairs(state: SchedulerState<Seq>, cfg: SchedulerConfig, maxSteps = 5000) {
  const batches: MicroBatchPlan[] = [];
  const released: string[][] = [];
  for (let t = 0; t < maxSteps; t++) {
    const plan = planStep(state, cfg);
    if (plan.release.length > 0) released.push(plan.release.map((r) => r.id));
    if (plan.batch) batches.push(plan.batch);
    applyPlan(state, plan);
    checkInvariants(state);
    if (!plan.batch || state.inFlight.size === cfg.stages) {
      const oldest = Math.min(...state.inFlight.keys());
      if (!Number.isFinite(oldest)) {
        if (state.waiting.length === 0 && state.running.size === 0) break;
        continue;
      }
      for (const { item, seq } of completeBatch(state, oldest)) {
        const s = seq as PairSeq;
        if (!item.sample || s.computed < s.history.length || s.pairRole === 'uncond') continue;
        const token = 2000 + s.generated;
        for (const side of s.pairOf ? [s, state.running.get(s.pairOf)!] : [s]) {
          side.history.push(token);
          side.generated++;
        }
        if (s.generated === s.maxNewTokens) s.ended = 'finished';
      }
    }
  }
  return { batches, released };
}

test('a guidance pair samples only together: adjacent items, conditional first; its prefill never samples', () => {
  const cfg = config({ stages: 2, maxBatchTokens: 16 });
  const [c, u] = pair('img', 40, 25, 12, 0);
  const chats = [req('chat', 10, 30, 1), req('chat2', 6, 30, 2), req('chat3', 5, 30, 3)];
  const state = initial([c, u, ...chats], { slots: 6, tokens: 4096 }, cfg);
  const { batches } = simulatePairs(state, cfg);
  let steps = 0;
  for (const b of batches) {
    const ci = b.items.findIndex((i) => i.seqId === 'img');
    const ui = b.items.findIndex((i) => i.seqId === 'img~u');
    for (const i of b.items) if (i.seqId.startsWith('img') && i.kind === 'prefill') assert.equal(i.sample, false);
    const sampled = b.items.filter((i) => i.seqId.startsWith('img') && i.sample);
    if (sampled.length === 0) continue;
    assert.equal(sampled.length, 2, `batch ${b.id}: both sides sample`);
    assert.equal(ui, ci + 1, `batch ${b.id}: adjacent, conditional first`);
    assert.equal(b.items[ci].start, c.history.length - 12 + steps - 1, 'the conditional step feeds its last token');
    steps++;
  }
  assert.equal(steps, 12);
  assert.ok(
    batches.some(
      (b) =>
        b.items.some((i) => i.seqId.startsWith('chat') && i.kind === 'decode') &&
        b.items.some((i) => i.seqId === 'img'),
    ),
    'chat and image sequences share micro-batches',
  );
  assert.deepEqual(c.history.slice(40), u.history.slice(25), 'the same tokens were appended to both');
});

test('a pair is admitted both or neither, waits when only one fits, and is refused whole when it never fits', () => {
  const cfg = config({ stages: 1 });
  // one slot left after a running request: the pair waits; once it is freed, both are admitted in one plan
  const [c, u] = pair('img', 20, 20, 5, 1);
  const state = initial([req('a', 4, 3, 0), c, u], { slots: 2, tokens: 4096 }, cfg);
  const first = planStep(state, cfg);
  assert.deepEqual(
    first.admit.map((a) => a.id),
    ['a'],
  );
  applyPlan(state, first);
  const trace = simulatePairs(state, cfg);
  assert.ok(trace.batches.length > 0);
  assert.equal(state.running.size, 0);
  // larger than the whole budget together (each alone would fit): both refused, naming the budget
  const [c2, u2] = pair('big', 30, 30, 40, 0);
  const s2 = initial([c2, u2], { slots: 4, tokens: 100 }, cfg);
  const plan = planStep(s2, cfg);
  assert.deepEqual(
    plan.reject.map((r) => r.id),
    ['big', 'big~u'],
  );
  assert.match(plan.reject[0].error.message, /2 sequences .* whole KV budget of 100 tokens/);
  assert.deepEqual(plan.admit, []);
  // one slot in all: refused too
  const [c3, u3] = pair('one', 5, 5, 2, 0);
  assert.equal(planStep(initial([c3, u3], { slots: 1, tokens: 4096 }, cfg), cfg).reject.length, 2);
});

test('either side ended releases both in one plan, in flight or not', () => {
  const cfg = config({ stages: 2 });
  const [c, u] = pair('img', 8, 8, 50, 0);
  const state = initial([c, u], { slots: 2, tokens: 4096 }, cfg);
  for (let i = 0; i < 3; i++) applyPlan(state, planStep(state, cfg));
  assert.ok(u.inFlight || c.inFlight);
  c.ended = 'aborted';
  const plan = planStep(state, cfg);
  assert.deepEqual(plan.release.map((r) => r.id).sort(), ['img', 'img~u']);
  assert.equal(plan.batch, null, 'nothing of the pair is scheduled again');
  applyPlan(state, plan);
  assert.equal(state.kv.stats().slotsInUse, 0);
  // an unconditional side that failed (e.g. refused) takes its conditional side with it
  const [c2, u2] = pair('img2', 8, 8, 50, 0);
  const s2 = initial([c2, u2], { slots: 2, tokens: 4096 }, cfg);
  applyPlan(s2, planStep(s2, cfg));
  u2.ended = 'aborted';
  assert.deepEqual(
    planStep(s2, cfg)
      .release.map((r) => r.id)
      .sort(),
    ['img2', 'img2~u'],
  );
});

test('the unconditional prompt of a finished pair is a cached prefix: the next pair of that size copies it', () => {
  const cfg = config({ stages: 1, prefixCacheEntries: 4, minPrefixMatch: 4 });
  const [c, u] = pair('one', 12, 30, 4, 0);
  const state = initial([c, u], { slots: 8, tokens: 4096 }, cfg);
  simulatePairs(state, cfg);
  const [c2, u2] = pair('two', 14, 30, 4, 1);
  state.waiting.push(c2, u2);
  const plan = planStep(state, cfg);
  const au = plan.admit.find((a) => a.id === 'two~u')!;
  assert.equal(au.cachedLength, 29, 'all but the last negative-prompt token come from the cache');
  const ac = plan.admit.find((a) => a.id === 'two')!;
  assert.equal(ac.cachedLength, 0);
  // the unconditional side has nothing left to prefill: its first item is the sampled step, carrying the copy
  const item = plan.batch!.items.find((i) => i.seqId === 'two~u');
  assert.equal(item, undefined, 'it waits for the conditional side before its first (sampled) item');
  applyPlan(state, plan);
  const tr = simulatePairs(state, cfg);
  const firstU = tr.batches.flatMap((b) => b.items).find((i) => i.seqId === 'two~u')!;
  assert.deepEqual(
    [firstU.kind, firstU.start, firstU.sample, firstU.copyPrefix],
    ['decode', 29, true, { fromSlot: firstU.copyPrefix!.fromSlot, length: 29 }],
  );
});

test('after lost KV a pair is prefilled again to one short of its history, then samples together', () => {
  const cfg = config({ stages: 1, maxBatchTokens: 64 });
  const [c, u] = pair('img', 10, 6, 30, 0);
  const state = initial([c, u], { slots: 2, tokens: 4096 }, cfg);
  const partial = simulatePairs(state, cfg, 12);
  assert.ok(partial.batches.length > 0 && c.generated > 0);
  loseAllKv(state);
  const plan = planStep(state, cfg);
  const items = plan.batch!.items;
  assert.deepEqual(
    items.map((i) => [i.seqId, i.kind, i.start, i.count, i.sample]),
    [
      ['img', 'prefill', 0, c.history.length - 1, false],
      ['img~u', 'prefill', 0, u.history.length - 1, false],
    ],
  );
  applyPlan(state, plan);
  completeBatch(state, plan.batch!.id);
  const next = planStep(state, cfg).batch!.items;
  assert.deepEqual(
    next.map((i) => [i.seqId, i.start, i.sample]),
    [
      ['img', c.history.length - 1, true],
      ['img~u', u.history.length - 1, true],
    ],
  );
});
