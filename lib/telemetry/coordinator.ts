// The coordinator's metrics and spans. One instance per process (coordinatorTelemetry()); the service calls it from
// a few places:
//   server.ts Generate:  const obs = t.observeGenerate(ctx.metadata); obs.validated(...); obs.event(e); obs.finish(err)
//   server.ts start:     t.watchEngine(() => engine.stats(), capacity)
//   engine.ts send:      traceparent: t.batchStarted(id, requestSpans, sequences, tokens)
//   engine.ts result:    t.batchDone(id, stageComputeMs, error)
//   engine (prefix cache): t.prefixHit(tokens) / t.prefixMiss() / t.prefixEvicted(n)
// Engine gauges are read from stats() when Prometheus scrapes, so the engine's hot path pays nothing for them.
import type { Metadata } from '@grpc/grpc-js';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from '../rpc/log.js';
import { BATCH_SEQUENCE_BUCKETS, BATCH_TOKEN_BUCKETS, LATENCY_BUCKETS, REQUEST_BUCKETS } from './buckets.js';
import { traceparentOf } from './grpc.js';
import { IdleWindow } from './idle-window.js';
import { NOOP_SPAN, type SpanHandle, tracing } from './tracing.js';

/** The engine's stats() fields read here (services/coordinator/engine.ts EngineStats). */
export interface EngineStatsLike {
  queued: number;
  running: number;
  inFlightBatches: number;
  kvSlotsInUse: number;
  kvTokensReserved: number;
  cacheEntries: number;
  cacheTokens: number;
  stageComputeMs: number[];
  microBatches: number;
  refusals: number;
  recoveries: number;
}

/** The engine's per-request events as this module reads them (EngineEvent is assignable to it). */
export type ObservedEvent =
  | { type: 'admitted'; queueMs: number }
  | { type: 'delta'; tokenIds?: readonly number[] }
  | {
      type: 'final';
      finishReason: string;
      usage: { promptTokens: number; cachedTokens: number; completionTokens: number };
      /** performance.now() ms of the first token (0: none). */
      firstTokenAt: number;
    }
  | { type: 'error'; error: Error };

export interface SamplingLike {
  temperature: number;
  topK: number;
  topP: number;
  maxNewTokens: number;
  seed: number | null;
}

/** gRPC status names by code, for the `status` label. */
const STATUS = [
  'OK',
  'CANCELLED',
  'UNKNOWN',
  'INVALID_ARGUMENT',
  'DEADLINE_EXCEEDED',
  'NOT_FOUND',
  'ALREADY_EXISTS',
  'PERMISSION_DENIED',
  'RESOURCE_EXHAUSTED',
  'FAILED_PRECONDITION',
  'ABORTED',
  'OUT_OF_RANGE',
  'UNIMPLEMENTED',
  'INTERNAL',
  'UNAVAILABLE',
  'DATA_LOSS',
  'UNAUTHENTICATED',
];

/** The status a thrown error ends a call with: its numeric `code` (RpcError, the coordinator's errors), else INTERNAL. */
export function statusName(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'number' && STATUS[code] ? STATUS[code] : 'INTERNAL';
}

/** FINISH_REASON_LENGTH → length. */
export function finishLabel(reason: string): string {
  return reason.replace(/^FINISH_REASON_/, '').toLowerCase() || 'none';
}

const MAX_OPEN_BATCHES = 4096;

