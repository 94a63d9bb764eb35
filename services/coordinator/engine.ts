// The coordinator's engine loop (docs/architecture.md): requests wait in a bounded queue; on every change (a new
// request, a result, a cancel) `pump` asks the pure planner (scheduler.ts) for the step's plan, applies it to the
// state, and sends what it says: KV commands (evictions, prefix-cache copies, frees) and the micro-batch, in stream
// order. On each StepResult it samples the next token of every sequence with its own seeded sampler, detokenizes,
// applies stop strings and ends sequences; the next plan releases their KV. No I/O here beyond the Transport it is
// given, so the whole loop runs in unit tests against an in-process pipeline.
//
// Stage errors are typed (shard.proto StageError): a REFUSED item ends only its own request, with the status the
// stage asked for; an INTERNAL batch error ends that batch's requests with INTERNAL; STAGE_LOST means KV may be gone
// somewhere, so every running sequence keeps its token history and is prefilled again once the caller has brought
// the pipeline back (suspend → Reset → resume). Nothing else resets the pipeline.

import type { TokenGrid } from '../../lib/prompt/generation-size.js';
import { type AllowedTokens, imageLayoutAllowed, imageLayoutLength, layoutIds } from '../../lib/prompt/layout.js';
import {
  float32Values,
  int32Values,
  type KvCommand,
  type MicroBatch,
  type SamplingSide,
  type StageError,
  type StepResult,
} from '../../lib/rpc/shard-wire.js';
import { coordinatorTelemetry } from '../../lib/telemetry/coordinator.js';
import type { SpanHandle } from '../../lib/telemetry/tracing.js';
import type { StreamDetokenizer } from '../../lib/tokenizer/stream.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { GrpcCode, InternalError, ResourceExhaustedError, StageRefusedError, UnavailableError } from './errors.js';
import { KvManager } from './kv-manager.js';
import type { Candidates } from './logits.js';
import { PrefixCache, type PrefixEntry } from './prefix-cache.js';
import type { ValidSampling } from './request-validation.js';
import { type Distribution, type LastStagePlan, planLastStage, RequestSampler, topAlternatives } from './sampler.js';
import {
  applyPlan,
  type CacheKv,
  completeBatch,
  dropBatch,
  dropWaiting,
  loseAllKv,
  planStep,
  type SchedSeq,
  type SchedulerConfig,
  type SchedulerState,
  type StepPlan,
} from './scheduler.js';
import { StopMatcher } from './stop.js';

export type FinishReason =
  | 'FINISH_REASON_EOS'
  | 'FINISH_REASON_LENGTH'
  | 'FINISH_REASON_STOP'
  | 'FINISH_REASON_CANCELLED';

