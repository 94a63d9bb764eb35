// The coordinator's one decision per step (vLLM v1's schedule() idea). `planStep` is a pure function from the
// coordinator's state to a plan in plain data: which requests are refused, which ended sequences release their KV
// (and which of their prompts become cached prefixes, in which slot), which cached prefixes are evicted, which
// waiting requests are admitted (with their slot and any prefix hit to copy), and the next micro-batch. The engine
// only carries the plan out (`applyPlan`, then the messages) and feeds results back (`completeBatch`, `loseAllKv`);
// tests drive these same functions. No I/O here.
//
// Policy:
// * up to S micro-batches in flight for S stages; a sequence is in at most one in-flight micro-batch;
// * decodes first, so a long prefill never stalls running answers; the decoding set is spread over the S
//   micro-batches (about D/S each) and rotated least-recently-scheduled first, so no decode starves;
// * prefill in chunks from the rest of the per-batch token budget, oldest request first;
// * admission FIFO without overtaking, each admitted request reserving a slot and prompt + max_new_tokens positions
//   up front, so the shards are never over-committed and nothing is preempted; cached prefixes are evicted (least
//   recently used first) before a request is kept waiting, so they never keep a live request out; a request that
//   could never fit is refused with ResourceExhausted naming the budget;
// * a classifier-free-guidance pair (Emu3-Gen: the conditional sequence and its unconditional partner, `pairOf`) is
//   one unit: admitted both or neither, prefilled each on its own but never to its last token, then every sampled
//   step runs both as adjacent items of one micro-batch (conditional first), and when either ends both are released.
import { ResourceExhaustedError } from './errors.js';
import type { KvManager } from './kv-manager.js';
import type { PrefixCache, PrefixEntry } from './prefix-cache.js';

export interface SchedulerConfig {
  /** Pipeline stages S: up to S micro-batches in flight. */
  stages: number;
  /** Tokens per micro-batch (decodes count 1 each, prefill chunks their length). */
  maxBatchTokens: number;
  /** Sequences per micro-batch. */
  maxBatchSeqs: number;
  /** Sequences admitted (holding KV) at once. */
  maxRunning: number;
  /** Cached prefixes kept at once; 0 turns the prefix cache off. */
  prefixCacheEntries: number;
  /** Shorter prompts are not cached (and shorter shared prefixes are prefilled again rather than copied). */
  minPrefixMatch: number;
}

/** The KV of a cached prefix: the slot holding its positions [0, tokens.length). */
export interface CacheKv {
  owner: string;
  slot: number;
}

/** What the scheduler knows of one request; the engine's sequence objects carry these fields. */
export interface SchedSeq {
  readonly id: string;
  /** Prompt, then every generated token (the engine appends). */
  readonly history: readonly number[];
  readonly promptLength: number;
  readonly maxNewTokens: number;
  /** Arrival order; lower is older. */
  readonly arrival: number;
  /** KV slot on every stage while admitted; -1 before. */
  slot: number;
  /** Positions whose KV exists on every stage (cached prefix + prefilled + fed decode tokens). */
  computed: number;
  inFlight: boolean;
  /** Step of its last micro-batch; -1 if never scheduled. */
  lastScheduled: number;
  /** Prompt positions taken from the prefix cache at admission. */
  cachedTokens: number;
  /** A prefix to copy into the slot before the sequence's first item runs. */
  pendingCopy: { fromSlot: number; length: number } | null;
  /** The cached prefix being copied from, pinned until the item carrying the copy has completed. */
  pinned: PrefixEntry<CacheKv> | null;
  /** Set when the answer is over: the next plan releases its KV ('finished' may leave its prompt cached). */
  ended: 'finished' | 'aborted' | null;
  /** A guidance pair: the partner's id, and which side this is. Unset for a sequence on its own. */
  readonly pairOf?: string | null;
  readonly pairRole?: 'cond' | 'uncond' | null;
}

export interface SchedulerState<S extends SchedSeq = SchedSeq> {
  /** Counter of micro-batches; the next one gets step + 1 as its id. */
  step: number;
  /** Oldest first. */
  waiting: S[];
  running: Map<string, S>;
  inFlight: Map<number, MicroBatchPlan>;
  kv: KvManager;
  cache: PrefixCache<CacheKv>;
  /** Owner names for cache entries. */
  nextCacheOwner: number;
}

export interface BatchItem {
  seqId: string;
  kind: 'prefill' | 'decode';
  slot: number;
  /** Position of the first token in this item. */
  start: number;
  count: number;
  /** The last stage returns candidates for this sequence (the last prefill chunk, or a decode). */
  sample: boolean;
  /** Copy these leading positions from another slot first (a prefix-cache hit). */
  copyPrefix: { fromSlot: number; length: number } | null;
}

