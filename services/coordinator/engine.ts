// The coordinator's engine loop (DESIGN.md §1, §4, §5): requests wait in the bounded admission queue; on every change
// (a new request, a result, a cancel) `pump` asks the pure scheduler what to do, carries out its decision (reserve KV,
// pin a cached prefix, send a micro-batch down the pipeline), and on each StepResult samples the next token of every
// sequence with its own seeded sampler, detokenizes, applies stop strings and ends sequences, freeing their KV on
// every stage with a KvCommand sent in stream order. No I/O here beyond the Transport it is given, so the whole loop
// runs in unit tests against an in-process pipeline.
//
// KV bookkeeping. Each live sequence owns one allocator reservation (a slot on every stage + blocks for prompt +
// max_new_tokens). A finished sequence's prompt is kept as a cached prefix: its first P positions are copied into a
// slot of the cache's own (KvCommand.copies), and the sequence's slot is freed, so a shard's kv_tokens_in_use is
// exactly the live sequences' positions plus the cached prompts' lengths, and kv_slots_in_use the live sequences plus
// the cache entries (GetModelInfo and `stats()` report the cache's share). Cancelled or expired sequences are not
// cached. A later prompt sharing a cached prefix starts with BatchItem.copy_prefix and skips those positions.

import {
  type ForwardRequest,
  type ForwardResponse,
  float32Values,
  int32Values,
  type SamplingSide,
  type StepResult,
} from '../../lib/rpc/shard-wire.js';
import type { StreamDetokenizer } from '../../lib/tokenizer/stream.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { KvAllocator } from './kv-allocator.js';
import type { Candidates } from './logits.js';
import { PrefixCache, type PrefixEntry } from './prefix-cache.js';
import { AdmissionQueue } from './queue.js';
import type { ValidSampling } from './request-validation.js';
import { type Distribution, type LastStagePlan, planLastStage, RequestSampler, topAlternatives } from './sampler.js';
import {
  type MicroBatchPlan,
  type RunningSeq,
  type SchedulerConfig,
  schedule,
  type WaitingRequest,
} from './scheduler.js';
import { StopMatcher } from './stop.js';

export type FinishReason = 'FINISH_REASON_EOS' | 'FINISH_REASON_LENGTH' | 'FINISH_REASON_STOP';

export interface TokenLogprob {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

export type EngineEvent =
  | { type: 'admitted'; queueMs: number }
  | { type: 'delta'; text: string; tokenIds: number[]; logprobs: TokenLogprob[] }
  | {
      type: 'final';
      finishReason: FinishReason;
      stopString: string;
      usage: { promptTokens: number; cachedTokens: number; completionTokens: number };
      /** From admission to the first token, and from the first to the last token (ms). */
      firstTokenAt: number;
      decodeMs: number;
    }
  | { type: 'error'; error: Error };

export interface GenerateJob {
  prompt: readonly number[];
  maxNewTokens: number;
  sampling: ValidSampling;
  /** The seed in force (the request's or one the server chose). */
  seed: number;
  topLogprobs: number;
  returnTokenIds: boolean;
  onEvent(e: EngineEvent): void;
}

/** Where micro-batches and KV commands go, in order (stage 0's Forward stream). */
export interface Transport {
  /** The transport stamps the coordinator's epoch on it. */
  send(request: PipelineRequest): void;
}

/** A ForwardRequest without its epoch. */
export type PipelineRequest = ForwardRequest extends infer R ? (R extends unknown ? Omit<R, 'epoch'> : never) : never;

export interface EngineOptions {
  scheduler: SchedulerConfig;
  /** The pipeline's KV: the smallest stage's slots and token budget. */
  kv: { slots: number; tokens: number };
  blockSize: number;
  maxQueue: number;
  /** Cached prefixes kept at once; 0 turns the prefix cache off. */
  prefixCacheEntries: number;
  /** Shorter shared prefixes are prefilled again rather than copied. */
  minPrefixMatch: number;
  tokenizer: Emu3Tokenizer;
  /** Visual ids [begin, end) are masked out of text answers (MASK_KIND_TEXT on the last stage). */
  eosId: number;
  /** ResultSink address the last stage answers to. */
  replyTo: string;
  /**
   * A micro-batch failed on some stage (a stage died, a stream broke, or the stage refused it). Given: the engine
   * suspends, and the caller brings the pipeline back (Reset every stage) and calls resume(); each sequence of the
   * batch is retried up to `maxRecoveries` times before it fails. Not given: the batch's sequences fail at once.
   */
  onPipelineFailure?: (reason: string) => void;
  /** Default 3. */
  maxRecoveries?: number;
  now?: () => number;
}

export interface EngineStats {
  queued: number;
  running: number;
  inFlightBatches: number;
  kvSlotsInUse: number;
  kvTokensReserved: number;
  cacheEntries: number;
  /** Positions held by cached prefixes on every stage (what shards report beyond live sequences). */
  cacheTokens: number;
  /** Per stage: milliseconds computing, summed over StepResults. */
  stageComputeMs: number[];
  microBatches: number;
}

interface CacheKv {
  owner: string;
  slot: number;
}

class Sequence {
  readonly history: number[];
  readonly promptLength: number;
  generated = 0;
  slot = -1;
  computed = 0;
  inFlight = false;
  lastScheduled = -1;
  cachedTokens = 0;
  /** A cached prefix to copy before the first item runs; pinned until that item's results are in. */
  copyFrom: { entry: PrefixEntry<CacheKv>; length: number } | null = null;
  /** Pipeline failures this sequence has been through (DESIGN.md §6). */
  recoveries = 0;
  pinned: PrefixEntry<CacheKv> | null = null;
  admittedAt = 0;
  firstTokenAt = 0;
  readonly sampler: RequestSampler;
  readonly plan: LastStagePlan;
  readonly detok: StreamDetokenizer;
  readonly stop: StopMatcher;
  readonly penalised: Set<number> | null;