export interface TokenLogprob {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

export type EngineEvent =
  | { type: 'admitted'; queueMs: number }
  | { type: 'delta'; text: string; tokenIds: number[]; logprobs: TokenLogprob[] }
  /** An image job: another row of the grid is complete (every row once, in order). */
  | { type: 'progress'; rowsDone: number; rows: number; rowCodes: Int32Array }
  | {
      type: 'final';
      /** An image job's code grid (row-major, each in 0..32767), complete. */
      image?: { height: number; width: number; codes: Int32Array };
      finishReason: FinishReason;
      stopString: string;
      usage: { promptTokens: number; cachedTokens: number; completionTokens: number };
      /** When the first token was drawn (the engine's clock; 0 if none), and from the first to the last token (ms). */
      firstTokenAt: number;
      decodeMs: number;
    }
  | { type: 'error'; error: Error };

/** Emu3-Gen: the prompt is the conditional side; the engine runs the unconditional side beside it. */
export interface ImageJob {
  grid: TokenGrid;
  /** The unconditional prompt (bos, negative text, the same image prefix). */
  negativePrompt: readonly number[];
  guidanceScale: number;
}

export interface GenerateJob {
  prompt: readonly number[];
  /** Set for an image: the pair is admitted, batched, cancelled and freed as one; maxNewTokens is the layout's. */
  image?: ImageJob;
  maxNewTokens: number;
  sampling: ValidSampling;
  /** The seed in force (the request's or one the server chose). */
  seed: number;
  topLogprobs: number;
  returnTokenIds: boolean;
  onEvent(e: EngineEvent): void;
  /** The request's span: its micro-batches' step spans link to it (lib/telemetry). */
  trace?: SpanHandle;
}

/** What the engine sends down the pipeline (the caller adds the coordinator's epoch). */
export type Outgoing = { batch: MicroBatch } | { kv: KvCommand } | { heartbeat: Record<string, never> };

/** Where micro-batches and KV commands go, in order (stage 0's Forward stream). */
export interface Transport {
  send(request: Outgoing): void;
}

export interface EngineOptions {
  scheduler: SchedulerConfig;
  /** The pipeline's KV: the smallest stage's slots and token budget. */
  kv: { slots: number; tokens: number };
  maxQueue: number;
  tokenizer: Emu3Tokenizer;
  eosId: number;
  /** ResultSink address the last stage answers to. */
  replyTo: string;
  /**
   * A stage reported STAGE_LOST: the engine has suspended (KV considered lost everywhere); the caller brings the
   * pipeline back (Reset every stage) and calls resume(). Not given: the lost batch's requests fail at once.
   */
  onPipelineFailure?: (reason: string) => void;
  /** Times one request may be prefilled again after lost KV before it fails (UNAVAILABLE). Default 3. */
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
  /** Items refused by a stage, and pipeline losses recovered from, since start. */
  refusals: number;
  recoveries: number;
}

class Sequence implements SchedSeq {
  readonly history: number[];
  readonly promptLength: number;
  readonly maxNewTokens: number;
  slot = -1;
  computed = 0;
  inFlight = false;
  lastScheduled = -1;
  cachedTokens = 0;
  pendingCopy: { fromSlot: number; length: number } | null = null;
  pinned: PrefixEntry<CacheKv> | null = null;
  ended: 'finished' | 'aborted' | null = null;
  generated = 0;
  /** Losses of KV this sequence has been prefilled again after. */
  recoveries = 0;
  /** History positions already added to the last stage's penalised set (0: send it whole, with a reset). */
  penaltySent = 0;
  admittedAt = 0;
  firstTokenAt = 0;
  /** A guidance pair: the partner's id and this side (set by submit). */
  pairOf: string | null = null;
  pairRole: 'cond' | 'uncond' | null = null;
  /** The conditional side of an image job: its codes so far. */
  codes: Int32Array | null = null;
  readonly sampler: RequestSampler;
  readonly plan: LastStagePlan;
  readonly detok: StreamDetokenizer;
  readonly stop: StopMatcher;

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
    this.maxNewTokens = job.maxNewTokens;
    const s = job.sampling;
    const truncation = { temperature: s.temperature, topK: s.topK, topP: s.topP, minP: s.minP };
    this.sampler = new RequestSampler(truncation, job.seed);
    this.plan = planLastStage(truncation, job.topLogprobs);
    this.detok = tokenizer.stream({ skipSpecialTokens: true });
    this.stop = new StopMatcher(s.stop);
  }

  usage() {
    return { promptTokens: this.promptLength, cachedTokens: this.cachedTokens, completionTokens: this.generated };
  }
}

export class Engine {
  private readonly state: SchedulerState<Sequence>;
  private readonly now: () => number;
  private nextSeq = 1;
  private arrivals = 0;
  private readonly stageComputeMs: number[] = [];
  private microBatches = 0;
  private refusals = 0;
  private recoveries = 0;
  private stopped: Error | null = null;
  /** Set while the pipeline is down: new requests are refused with it; nothing is sent until resume(). */
  private downReason: string | null = null;
  private draining = false;

  constructor(
    private readonly opts: EngineOptions,
    private readonly transport: Transport,
  ) {
    this.state = {
      step: 0,
      waiting: [],
      running: new Map(),
      inFlight: new Map(),
      kv: new KvManager(opts.kv),
      cache: new PrefixCache({
        maxEntries: Math.max(1, opts.scheduler.prefixCacheEntries),
        minMatch: opts.scheduler.minPrefixMatch,
      }),
      nextCacheOwner: 1,
    };
    this.now = opts.now ?? (() => performance.now());
  }