export interface MicroBatchPlan {
  id: number;
  items: BatchItem[];
  tokens: number;
}

export interface Admission {
  id: string;
  slot: number;
  /** Positions reserved on every stage: prompt + max_new_tokens. */
  reserveTokens: number;
  /** Prompt positions taken from a cached prefix (0: none). */
  cachedLength: number;
  hit: PrefixEntry<CacheKv> | null;
}

/** A cached prefix made from an ended sequence's prompt: copy `length` positions from its slot into `toSlot`. */
export interface CacheInsert {
  owner: string;
  tokens: number[];
  fromSlot: number;
  toSlot: number;
}

export interface Release {
  id: string;
  slot: number;
  cacheInsert: CacheInsert | null;
}

export interface StepPlan {
  reject: { id: string; error: ResourceExhaustedError }[];
  /** Cached prefixes dropped (their slots are freed before any copy of this plan). */
  evict: PrefixEntry<CacheKv>[];
  release: Release[];
  admit: Admission[];
  batch: MicroBatchPlan | null;
}

/**
 * Positions to prefill before decoding: the prompt, or after a lost KV everything but the last sampled token. A pair's
 * sequences stop one short of their history: that last token runs as the pair's sampled step, both together.
 */
export function prefillTarget(s: SchedSeq): number {
  if (s.pairOf) return s.history.length - 1;
  return Math.max(s.promptLength, s.history.length - 1);
}

/** How a running sequence ends: its own end, or for one of a pair its partner's (both are released together). */
export function endedOf(state: SchedulerState, s: SchedSeq): SchedSeq['ended'] {
  if (s.ended || !s.pairOf) return s.ended;
  return state.running.get(s.pairOf)?.ended ?? null;
}

/** Free KV as the plan spends it, and the evictions it makes, without touching the real state. */
class Budget {
  readonly freeSlots: number[];
  freeTokens: number;
  readonly evicted = new Set<PrefixEntry<CacheKv>>();
  /** Entries this plan copies from (admissions' hits): never evicted by the same plan. */
  readonly kept = new Set<PrefixEntry<CacheKv>>();
  cacheSize: number;
  readonly evict: PrefixEntry<CacheKv>[] = [];

  constructor(private readonly state: SchedulerState) {
    this.freeSlots = state.kv.freeSlots();
    this.freeTokens = state.kv.freeTokens;
    this.cacheSize = state.cache.size;
  }

  live(e: PrefixEntry<CacheKv>): boolean {
    return !this.evicted.has(e);
  }

  /** Evicts one entry (the given one, or the least recently used unpinned one but `keep`); false when none. */
  evictOne(keep: PrefixEntry<CacheKv> | null, which?: PrefixEntry<CacheKv>): boolean {
    const victim = which ?? this.state.cache.lruCandidate((e) => this.live(e) && e !== keep && !this.kept.has(e));
    if (!victim) return false;
    this.evicted.add(victim);
    this.evict.push(victim);
    this.cacheSize--;
    const held = this.state.kv.holding(victim.kv.owner);
    this.freeSlots.push(victim.kv.slot);
    this.freeSlots.sort((a, b) => a - b);
    this.freeTokens += held?.tokens ?? victim.tokens.length;
    return true;
  }

  /** Evicts until `slots` slots and `tokens` positions are free; false (nothing more to evict) when they cannot be. */
  makeRoom(tokens: number, keep: PrefixEntry<CacheKv> | null, slots = 1): boolean {
    while (this.freeSlots.length < slots || this.freeTokens < tokens) if (!this.evictOne(keep)) return false;
    return true;
  }

  takeSlot(tokens: number): number {
    this.freeTokens -= tokens;
    return this.freeSlots.shift()!;
  }
}

export function planStep<S extends SchedSeq>(state: SchedulerState<S>, config: SchedulerConfig): StepPlan {
  const budget = new Budget(state);
  const release = planReleases(state, config, budget);
  const { admit, reject } = planAdmissions(state, config, budget);
  const batch =
    state.inFlight.size < config.stages
      ? planBatch(state.step + 1, [...state.running.values()], admit, state, config)
      : null;
  return { reject, evict: budget.evict, release, admit, batch };
}