  constructor(
    readonly id: string,
    readonly num: number,
    readonly job: GenerateJob,
    readonly arrival: number,
    readonly enqueuedAt: number,
    tokenizer: Emu3Tokenizer,
  ) {
    this.history = [...job.prompt];
    this.promptLength = job.prompt.length;
    const s = job.sampling;
    const truncation = { temperature: s.temperature, topK: s.topK, topP: s.topP, minP: s.minP };
    this.sampler = new RequestSampler(truncation, job.seed);
    this.plan = planLastStage(truncation, job.topLogprobs);
    this.detok = tokenizer.stream({ skipSpecialTokens: true });
    this.stop = new StopMatcher(s.stop);
    this.penalised = s.repetitionPenalty !== 1 ? new Set(job.prompt) : null;
  }
}

export class Engine {
  private readonly queue: AdmissionQueue<Sequence>;
  private readonly allocator: KvAllocator;
  private cache: PrefixCache<CacheKv>;
  private readonly running = new Map<string, Sequence>();
  private readonly inFlight = new Map<number, MicroBatchPlan>();
  private readonly now: () => number;
  private step = 0;
  private nextSeq = 1;
  private nextCacheOwner = 1;
  private arrivals = 0;
  private readonly stageComputeMs: number[] = [];
  private microBatches = 0;
  private stopped: Error | null = null;
  /** The pipeline is down (DESIGN.md §6): nothing is sent until resume(); sequences keep their token history. */
  private down = false;

  constructor(
    private readonly opts: EngineOptions,
    private readonly transport: Transport,
  ) {
    this.queue = new AdmissionQueue(opts.maxQueue, '--max-queue');
    this.allocator = new KvAllocator(opts.kv, opts.blockSize);
    this.cache = new PrefixCache({ maxEntries: Math.max(1, opts.prefixCacheEntries), minMatch: opts.minPrefixMatch });
    this.now = opts.now ?? (() => performance.now());
  }

  /** Queues a request; throws ResourceExhaustedError when the queue is full. Returns a cancel function. */
  submit(job: GenerateJob): { id: string; cancel: () => void } {
    if (this.stopped) throw this.stopped;
    const num = this.nextSeq++;
    const id = String(num);
    const seq = new Sequence(id, num, job, this.arrivals++, this.now(), this.opts.tokenizer);
    this.queue.push(id, seq, seq.enqueuedAt);
    this.pump();
    return { id, cancel: () => this.cancel(id) };
  }