  /** Queues a request; throws ResourceExhaustedError (queue full) or UnavailableError (down, draining). */
  submit(job: GenerateJob): { id: string; cancel: () => void } {
    if (this.stopped) throw this.stopped;
    if (this.draining) throw new UnavailableError('the coordinator is shutting down and takes no new requests');
    if (this.downReason !== null) throw new UnavailableError(this.downReason);
    const { maxBatchSeqs, maxBatchTokens, maxRunning } = this.opts.scheduler;
    if (job.image && Math.min(maxBatchSeqs, maxBatchTokens, maxRunning) < 2)
      throw new ResourceExhaustedError(
        'an image needs 2 sequences (with guidance) in one micro-batch: --max-batch-seqs, --max-batch-tokens and the ' +
          'KV slots must each be at least 2',
      );
    const num = this.nextSeq++;
    const id = String(num);
    const seq = new Sequence(id, num, job, this.arrivals, this.now(), this.opts.tokenizer);
    this.state.waiting.push(seq);
    if (job.image) this.state.waiting.push(this.unconditionalOf(seq, job.image));
    this.arrivals++;
    this.pump();
    // The bound is on requests that must wait: admission (evicting cached prefixes if need be) has had its chance.
    if (this.state.waiting.length > this.opts.maxQueue && dropWaiting(this.state, id)) {
      if (seq.pairOf) dropWaiting(this.state, seq.pairOf);
      throw new ResourceExhaustedError(
        `admission queue is full: ${this.opts.maxQueue} requests waiting (limit --max-queue = ${this.opts.maxQueue}); retry later`,
      );
    }
    return { id, cancel: () => this.cancel(id) };
  }

  /** The unconditional side of an image job: the negative prompt, the same tokens appended, no events of its own. */
  private unconditionalOf(cond: Sequence, image: ImageJob): Sequence {
    const num = this.nextSeq++;
    const uncond = new Sequence(
      String(num),
      num,
      { ...cond.job, prompt: image.negativePrompt, onEvent: () => {}, trace: cond.job.trace },
      cond.arrival,
      cond.enqueuedAt,
      this.opts.tokenizer,
    );
    cond.pairOf = uncond.id;
    cond.pairRole = 'cond';
    cond.codes = new Int32Array(image.grid.height * image.grid.width);
    uncond.pairOf = cond.id;
    uncond.pairRole = 'uncond';
    return uncond;
  }

  /** Ends a request without an answer (client cancel, deadline, disconnect): its KV is freed on every stage. */
  cancel(id: string): void {
    const waiting = dropWaiting(this.state, id);
    if (waiting) {
      if (waiting.pairOf) dropWaiting(this.state, waiting.pairOf);
      return;
    }
    const seq = this.state.running.get(id);
    if (!seq || seq.ended) return;
    seq.ended = 'aborted';
    this.pump();
  }

  stats(): EngineStats {
    const kv = this.state.kv.stats();
    let cacheTokens = 0;
    for (const e of this.state.cache.all()) cacheTokens += e.tokens.length;
    return {
      queued: this.state.waiting.length,
      running: [...this.state.running.values()].filter((s) => !s.ended).length,
      inFlightBatches: this.state.inFlight.size,
      kvSlotsInUse: kv.slotsInUse,
      kvTokensReserved: kv.tokensReserved,
      cacheEntries: this.state.cache.size,
      cacheTokens,
      stageComputeMs: [...this.stageComputeMs],
      microBatches: this.microBatches,
      refusals: this.refusals,
      recoveries: this.recoveries,
    };
  }

  /** The pipeline is gone for good: every waiting and running request fails with `error`; nothing more is taken. */
  fail(error: Error): void {
    this.stopped = error;
    this.failEveryone(error);
  }

  /** Ends every waiting and running request with `error` (a stage not back within --stage-timeout); keeps serving. */
  failEveryone(error: Error): void {
    for (const seq of this.state.waiting.splice(0)) seq.job.onEvent({ type: 'error', error });
    for (const seq of this.state.running.values()) this.failSeq(seq, error);
    this.state.inFlight.clear();
  }

  /**
   * Every stage's KV is to be considered lost and the pipeline is down (`reason` is what new requests are refused
   * with until resume()). Running sequences keep their reservation and token history and will be prefilled again
   * from position 0 (each at most maxRecoveries times); cached prefixes are forgotten. With a fixed seed the client
   * gets the same tokens (a replayed prefill's sample is not drawn again).
   */
  suspend(reason: string): void {
    this.downReason = reason;
    loseAllKv(this.state);
    for (const seq of this.state.running.values()) seq.penaltySent = 0;
  }

  /** Every stage is back with empty KV (after Reset) and the Forward stream is open again. */
  resume(): void {
    if (this.downReason === null) return;
    this.downReason = null;
    this.pump();
  }

  get isDown(): boolean {
    return this.downReason !== null;
  }

  /** Keeps the shards' coordinator lease alive (sent on a timer by the caller). */
  heartbeat(): void {
    this.emit({ heartbeat: {} });
  }