function planReleases(state: SchedulerState, config: SchedulerConfig, budget: Budget): Release[] {
  const releases: Release[] = [];
  const ended = [...state.running.values()].filter((s) => endedOf(state, s));
  // Cache inserts first, from slots free before any ended sequence's own slot is given back (a copy's target must
  // not be a slot freed by the same command).
  let owner = state.nextCacheOwner;
  for (const s of ended) {
    let cacheInsert: CacheInsert | null = null;
    if (endedOf(state, s) === 'finished' && cacheable(s, state, config, budget)) {
      const tokens = s.history.slice(0, s.promptLength);
      for (const e of state.cache.extendedBy(tokens)) if (budget.live(e)) budget.evictOne(null, e);
      while (budget.cacheSize >= config.prefixCacheEntries && budget.evictOne(null)) {}
      if (budget.cacheSize < config.prefixCacheEntries && budget.makeRoom(tokens.length, null)) {
        cacheInsert = { owner: `cache:${owner++}`, tokens, fromSlot: s.slot, toSlot: budget.takeSlot(tokens.length) };
        budget.cacheSize++;
      }
    }
    releases.push({ id: s.id, slot: s.slot, cacheInsert });
  }
  for (const r of releases) {
    budget.freeSlots.push(r.slot);
    budget.freeTokens += state.kv.holding(r.id)?.tokens ?? 0;
  }
  budget.freeSlots.sort((a, b) => a - b);
  return releases;
}

function cacheable(s: SchedSeq, state: SchedulerState, config: SchedulerConfig, budget: Budget): boolean {
  if (config.prefixCacheEntries <= 0 || s.computed < s.promptLength) return false;
  if (s.promptLength < config.minPrefixMatch + 1) return false;
  const existing = state.cache.match(s.history, s.promptLength, (e) => budget.live(e));
  return !(existing && existing.length === s.promptLength);
}

function planAdmissions(
  state: SchedulerState,
  config: SchedulerConfig,
  budget: Budget,
): Pick<StepPlan, 'admit' | 'reject'> {
  const admit: Admission[] = [];
  const reject: StepPlan['reject'] = [];
  const ending = [...state.running.values()].filter((s) => endedOf(state, s)).length;
  let runningCount = state.running.size - ending;
  const taken = new Set<string>();
  for (const w of state.waiting) {
    if (taken.has(w.id)) continue;
    const partner = w.pairOf ? state.waiting.find((x) => x.id === w.pairOf) : undefined;
    if (partner) {
      taken.add(partner.id);
      const r = admitPair(state, config, budget, w, partner, runningCount);
      if (r === 'wait') break;
      if ('error' in r) reject.push({ id: w.id, error: r.error }, { id: partner.id, error: r.error });
      else {
        admit.push(...r.admit);
        runningCount += 2;
      }
      continue;
    }
    const need = w.promptLength + w.maxNewTokens;
    if (!state.kv.fitsAtAll(need)) {
      reject.push({
        id: w.id,
        error: new ResourceExhaustedError(
          `request needs ${w.promptLength} prompt + ${w.maxNewTokens} new tokens of KV, more than the whole KV budget of ` +
            `${state.kv.tokensTotal} tokens in ${state.kv.slotsTotal} slots (shard --kv-budget); lower max_new_tokens or the prompt`,
        ),
      });
      continue;
    }
    if (runningCount >= config.maxRunning) break;
    // The last prompt token always runs: its logits give the first new token.
    const found =
      config.prefixCacheEntries > 0 ? state.cache.match(w.history, w.promptLength - 1, (e) => budget.live(e)) : null;
    const hit = found && found.length >= config.minPrefixMatch ? found : null;
    if (!budget.makeRoom(need, hit?.entry ?? null)) break;
    if (hit) budget.kept.add(hit.entry);
    admit.push({
      id: w.id,
      slot: budget.takeSlot(need),
      reserveTokens: need,
      cachedLength: hit?.length ?? 0,
      hit: hit?.entry ?? null,
    });
    runningCount++;
  }
  return { admit, reject };
}