  /** Ends a request without an answer (client cancel, deadline, disconnect): frees its KV on every stage. */
  cancel(id: string): void {
    if (this.queue.remove(id)) return;
    const seq = this.running.get(id);
    if (!seq) return;
    this.release(seq, false);
    this.pump();
  }

  stats(): EngineStats {
    const kv = this.allocator.stats();
    let cacheTokens = 0;
    for (const e of this.cache.all()) cacheTokens += e.tokens.length;
    return {
      queued: this.queue.size,
      running: this.running.size,
      inFlightBatches: this.inFlight.size,
      kvSlotsInUse: kv.slotsInUse,
      kvTokensReserved: kv.tokensReserved,
      cacheEntries: this.opts.prefixCacheEntries > 0 ? this.cache.size : 0,
      cacheTokens,
      stageComputeMs: [...this.stageComputeMs],
      microBatches: this.microBatches,
    };
  }

  /** The pipeline broke: every waiting and running request fails with `error`; nothing more is accepted. */
  fail(error: Error): void {
    this.stopped = error;
    for (const q of this.queue.list()) {
      this.queue.remove(q.id);
      q.item.job.onEvent({ type: 'error', error });
    }
    for (const seq of [...this.running.values()]) {
      this.running.delete(seq.id);
      seq.job.onEvent({ type: 'error', error });
    }
    this.inFlight.clear();
  }

  /**
   * The pipeline broke (DESIGN.md §6): every stage's KV is to be considered lost. Running sequences keep their slot
   * reservation and token history and will be prefilled again from position 0; cached prefixes are forgotten.
   * Clients see a delay, and with a fixed seed the same tokens (a replayed prefill's sample is not drawn again).
   */
  suspend(): void {
    if (this.down) return;
    this.down = true;
    this.inFlight.clear();
    for (const seq of this.running.values()) {
      seq.inFlight = false;
      seq.computed = 0;
      seq.copyFrom = null;
      seq.pinned = null;
    }
    for (const e of this.cache.all()) this.allocator.release(e.kv.owner);
    this.cache = new PrefixCache({
      maxEntries: Math.max(1, this.opts.prefixCacheEntries),
      minMatch: this.opts.minPrefixMatch,
    });
  }

  /** Every stage is back with empty KV (after Reset) and the Forward stream is open again. */
  resume(): void {
    if (!this.down) return;
    this.down = false;
    this.pump();
  }

  get isDown(): boolean {
    return this.down;
  }

  /** A ForwardResponse from stage 0: an error there means the micro-batch's sequences cannot go on. */
  onAck(ack: ForwardResponse): void {
    if (!ack.error) return;
    const plan = this.inFlight.get(ack.micro_batch_id);
    this.failBatch(plan, `stage 0 could not run micro-batch ${ack.micro_batch_id}: ${ack.error.message}`);
  }

  onStepResult(result: StepResult): void {
    const plan = this.inFlight.get(result.micro_batch_id);
    if (!plan) return; // a batch whose sequences all failed already
    const error = result.error ?? result.refusals?.[0];
    if (error) {
      this.failBatch(plan, `the last stage could not finish micro-batch ${result.micro_batch_id}: ${error.message}`);
      return;
    }
    this.inFlight.delete(result.micro_batch_id);
    this.microBatches++;
    result.stage_compute_ms.forEach((ms, i) => {
      this.stageComputeMs[i] = (this.stageComputeMs[i] ?? 0) + ms;
    });
    const byId = new Map(result.results.map((r) => [String(r.sequence_id), r]));
    for (const item of plan.items) {
      const seq = this.running.get(item.seqId);
      if (!seq) continue; // cancelled while in flight; its KV was freed after this batch in stream order
      seq.inFlight = false;
      seq.computed = item.start + item.count;
      if (seq.pinned && !seq.copyFrom) {
        this.cache.unpin(seq.pinned);
        seq.pinned = null;
      }
      // A replayed prefill (after a pipeline failure) ends one short of the history: its next token is known.
      if (!item.sample || seq.computed < seq.history.length) continue;
      const r = byId.get(item.seqId);
      if (!r) {
        this.failSeq(seq, new Error(`the last stage returned no result for sequence ${item.seqId}`));
        continue;
      }
      try {
        this.onToken(seq, distribution(r));
      } catch (err) {
        this.failSeq(seq, err instanceof Error ? err : new Error(String(err)));
      }
    }
    this.pump();
  }