  /** Stops admission: new requests are refused, waiting ones end with FINISH_REASON_CANCELLED; running ones go on. */
  beginDrain(): void {
    this.draining = true;
    for (const seq of this.state.waiting.splice(0)) this.finish(seq, 'FINISH_REASON_CANCELLED', '');
  }

  /** Ends every running answer now with FINISH_REASON_CANCELLED (what it has said so far stands). */
  cancelRunning(): void {
    for (const seq of this.state.running.values()) if (!seq.ended) this.finish(seq, 'FINISH_REASON_CANCELLED', '');
    this.pump();
  }

  /** No request waiting or running. */
  get idle(): boolean {
    return this.state.waiting.length === 0 && [...this.state.running.values()].every((s) => s.ended);
  }

  onStepResult(result: StepResult): void {
    const id = result.micro_batch_id;
    if (!this.state.inFlight.has(id)) return; // a batch lost to a recovery, or whose requests all ended
    coordinatorTelemetry().batchDone(id, result.stage_compute_ms, result.error?.message);
    for (const r of result.refusals ?? []) this.onRefusal(r);
    const error = result.error;
    if (error && error.kind !== 'STAGE_ERROR_KIND_UNSPECIFIED') {
      this.onBatchError(id, error);
      this.pump();
      return;
    }
    this.microBatches++;
    result.stage_compute_ms.forEach((ms, i) => {
      this.stageComputeMs[i] = (this.stageComputeMs[i] ?? 0) + ms;
    });
    const byId = new Map(result.results.map((r) => [String(r.sequence_id), r]));
    for (const { item, seq } of completeBatch(this.state, id)) {
      // A replayed prefill (after lost KV) ends one short of the history: its next token is known.
      if (!item.sample || seq.computed < seq.history.length) continue;
      const r = byId.get(item.seqId);
      if (!r) {
        this.failSeq(seq, new InternalError(`the last stage returned no result for sequence ${item.seqId}`));
        continue;
      }
      try {
        if (seq.pairRole === 'uncond') continue; // its row only guided the conditional one
        if (seq.pairRole === 'cond') this.onImageToken(seq, distribution(r));
        else this.onToken(seq, distribution(r));
      } catch (err) {
        this.failSeq(seq, new InternalError(err instanceof Error ? err.message : String(err)));
      }
    }
    this.pump();
  }

  private onRefusal(r: StageError): void {
    this.refusals++;
    const seq = this.state.running.get(String(r.sequence_id));
    if (!seq) return;
    this.failSeq(seq, new StageRefusedError(r.status_code || GrpcCode.FAILED_PRECONDITION, r.message));
  }

  private onBatchError(id: number, error: StageError): void {
    if (error.kind === 'STAGE_ERROR_KIND_STAGE_LOST' && this.opts.onPipelineFailure) {
      this.pipelineLost(error.message);
      return;
    }
    const failure =
      error.kind === 'STAGE_ERROR_KIND_INTERNAL'
        ? new InternalError(error.message)
        : new UnavailableError(error.message);
    for (const seq of dropBatch(this.state, id)) this.failSeq(seq, failure);
  }

  /** A stage lost KV (or the stream to it broke): suspend, and let the caller bring the pipeline back. */
  pipelineLost(reason: string): void {
    if (this.isDown) return;
    this.recoveries++;
    const limit = this.opts.maxRecoveries ?? 3;
    for (const seq of this.state.running.values()) {
      if (seq.ended) continue;
      if (seq.recoveries >= limit)
        this.failSeq(
          seq,
          new UnavailableError(`${reason} (request given up after ${limit} recoveries, --max-recoveries)`),
        );
      else seq.recoveries++;
    }
    this.suspend(`the pipeline is recovering: ${reason}`);
    this.opts.onPipelineFailure?.(reason);
  }

  /** Plans and carries out steps until nothing more can be done now. */
  pump(): void {
    for (;;) {
      if (this.stopped || this.isDown) return;
      const plan = planStep(this.state, this.opts.scheduler);
      if (!plan.batch && plan.reject.length + plan.evict.length + plan.release.length + plan.admit.length === 0) return;
      const rejected = plan.reject.map((r) => ({
        seq: this.state.waiting.find((w) => w.id === r.id)!,
        error: r.error,
      }));
      applyPlan(this.state, plan);
      for (const r of rejected) r.seq.job.onEvent({ type: 'error', error: r.error });
      this.carryOut(plan);
    }
  }