/** Both sequences of a guidance pair, or neither (they wait, or are refused together). */
function admitPair(
  state: SchedulerState,
  config: SchedulerConfig,
  budget: Budget,
  a: SchedSeq,
  b: SchedSeq,
  runningCount: number,
): 'wait' | { error: ResourceExhaustedError } | { admit: Admission[] } {
  const needs = [a.promptLength + a.maxNewTokens, b.promptLength + b.maxNewTokens];
  const total = needs[0] + needs[1];
  if (state.kv.slotsTotal < 2 || total > state.kv.tokensTotal || config.maxRunning < 2)
    return {
      error: new ResourceExhaustedError(
        `an image request needs 2 sequences (with guidance) of ${needs[0]} and ${needs[1]} tokens of KV, more than the ` +
          `whole KV budget of ${state.kv.tokensTotal} tokens in ${state.kv.slotsTotal} slots (shard --kv-budget)`,
      ),
    };
  if (runningCount + 2 > config.maxRunning) return 'wait';
  const hits = [a, b].map((s) => {
    const found =
      config.prefixCacheEntries > 0 ? state.cache.match(s.history, s.promptLength - 1, (e) => budget.live(e)) : null;
    return found && found.length >= config.minPrefixMatch ? found : null;
  });
  for (const h of hits) if (h) budget.kept.add(h.entry);
  if (!budget.makeRoom(total, null, 2)) return 'wait';
  return {
    admit: [a, b].map((s, i) => ({
      id: s.id,
      slot: budget.takeSlot(needs[i]),
      reserveTokens: needs[i],
      cachedLength: hits[i]?.length ?? 0,
      hit: hits[i]?.entry ?? null,
    })),
  };
}

interface Schedulable {
  id: string;
  slot: number;
  computed: number;
  target: number;
  inFlight: boolean;
  lastScheduled: number;
  arrival: number;
  copy: { fromSlot: number; length: number } | null;
  pairOf: string | null;
  pairRole: 'cond' | 'uncond' | null;
}

function planBatch(
  id: number,
  running: readonly SchedSeq[],
  admitted: readonly Admission[],
  state: SchedulerState,
  config: SchedulerConfig,
): MicroBatchPlan | null {
  const seqs: Schedulable[] = running
    .filter((s) => !endedOf(state, s))
    .map((s) => ({
      id: s.id,
      slot: s.slot,
      computed: s.computed,
      target: prefillTarget(s),
      inFlight: s.inFlight,
      lastScheduled: s.lastScheduled,
      arrival: s.arrival,
      copy: s.pendingCopy,
      pairOf: s.pairOf ?? null,
      pairRole: s.pairRole ?? null,
    }));
  for (const a of admitted) {
    const w = state.waiting.find((x) => x.id === a.id)!;
    seqs.push({
      id: a.id,
      slot: a.slot,
      computed: a.cachedLength,
      target: prefillTarget(w),
      inFlight: false,
      lastScheduled: -1,
      arrival: w.arrival,
      copy: a.hit ? { fromSlot: a.hit.kv.slot, length: a.cachedLength } : null,
      pairOf: w.pairOf ?? null,
      pairRole: w.pairRole ?? null,
    });
  }
  const items: BatchItem[] = [];
  let tokens = 0;
  const decoding = seqs.filter((s) => s.computed >= s.target);
  // Decode units: a sequence on its own, or a pair (conditional first) once both sides are ready to sample.
  const byId = new Map(seqs.map((s) => [s.id, s]));
  const units: Schedulable[][] = [];
  for (const s of decoding) {
    if (!s.pairOf) units.push([s]);
    else if (s.pairRole === 'cond') {
      const u = byId.get(s.pairOf);
      if (u && u.computed >= u.target) units.push([s, u]);
    }
  }
  const unitCap = Math.min(Math.ceil(units.length / config.stages), config.maxBatchSeqs, config.maxBatchTokens);
  const ready = units
    .filter((u) => u.every((s) => !s.inFlight))
    .sort((a, b) => a[0].lastScheduled - b[0].lastScheduled || a[0].arrival - b[0].arrival);
  let taken = 0;
  for (const unit of ready) {
    if (taken >= unitCap) break;
    if (items.length + unit.length > config.maxBatchSeqs || tokens + unit.length > config.maxBatchTokens) continue;
    taken++;
    for (const s of unit) {
      items.push({
        seqId: s.id,
        kind: 'decode',
        slot: s.slot,
        start: s.computed,
        count: 1,
        sample: true,
        copyPrefix: s.copy,
      });
      tokens++;
    }
  }
  const prefilling = seqs.filter((s) => !s.inFlight && s.computed < s.target).sort((a, b) => a.arrival - b.arrival);
  for (const s of prefilling) {
    if (tokens >= config.maxBatchTokens || items.length >= config.maxBatchSeqs) break;
    const count = Math.min(s.target - s.computed, config.maxBatchTokens - tokens);
    items.push({
      seqId: s.id,
      kind: 'prefill',
      slot: s.slot,
      start: s.computed,
      count,
      // A replayed prefill (after lost KV) ends one short of the history: its next token is known, nothing to draw.
      // A pair's prefill never samples: its sampled steps run both sides together.
      sample: !s.pairOf && s.computed + count === s.target,
      copyPrefix: s.copy,
    });
    tokens += count;
  }
  return items.length === 0 ? null : { id, items, tokens };
}