  /** Carries out scheduling decisions until nothing more can be sent now. */
  pump(): void {
    for (;;) {
      if (this.stopped || this.down) return;
      this.makeRoomForHead();
      const waiting = this.waitingView();
      const decision = schedule(
        {
          step: this.step,
          running: [...this.running.values()].map(runningView),
          waiting: waiting.map((w) => w.view),
          inFlightBatches: this.inFlight.size,
          kv: this.kvView(),
        },
        this.opts.scheduler,
      );
      for (const r of decision.reject) {
        const q = this.queue.remove(r.id);
        q?.item.job.onEvent({ type: 'error', error: r.error });
      }
      for (const a of decision.admit) {
        const w = waiting.find((x) => x.view.id === a.id)!;
        this.admit(w.seq, a.reserveTokens, a.cachedLength, w.hit);
      }
      if (!decision.batch) {
        if (decision.reject.length > 0 || decision.admit.length > 0) continue;
        return;
      }
      this.send(decision.batch);
    }
  }

  private kvView() {
    const s = this.allocator.stats();
    return {
      freeSlots: s.slotsTotal - s.slotsInUse,
      freeTokens: (s.blocksTotal - s.blocksInUse) * s.blockSize,
      totalSlots: s.slotsTotal,
      totalTokens: s.blocksTotal * s.blockSize,
      blockSize: s.blockSize,
    };
  }

  /** Evicts least recently used cached prefixes while the oldest waiting request does not fit. */
  private makeRoomForHead(): void {
    const head = this.queue.peek();
    if (!head) return;
    const need = head.item.promptLength + head.item.job.maxNewTokens;
    if (!this.allocator.fitsAtAll(need)) return; // the scheduler rejects it
    while (!this.allocator.canReserve(need)) {
      const victim = this.cache.evictLru();
      if (!victim) return;
      this.dropCacheEntry(victim);
    }
  }

  private waitingView(): { seq: Sequence; view: WaitingRequest; hit: PrefixEntry<CacheKv> | null }[] {
    const freeSlots = this.allocator.slotsTotal - this.allocator.stats().slotsInUse;
    return this.queue.list().map((q, i) => {
      const seq = q.item;
      // Only the requests that could be admitted now look up the cache (a lookup refreshes the entry's LRU age).
      const hit =
        this.opts.prefixCacheEntries > 0 && i < freeSlots + 1 && this.cache.size > 0
          ? this.cache.lookup(seq.history, seq.promptLength - 1)
          : null;
      return {
        seq,
        hit: hit?.entry ?? null,
        view: {
          id: seq.id,
          promptLength: seq.promptLength,
          maxNewTokens: seq.job.maxNewTokens,
          cachedLength: hit?.length ?? 0,
          arrival: seq.arrival,
        },
      };
    });
  }

  private admit(seq: Sequence, reserveTokens: number, cachedLength: number, hit: PrefixEntry<CacheKv> | null): void {
    this.queue.remove(seq.id);
    const allocation = this.allocator.reserve(seq.id, reserveTokens);
    if (!allocation) throw new Error(`engine: the scheduler admitted ${seq.id} but the allocator has no room`);
    seq.slot = allocation.slot;
    seq.computed = cachedLength;
    seq.cachedTokens = cachedLength;
    if (hit && cachedLength > 0) {
      this.cache.pin(hit);
      seq.pinned = hit;
      seq.copyFrom = { entry: hit, length: cachedLength };
    }
    seq.admittedAt = this.now();
    this.running.set(seq.id, seq);
    seq.job.onEvent({ type: 'admitted', queueMs: seq.admittedAt - seq.enqueuedAt });
  }