  private carryOut(plan: StepPlan): void {
    // Evicted slots are freed before any copy: a new cache entry may have been given one of them.
    coordinatorTelemetry().prefixEvicted(plan.evict.length);
    if (plan.evict.length > 0) this.emit({ kv: { free_slots: plan.evict.map((e) => e.kv.slot), copies: [] } });
    if (plan.release.length > 0) {
      const copies = plan.release.flatMap((r) =>
        r.cacheInsert
          ? [{ from_slot: r.cacheInsert.fromSlot, to_slot: r.cacheInsert.toSlot, length: r.cacheInsert.tokens.length }]
          : [],
      );
      // A shard applies a command's copies before its frees.
      this.emit({ kv: { free_slots: plan.release.map((r) => r.slot), copies } });
    }
    const now = this.now();
    for (const a of plan.admit) {
      const seq = this.state.running.get(a.id)!;
      seq.admittedAt = now;
      coordinatorTelemetry().prefixLookup(seq.cachedTokens);
      seq.job.onEvent({ type: 'admitted', queueMs: now - seq.enqueuedAt });
    }
    if (plan.batch) this.send(plan.batch);
  }

  private send(plan: NonNullable<StepPlan['batch']>): void {
    const items = [];
    const tokenIds: number[] = [];
    const sampling: SamplingSide[] = [];
    for (const item of plan.items) {
      const seq = this.state.running.get(item.seqId)!;
      items.push({
        sequence_id: seq.num,
        slot: item.slot,
        start_position: item.start,
        token_count: item.count,
        sample: item.sample,
        copy_prefix: item.copyPrefix ? { from_slot: item.copyPrefix.fromSlot, length: item.copyPrefix.length } : null,
      });
      for (let p = item.start; p < item.start + item.count; p++) tokenIds.push(seq.history[p]);
      if (item.sample) sampling.push(this.samplingSide(seq));
    }
    this.emit({
      batch: {
        micro_batch_id: plan.id,
        items,
        token_ids: tokenIds,
        sampling,
        reply_to: this.opts.replyTo,
        traceparent: coordinatorTelemetry().batchStarted(
          plan.id,
          plan.items.map((i) => this.state.running.get(i.seqId)?.job.trace),
          items.length,
          tokenIds.length,
        ),
      },
    });
  }

  /** The ids the layout allows at an image sequence's next step (both sides: the conditional side's step). */
  private layoutAllowed(seq: Sequence): AllowedTokens {
    const image = seq.job.image!;
    const cond = seq.pairRole === 'cond' ? seq : this.state.running.get(seq.pairOf!)!;
    return imageLayoutAllowed(image.grid, cond.generated, layoutIds(this.opts.tokenizer));
  }

  /** The last stage keeps each slot's penalised set: send it whole once (with a reset), then only what is new. */
  private samplingSide(seq: Sequence): SamplingSide {
    if (seq.pairRole) return this.imageSamplingSide(seq);
    const s = seq.job.sampling;
    const penalty = s.repetitionPenalty !== 1;
    const reset = penalty && seq.penaltySent === 0;
    const ids = penalty ? [...new Set(seq.history.slice(seq.penaltySent))] : [];
    if (penalty) seq.penaltySent = seq.history.length;
    return {
      sequence_id: seq.num,
      mask: 'MASK_KIND_TEXT',
      temperature: s.temperature,
      repetition_penalty: s.repetitionPenalty,
      penalised_ids: ids,
      top_k: seq.plan.topK,
      full_row: seq.plan.fullRow,
      penalty_reset: reset,
    };
  }

  /**
   * An image step: the layout constraint as the allowed range; the conditional side names its unconditional partner
   * (guidance in the last stage's graph); the unconditional row is not drawn from (one candidate, temperature 1).
   */
  private imageSamplingSide(seq: Sequence): SamplingSide {
    const allowed = this.layoutAllowed(seq);
    const [allowBegin, allowEnd] =
      allowed.kind === 'visual' ? [allowed.start, allowed.start + allowed.count] : [allowed.id, allowed.id + 1];
    const cond = seq.pairRole === 'cond';
    const s = seq.job.sampling;
    const partner = cond ? this.state.running.get(seq.pairOf!)! : null;
    return {
      sequence_id: seq.num,
      mask: 'MASK_KIND_IMAGE_LAYOUT',
      allow_begin: allowBegin,
      allow_end: allowEnd,
      temperature: cond ? s.temperature : 1,
      repetition_penalty: 1,
      penalised_ids: [],
      top_k: cond ? seq.plan.topK : 1,
      full_row: cond ? seq.plan.fullRow : false,
      penalty_reset: false,
      cfg_uncond_sequence_id: partner ? partner.num : 0,
      guidance_scale: partner ? seq.job.image!.guidanceScale : 0,
    };
  }