/** Carries a plan out on the state (KV, cache, queue, running set, in-flight batches). */
export function applyPlan<S extends SchedSeq>(state: SchedulerState<S>, plan: StepPlan): void {
  const gone = new Set(plan.reject.map((r) => r.id));
  for (const e of plan.evict) {
    state.cache.remove(e);
    state.kv.release(e.kv.owner);
  }
  for (const r of plan.release) {
    const s = state.running.get(r.id)!;
    if (r.cacheInsert) {
      const c = r.cacheInsert;
      state.kv.take(c.owner, c.toSlot, c.tokens.length);
      const inserted = state.cache.insert(c.tokens, { owner: c.owner, slot: c.toSlot });
      if (!inserted.adopted || inserted.evicted.length > 0)
        throw new Error(`applyPlan: the cache did not take ${c.owner} as planned`);
      state.nextCacheOwner++; // the plan numbered its inserts from state.nextCacheOwner, in this order
    }
    unpin(state, s);
    state.kv.release(r.id);
    state.running.delete(r.id);
  }
  for (const a of plan.admit) {
    const i = state.waiting.findIndex((w) => w.id === a.id);
    const s = state.waiting[i];
    state.waiting.splice(i, 1);
    state.kv.take(a.id, a.slot, a.reserveTokens);
    s.slot = a.slot;
    s.computed = a.cachedLength;
    s.cachedTokens = a.cachedLength;
    if (a.hit) {
      state.cache.pin(a.hit);
      state.cache.touch(a.hit);
      s.pinned = a.hit;
      s.pendingCopy = { fromSlot: a.hit.kv.slot, length: a.cachedLength };
    }
    state.running.set(s.id, s);
  }
  if (gone.size > 0) state.waiting = state.waiting.filter((w) => !gone.has(w.id));
  if (plan.batch) {
    state.step = plan.batch.id;
    state.inFlight.set(plan.batch.id, plan.batch);
    for (const item of plan.batch.items) {
      const s = state.running.get(item.seqId)!;
      s.inFlight = true;
      s.lastScheduled = plan.batch.id;
      if (item.copyPrefix) s.pendingCopy = null;
    }
  }
}

/**
 * A micro-batch's results are in: its sequences are free again and their KV has grown; the prefixes they copied are
 * unpinned. Returns the items of sequences still running (cancelled ones are skipped).
 */
export function completeBatch<S extends SchedSeq>(
  state: SchedulerState<S>,
  batchId: number,
): { item: BatchItem; seq: S }[] {
  const plan = state.inFlight.get(batchId);
  if (!plan) return [];
  state.inFlight.delete(batchId);
  const done: { item: BatchItem; seq: S }[] = [];
  for (const item of plan.items) {
    const s = state.running.get(item.seqId);
    if (!s || s.ended) continue;
    s.inFlight = false;
    s.computed = item.start + item.count;
    if (!s.pendingCopy) unpin(state, s);
    done.push({ item, seq: s });
  }
  return done;
}

/** A micro-batch did not run (its sequences are ended by the caller, or run again): they are no longer in flight. */
export function dropBatch<S extends SchedSeq>(state: SchedulerState<S>, batchId: number): S[] {
  const plan = state.inFlight.get(batchId);
  if (!plan) return [];
  state.inFlight.delete(batchId);
  const seqs: S[] = [];
  for (const item of plan.items) {
    const s = state.running.get(item.seqId);
    if (!s) continue;
    s.inFlight = false;
    seqs.push(s);
  }
  return seqs;
}

/**
 * Every stage's KV is lost (a stage died; the pipeline is reset): running sequences keep their slot reservation and
 * token history and will be prefilled again from position 0; cached prefixes are dropped; nothing is in flight.
 */
export function loseAllKv<S extends SchedSeq>(state: SchedulerState<S>): void {
  state.inFlight.clear();
  for (const s of state.running.values()) {
    s.inFlight = false;
    s.computed = 0;
    s.pendingCopy = null;
    unpin(state, s);
  }
  for (const e of state.cache.all()) {
    state.cache.remove(e);
    state.kv.release(e.kv.owner);
  }
}

/** Removes a request that is still waiting (cancelled before admission); undefined if it is not waiting. */
export function dropWaiting<S extends SchedSeq>(state: SchedulerState<S>, id: string): S | undefined {
  const i = state.waiting.findIndex((w) => w.id === id);
  return i < 0 ? undefined : state.waiting.splice(i, 1)[0];
}

function unpin(state: SchedulerState, s: SchedSeq): void {
  if (!s.pinned) return;
  state.cache.unpin(s.pinned);
  s.pinned = null;
}