  private send(plan: MicroBatchPlan): void {
    const id = this.step + 1;
    this.step++;
    const items = [];
    const tokenIds: number[] = [];
    const sampling: SamplingSide[] = [];
    for (const item of plan.items) {
      const seq = this.running.get(item.seqId)!;
      seq.inFlight = true;
      seq.lastScheduled = plan.step;
      const copy = seq.copyFrom;
      seq.copyFrom = null;
      items.push({
        sequence_id: seq.num,
        slot: seq.slot,
        start_position: item.start,
        token_count: item.count,
        sample: item.sample,
        copy_prefix: copy ? { from_slot: copy.entry.kv.slot, length: copy.length } : null,
      });
      for (let p = item.start; p < item.start + item.count; p++) tokenIds.push(seq.history[p]);
      if (item.sample) sampling.push(this.samplingSide(seq));
    }
    this.inFlight.set(id, plan);
    this.emit({
      batch: { micro_batch_id: id, items, token_ids: tokenIds, sampling, reply_to: this.opts.replyTo, traceparent: '' },
    });
  }

  private samplingSide(seq: Sequence): SamplingSide {
    const s = seq.job.sampling;
    return {
      sequence_id: seq.num,
      mask: 'MASK_KIND_TEXT',
      temperature: s.temperature,
      repetition_penalty: s.repetitionPenalty,
      penalised_ids: seq.penalised ? [...seq.penalised] : [],
      top_k: seq.plan.topK,
      full_row: seq.plan.fullRow,
      penalty_reset: true,
    };
  }

  private onToken(seq: Sequence, d: Distribution): void {
    const token = seq.sampler.next(d);
    const now = this.now();
    if (seq.generated === 0) seq.firstTokenAt = now;
    seq.history.push(token.id);
    seq.generated++;
    seq.penalised?.add(token.id);
    const { sampling } = seq.job;
    const eos = token.id === this.opts.eosId && !sampling.ignoreEos;
    let text = '';
    let stopString: string | undefined;
    if (!eos) {
      const r = seq.stop.push(seq.detok.push(token.id));
      text = r.emit;
      if (r.stopped) stopString = r.matched;
    }
    const length = seq.generated >= seq.job.maxNewTokens;
    if ((eos || length) && stopString === undefined) {
      const r = seq.stop.push(seq.detok.end());
      text += r.emit;
      if (r.stopped) stopString = r.matched;
      else text += seq.stop.flush();
    }
    const logprobs: TokenLogprob[] = [];
    if (seq.job.topLogprobs > 0) {
      const top = topAlternatives(d, seq.job.topLogprobs);
      logprobs.push({
        tokenId: token.id,
        logprob: token.logprob,
        top: Array.from(top.ids, (id, i) => ({ tokenId: id, logprob: top.logprobs[i] })),
      });
    }
    const tokenIds = seq.job.returnTokenIds ? [token.id] : [];
    if (text || tokenIds.length > 0 || logprobs.length > 0)
      seq.job.onEvent({ type: 'delta', text, tokenIds, logprobs });
    const finishReason: FinishReason | null =
      stopString !== undefined
        ? 'FINISH_REASON_STOP'
        : eos
          ? 'FINISH_REASON_EOS'
          : length
            ? 'FINISH_REASON_LENGTH'
            : null;
    if (!finishReason) return;
    seq.job.onEvent({
      type: 'final',
      finishReason,
      stopString: stopString ?? '',
      usage: { promptTokens: seq.promptLength, cachedTokens: seq.cachedTokens, completionTokens: seq.generated },
      firstTokenAt: seq.firstTokenAt,
      decodeMs: now - seq.firstTokenAt,
    });
    this.release(seq, true);
  }

  /**
   * Frees a sequence's KV on every stage (in stream order, after anything already sent), first copying its prompt
   * into a cache slot when it finished. Copies and frees travel as two commands so their order is never in doubt.
   */
  private release(seq: Sequence, finished: boolean): void {
    this.running.delete(seq.id);
    if (seq.pinned) {
      this.cache.unpin(seq.pinned);
      seq.pinned = null;
    }
    if (finished && this.opts.prefixCacheEntries > 0 && seq.computed >= seq.promptLength) {
      const evicted: number[] = [];
      const copy = this.cachePrompt(seq, evicted);
      // Evicted entries are freed before the copy: the new entry may have been given one of their slots.
      if (evicted.length > 0) this.emit({ kv: { free_slots: evicted, copies: [] } });
      if (copy) this.emit({ kv: { free_slots: [], copies: [copy] } });
    }
    this.allocator.release(seq.id);
    this.emit({ kv: { free_slots: [seq.slot], copies: [] } });
  }