  /** A token of an image: appended to both sides; a finished row is reported; eos at the layout's end ends it. */
  private onImageToken(seq: Sequence, d: Distribution): void {
    const image = seq.job.image!;
    const uncond = this.state.running.get(seq.pairOf!);
    if (!uncond) throw new Error(`the unconditional side of sequence ${seq.id} is gone`);
    const allowed = this.layoutAllowed(seq);
    const token = seq.sampler.next(d);
    const ok =
      allowed.kind === 'visual'
        ? token.id >= allowed.start && token.id < allowed.start + allowed.count
        : token.id === allowed.id;
    if (!ok)
      throw new Error(`the last stage offered token ${token.id} at image step ${seq.generated}, outside the layout`);
    const now = this.now();
    if (seq.generated === 0) seq.firstTokenAt = now;
    const { width, height } = image.grid;
    const step = seq.generated;
    if (allowed.kind === 'visual') {
      const row = Math.floor(step / (width + 1));
      seq.codes![row * width + (step % (width + 1))] = token.id - allowed.start;
    }
    for (const side of [seq, uncond]) {
      side.history.push(token.id);
      side.generated++;
    }
    if (token.id === this.opts.tokenizer.roles.eol && (step + 1) % (width + 1) === 0) {
      const rowsDone = (step + 1) / (width + 1);
      const rowCodes = seq.codes!.slice((rowsDone - 1) * width, rowsDone * width);
      seq.job.onEvent({ type: 'progress', rowsDone, rows: height, rowCodes });
    }
    if (seq.generated >= imageLayoutLength(image.grid)) this.finish(seq, 'FINISH_REASON_EOS', '');
  }

  private onToken(seq: Sequence, d: Distribution): void {
    const token = seq.sampler.next(d);
    const now = this.now();
    if (seq.generated === 0) seq.firstTokenAt = now;
    seq.history.push(token.id);
    seq.generated++;
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
    if (finishReason) this.finish(seq, finishReason, stopString ?? '');
  }

  /** Ends a request with its final event; the next plan frees its KV (a finished prompt may stay cached). */
  private finish(seq: Sequence, finishReason: FinishReason, stopString: string): void {
    const now = this.now();
    seq.ended = finishReason === 'FINISH_REASON_CANCELLED' ? 'aborted' : 'finished';
    const image =
      seq.codes && finishReason !== 'FINISH_REASON_CANCELLED'
        ? { height: seq.job.image!.grid.height, width: seq.job.image!.grid.width, codes: seq.codes }
        : undefined;
    seq.job.onEvent({
      type: 'final',
      ...(image ? { image } : {}),
      finishReason,
      stopString,
      usage: this.usageOf(seq),
      firstTokenAt: seq.firstTokenAt,
      decodeMs: seq.firstTokenAt > 0 ? now - seq.firstTokenAt : 0,
    });
  }

  /** Sends to the pipeline; a send that throws (the stream is gone) is a lost pipeline, never the caller's error. */
  private emit(request: Outgoing): void {
    if (this.stopped || this.isDown) return;
    try {
      this.transport.send(request);
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      if (this.opts.onPipelineFailure) this.pipelineLost(reason);
      else this.fail(new UnavailableError(reason));
    }
  }

  /** An image's usage counts both sides' prompts (both are prefilled). */
  private usageOf(seq: Sequence) {
    const u = seq.usage();
    const partner = seq.pairRole === 'cond' ? this.state.running.get(seq.pairOf!) : undefined;
    if (!partner) return u;
    return {
      ...u,
      promptTokens: u.promptTokens + partner.promptLength,
      cachedTokens: u.cachedTokens + partner.cachedTokens,
    };
  }

  private failSeq(seq: Sequence, error: Error): void {
    if (seq.ended) return;
    // The unconditional side has no events of its own: its failure is the image's.
    if (seq.pairRole === 'uncond') {
      const cond = this.state.running.get(seq.pairOf!);
      if (cond && !cond.ended) {
        this.failSeq(cond, error);
        return;
      }
    }
    seq.ended = 'aborted';
    seq.job.onEvent({ type: 'error', error });
  }
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