export class CoordinatorTelemetry {
  readonly registry = new Registry();
  private readonly r = [this.registry];
  readonly requests = new Counter({
    name: 'emu3_requests_total',
    help: 'Generate calls ended, by gRPC status and finish reason (none when it ended with an error).',
    labelNames: ['status', 'finish_reason'],
    registers: this.r,
  });
  readonly ttft = new Histogram({
    name: 'emu3_time_to_first_token_seconds',
    help: 'From receiving a Generate call to drawing its first token (includes VQ encode, queue and prefill).',
    buckets: REQUEST_BUCKETS,
    registers: this.r,
  });
  readonly itl = new Histogram({
    name: 'emu3_inter_token_latency_seconds',
    help: 'Between consecutive streamed deltas of one answer (one per token unless text is held back).',
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly e2e = new Histogram({
    name: 'emu3_request_duration_seconds',
    help: 'From receiving a Generate call to its end, whatever the outcome.',
    buckets: REQUEST_BUCKETS,
    registers: this.r,
  });
  readonly queue = new Histogram({
    name: 'emu3_request_queue_seconds',
    help: 'Time a request waited for admission (a KV slot and token budget).',
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly vq = new Histogram({
    name: 'emu3_request_vq_seconds',
    help: "Time a request's images took to become codes (VQ service calls; 0 for a cached image is not observed).",
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly promptTokens = new Counter({
    name: 'emu3_prompt_tokens_total',
    help: 'Prompt tokens of finished requests.',
    registers: this.r,
  });
  readonly cachedTokens = new Counter({
    name: 'emu3_prompt_cached_tokens_total',
    help: 'Prompt tokens taken from the prefix cache instead of prefilled.',
    registers: this.r,
  });
  readonly generatedTokens = new Counter({
    name: 'emu3_generated_tokens_total',
    help: 'Tokens generated (finished requests, all finish reasons).',
    registers: this.r,
  });
  readonly prefixHits = new Counter({
    name: 'emu3_prefix_cache_hits_total',
    help: 'Admitted requests whose prompt began with a cached prefix.',
    registers: this.r,
  });
  readonly prefixHitTokens = new Counter({
    name: 'emu3_prefix_cache_hit_tokens_total',
    help: 'Prompt tokens covered by prefix-cache hits.',
    registers: this.r,
  });
  readonly prefixMisses = new Counter({
    name: 'emu3_prefix_cache_misses_total',
    help: 'Admitted requests with no usable cached prefix.',
    registers: this.r,
  });
  readonly prefixEvictions = new Counter({
    name: 'emu3_prefix_cache_evictions_total',
    help: 'Cached prefixes evicted (their KV slot freed).',
    registers: this.r,
  });
  readonly batchSequences = new Histogram({
    name: 'emu3_micro_batch_sequences',
    help: 'Sequences per micro-batch sent down the pipeline.',
    buckets: BATCH_SEQUENCE_BUCKETS,
    registers: this.r,
  });
  readonly batchTokens = new Histogram({
    name: 'emu3_micro_batch_tokens',
    help: 'Tokens per micro-batch (a decode counts 1, a prefill chunk its length).',
    buckets: BATCH_TOKEN_BUCKETS,
    registers: this.r,
  });
  private engine: (() => EngineStatsLike) | null = null;
  private capacity = { slots: 0, tokens: 0 };
  private readonly idle: IdleWindow[] = [];
  private idleTimer: NodeJS.Timeout | null = null;
  private watchedAt = 0;
  private readonly openBatches = new Map<number, SpanHandle>();

  constructor() {
    const gauge = (name: string, help: string, read: (s: EngineStatsLike) => number) =>
      new Gauge({
        name,
        help,
        registers: this.r,
        collect: () => {
          const s = this.engine?.();
          if (s) this.gaugeOf(name).set(read(s));
        },
      });
    gauge('emu3_requests_running', 'Requests holding a KV slot (prefilling or decoding).', (s) => s.running);
    gauge('emu3_requests_waiting', 'Requests queued for admission.', (s) => s.queued);
    gauge('emu3_kv_slots_in_use', 'KV slots held by running requests and cached prefixes.', (s) => s.kvSlotsInUse);
    gauge('emu3_kv_slots_capacity', 'KV slots of the pipeline (the smallest stage).', () => this.capacity.slots);
    gauge('emu3_kv_tokens_in_use', 'KV positions reserved by running requests.', (s) => s.kvTokensReserved);
    gauge('emu3_kv_tokens_capacity', 'KV positions of the pipeline (the smallest stage).', () => this.capacity.tokens);
    gauge('emu3_prefix_cache_entries', 'Prompt prefixes cached on the stages.', (s) => s.cacheEntries);
    gauge('emu3_prefix_cache_tokens', 'KV positions held by cached prefixes.', (s) => s.cacheTokens);
    gauge('emu3_micro_batches_in_flight', 'Micro-batches sent and not yet answered.', (s) => s.inFlightBatches);
    const total = (name: string, help: string, read: (s: EngineStatsLike) => number) =>
      new Counter({
        name,
        help,
        registers: this.r,
        collect: () => {
          const s = this.engine?.();
          if (!s) return;
          const c = this.registry.getSingleMetric(name) as Counter;
          c.reset();
          c.inc(read(s));
        },
      });
    total('emu3_micro_batches_total', 'Micro-batches completed by the whole pipeline.', (s) => s.microBatches);
    total('emu3_stage_refusals_total', 'Batch items refused by a stage.', (s) => s.refusals);
    total('emu3_pipeline_recoveries_total', 'Pipeline losses recovered from (every stage reset).', (s) => s.recoveries);
    new Counter({
      name: 'emu3_stage_compute_seconds_total',
      help: 'Time each stage spent computing micro-batches (StepResult.stage_compute_ms), by stage index.',
      labelNames: ['stage'],
      registers: this.r,
      collect: () => {
        const s = this.engine?.();
        if (!s) return;
        const c = this.registry.getSingleMetric('emu3_stage_compute_seconds_total') as Counter<'stage'>;
        c.reset();
        s.stageComputeMs.forEach((ms, i) => {
          c.inc({ stage: String(i) }, ms / 1000);
        });
      },
    });
    new Gauge({
      name: 'emu3_stage_idle_ratio',
      help: 'Fraction of the last 10 s each stage spent not computing (pipeline bubbles and idle time), by stage index.',
      labelNames: ['stage'],
      registers: this.r,
      collect: () => {
        this.sampleIdle();
        const g = this.registry.getSingleMetric('emu3_stage_idle_ratio') as Gauge<'stage'>;
        this.idle.forEach((w, i) => {
          g.set({ stage: String(i) }, w.idleRatio());
        });
      },
    });
  }

  private gaugeOf(name: string): Gauge {
    return this.registry.getSingleMetric(name) as Gauge;
  }

  /** Engine gauges and totals come from `stats` at scrape time; `capacity` is the pipeline's KV. */
  watchEngine(stats: () => EngineStatsLike, capacity: { slots: number; tokens: number }): void {
    this.engine = stats;
    this.capacity = capacity;
    this.watchedAt = performance.now();
    if (this.idleTimer) clearInterval(this.idleTimer);
    this.idleTimer = setInterval(() => this.sampleIdle(), 1000);
    this.idleTimer.unref();
  }

  private sampleIdle(): void {
    const s = this.engine?.();
    if (!s) return;
    const now = performance.now();
    s.stageComputeMs.forEach((ms, i) => {
      if (!this.idle[i]) {
        // A stage's total appears with its first micro-batch; it was 0 since the engine was watched.
        this.idle[i] = new IdleWindow();
        this.idle[i].sample(this.watchedAt, 0);
      }
      this.idle[i].sample(now, ms);
    });
  }

  /** A request was admitted with `tokens` of its prompt from the prefix cache (0: a miss). */
  prefixLookup(tokens: number): void {
    if (tokens > 0) this.prefixHit(tokens);
    else this.prefixMiss();
  }

  prefixHit(tokens: number): void {
    this.prefixHits.inc();
    this.prefixHitTokens.inc(tokens);
  }

  prefixMiss(): void {
    this.prefixMisses.inc();
  }

  prefixEvicted(count = 1): void {
    if (count > 0) this.prefixEvictions.inc(count);
  }

  /**
   * A micro-batch goes down the pipeline: records its size and, when any of its requests is traced, starts its step
   * span (a child of the first traced request's span, linked to every traced request) and returns the traceparent
   * for MicroBatch.traceparent; '' otherwise.
   */
  batchStarted(id: number, requests: readonly (SpanHandle | undefined)[], sequences: number, tokens: number): string {
    this.batchSequences.observe(sequences);
    this.batchTokens.observe(tokens);
    if (!tracing().enabled) return '';
    const traced = requests.filter((s): s is SpanHandle => s?.recording === true);
    if (traced.length === 0) return '';
    const span = tracing().start('emu3.step', {
      parent: traced[0],
      links: traced,
      attributes: {
        'emu3.micro_batch.id': id,
        'emu3.micro_batch.sequences': sequences,
        'emu3.micro_batch.tokens': tokens,
      },
    });
    if (this.openBatches.size >= MAX_OPEN_BATCHES) {
      // Batches lost to a recovery never get a result: end the oldest rather than keep them forever.
      const [oldId, old] = this.openBatches.entries().next().value as [number, SpanHandle];
      old.setAttributes({ 'emu3.micro_batch.lost': true });
      old.end();
      this.openBatches.delete(oldId);
    }
    this.openBatches.set(id, span);
    return span.traceparent;
  }

  /** The micro-batch's StepResult arrived (or it failed with `error`): ends its step span. */
  batchDone(id: number, stageComputeMs?: readonly number[], error?: string): void {
    const span = this.openBatches.get(id);
    if (!span) return;
    this.openBatches.delete(id);
    if (stageComputeMs) span.setAttributes({ 'emu3.stage_compute_ms': [...stageComputeMs] });
    if (error) span.fail(new Error(error));
    span.end();
  }

  /** Starts observing one Generate call (its server span, parented by the caller's traceparent if any). */
  observeGenerate(metadata?: Metadata, model = ''): GenerateObserver {
    return new GenerateObserver(this, traceparentOf(metadata), model);
  }

  /**
   * A Generate handler observed from start to end: it gets its observer; how it ends is recorded, and a failure is
   * logged on `log` with the request and trace ids (success is logged by the handler itself, with its usage).
   */
  traced<Req, Res, Ctx extends { metadata: Metadata; signal: AbortSignal }>(
    model: string,
    log: Logger,
    handler: (req: Req, send: (m: Res) => Promise<void>, ctx: Ctx, obs: GenerateObserver) => Promise<void>,
  ): (req: Req, send: (m: Res) => Promise<void>, ctx: Ctx) => Promise<void> {
    return async (req, send, ctx) => {
      const obs = this.observeGenerate(ctx.metadata, model);
      try {
        await handler(req, send, ctx, obs);
        obs.finish();
      } catch (err) {
        const status = obs.finish(err, ctx.signal.aborted);
        log.info('generate failed', {
          ...(obs.requestId ? { requestId: obs.requestId } : {}),
          ...(obs.traceId ? { traceId: obs.traceId } : {}),
          status,
          error: err instanceof Error ? err.message : String(err),
        });
        throw err;
      }
    };
  }
}

/** One Generate call: its span tree (validate, prompt, queue, prefill, decode, stream) and its metrics. */
export class GenerateObserver {
  readonly span: SpanHandle;
  private readonly received = performance.now();
  private submittedAt = 0;
  private queueMs = -1;
  private firstDeltaAt = 0;
  private lastDeltaAt = 0;
  private deltas = 0;
  private final: Extract<ObservedEvent, { type: 'final' }> | null = null;
  private ended = false;
  /** Set once the request is validated. */
  requestId = '';

  constructor(
    private readonly t: CoordinatorTelemetry,
    parent: string,
    model: string,
  ) {
    this.span = tracing().start('emu3.v1.Emu3/Generate', {
      parent: parent || null,
      kind: 'server',
      startTime: this.received,
      attributes: {
        'rpc.system': 'grpc',
        'rpc.service': 'emu3.v1.Emu3',
        'rpc.method': 'Generate',
        'gen_ai.operation.name': 'chat',
        'gen_ai.provider.name': 'emu3-serve',
        ...(model ? { 'gen_ai.request.model': model } : {}),
      },
    });
  }

  get traceId(): string {
    return this.span.traceId;
  }

  /** The request passed validation. */
  validated(requestId: string, s: SamplingLike): void {
    this.requestId = requestId;
    if (!this.span.recording) return;
    this.child('emu3.validate', this.received).end();
    this.span.setAttributes({
      'gen_ai.response.id': requestId,
      'gen_ai.request.max_tokens': s.maxNewTokens,
      'gen_ai.request.temperature': s.temperature,
      'gen_ai.request.top_k': s.topK,
      'gen_ai.request.top_p': s.topP,
      ...(s.seed !== null ? { 'gen_ai.request.seed': s.seed } : {}),
    });
  }

  /** The prompt is built (`vqMs`: time its images took); the request goes to the engine next. */
  promptBuilt(promptTokens: number, startedAt: number, vqMs: number): void {
    this.submittedAt = performance.now();
    if (vqMs > 0) this.t.vq.observe(vqMs / 1000);
    if (!this.span.recording) return;
    const span = this.child('emu3.prompt', startedAt);
    span.setAttributes({ 'emu3.prompt.tokens': promptTokens, 'emu3.prompt.vq_ms': vqMs });
    span.end(this.submittedAt);
  }

  /** Every engine event of this request, in order. */
  event(e: ObservedEvent): void {
    const now = performance.now();
    if (e.type === 'admitted') {
      this.queueMs = e.queueMs;
      this.t.queue.observe(e.queueMs / 1000);
    } else if (e.type === 'delta') {
      if (this.deltas === 0) this.firstDeltaAt = now;
      else this.t.itl.observe((now - this.lastDeltaAt) / 1000);
      this.lastDeltaAt = now;
      this.deltas++;
    } else if (e.type === 'final') {
      this.final = e;
    }
  }

  /** The call ended: `err` thrown (or undefined after the final message); `cancelled` when the client went away. Returns the status recorded. */
  finish(err?: unknown, cancelled = false): string {
    if (this.ended) return '';
    this.ended = true;
    const now = performance.now();
    const f = this.final;
    const status = f && !err ? 'OK' : cancelled ? 'CANCELLED' : statusName(err);
    this.t.requests.inc({ status, finish_reason: f && !err ? finishLabel(f.finishReason) : 'none' });
    this.t.e2e.observe((now - this.received) / 1000);
    if (f) {
      this.t.promptTokens.inc(f.usage.promptTokens);
      this.t.cachedTokens.inc(f.usage.cachedTokens);
      this.t.generatedTokens.inc(f.usage.completionTokens);
      if (f.firstTokenAt > 0) this.t.ttft.observe((f.firstTokenAt - this.received) / 1000);
    }
    if (!this.span.recording) return status;
    // The phases are known only now; spans take explicit times, so they are made after the fact.
    const admittedAt = this.queueMs >= 0 ? this.submittedAt + this.queueMs : 0;
    if (this.submittedAt > 0) this.child('emu3.queue', this.submittedAt).end(admittedAt || now);
    const firstToken = f && f.firstTokenAt > 0 ? f.firstTokenAt : 0;
    if (admittedAt > 0) this.child('emu3.prefill', admittedAt).end(firstToken || now);
    if (firstToken > 0) {
      const decode = this.child('emu3.decode', firstToken);
      decode.setAttributes({ 'gen_ai.usage.output_tokens': f!.usage.completionTokens });
      decode.end(now);
    }
    if (this.deltas > 0) {
      const stream = this.child('emu3.stream', this.firstDeltaAt);
      stream.setAttributes({ 'emu3.stream.deltas': this.deltas });
      stream.end(now);
    }
    if (f)
      this.span.setAttributes({
        'gen_ai.response.finish_reasons': [finishLabel(f.finishReason)],
        'gen_ai.usage.input_tokens': f.usage.promptTokens,
        'gen_ai.usage.output_tokens': f.usage.completionTokens,
        'emu3.usage.cached_tokens': f.usage.cachedTokens,
      });
    if (status !== 'OK') this.span.fail(err ?? new Error(status));
    this.span.setAttributes({ 'rpc.grpc.status_code': STATUS.indexOf(status) });
    this.span.end(now);
    return status;
  }

  private child(name: string, startTime: number): SpanHandle {
    return this.span.recording ? tracing().start(name, { parent: this.span, startTime }) : NOOP_SPAN;
  }
}

let instance: CoordinatorTelemetry | null = null;

/** This process's coordinator telemetry (made on first use). */
export function coordinatorTelemetry(): CoordinatorTelemetry {
  instance ??= new CoordinatorTelemetry();
  return instance;
}