  /** Keeps the prompt's KV as a cached prefix in a slot of its own; returns the copy to send (null: not cached). */
  private cachePrompt(seq: Sequence, evictedSlots: number[]) {
    const prompt = seq.history.slice(0, seq.promptLength);
    if (prompt.length < this.opts.minPrefixMatch + 1) return null;
    const existing = this.cache.lookup(prompt, prompt.length);
    if (existing && existing.length === prompt.length) return null;
    const take = () => {
      const v = this.cache.evictLru();
      if (v) evictedSlots.push(this.dropCacheEntry(v, false));
      return v !== null;
    };
    while (this.cache.size >= this.opts.prefixCacheEntries && take()) {}
    const owner = `cache:${this.nextCacheOwner++}`;
    while (!this.allocator.canReserve(prompt.length) && take()) {}
    const allocation = this.allocator.reserve(owner, prompt.length);
    if (!allocation) return null;
    const inserted = this.cache.insert(prompt, { owner, slot: allocation.slot });
    for (const e of inserted.evicted) evictedSlots.push(this.dropCacheEntry(e, false));
    if (!inserted.adopted) {
      this.allocator.release(owner);
      return null;
    }
    return { from_slot: seq.slot, to_slot: allocation.slot, length: prompt.length };
  }

  /** Releases an evicted entry's reservation; sends the free unless the caller batches it (returns the slot). */
  private dropCacheEntry(entry: PrefixEntry<CacheKv>, send = true): number {
    this.allocator.release(entry.kv.owner);
    if (send) this.emit({ kv: { free_slots: [entry.kv.slot], copies: [] } });
    return entry.kv.slot;
  }

  /** Sends to the pipeline; a send that throws (the stream is gone) fails everything, never the caller. */
  private emit(request: PipelineRequest): void {
    if (this.stopped || this.down) return;
    try {
      this.transport.send(request);
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
    }
  }

  private failSeq(seq: Sequence, error: Error): void {
    if (!this.running.has(seq.id)) return;
    this.release(seq, false);
    seq.job.onEvent({ type: 'error', error });
  }

  private failBatch(plan: MicroBatchPlan | undefined, message: string): void {
    if (!plan || this.down) return;
    for (const [id, p] of this.inFlight) if (p === plan) this.inFlight.delete(id);
    const seqs = plan.items.flatMap((item) => this.running.get(item.seqId) ?? []);
    const limit = this.opts.maxRecoveries ?? 3;
    const onFailure = this.opts.onPipelineFailure;
    for (const seq of seqs) {
      if (!onFailure || seq.recoveries >= limit)
        this.failSeq(seq, new Error(onFailure ? `${message} (after ${limit} recoveries)` : message));
      else seq.recoveries++;
    }
    if (onFailure && seqs.some((seq) => this.running.has(seq.id))) {
      this.suspend();
      onFailure(message);
      return;
    }
    this.pump();
  }
}

function runningView(s: Sequence): RunningSeq {
  return {
    id: s.id,
    // Positions to prefill: the prompt, or after a pipeline failure everything but the last sampled token.
    promptLength: Math.max(s.promptLength, s.history.length - 1),
    computed: s.computed,
    inFlight: s.inFlight,
    lastScheduled: s.lastScheduled,
    arrival: s.arrival,
  };
}

function distribution(r: StepResult['results'][number]): Distribution {
  const what = `result of sequence ${r.sequence_id}`;
  if (!r.logprobs) throw new Error(`${what}: no logprobs`);
  const logprobs = float32Values(r.logprobs, `${what}.logprobs`);
  if (!r.candidate_ids || r.candidate_ids.data.length === 0) return { kind: 'full', logprobs };
  const ids = int32Values(r.candidate_ids, `${what}.candidate_ids`);
  if (ids.length !== logprobs.length)
    throw new Error(`${what}: ${ids.length} candidate ids but ${logprobs.length} logprobs`);
  const candidates: Candidates = { ids, logprobs };
  return { kind: 'candidates', candidates };
}
