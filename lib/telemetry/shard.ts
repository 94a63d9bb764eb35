// A shard's metrics and spans (one instance per process, shardTelemetry()). Hooks in the service:
//   service.ts, each micro-batch:  return t.forward(batch, queueMs, () => this.runBatch(batch, queueMs))
//   server.ts, once started:       t.watchStage({ first, end }, () => ledger usage, capacity)
// A micro-batch gets a span only when it carries a traceparent (the coordinator traced one of its requests): a child
// of the coordinator's step span, so every stage's span of one step are siblings in the trace.
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { BATCH_SEQUENCE_BUCKETS, BATCH_TOKEN_BUCKETS, LATENCY_BUCKETS } from './buckets.js';
import { IdleWindow } from './idle-window.js';
import { NOOP_SPAN, tracing } from './tracing.js';

/** The MicroBatch fields read here (lib/rpc/shard-wire.ts MicroBatch is assignable). */
export interface MicroBatchLike {
  micro_batch_id: number;
  items: readonly { token_count: number }[];
  traceparent: string;
}

export interface KvUsage {
  slotsInUse: number;
  tokensInUse: number;
}

export interface KvCapacityLike {
  slots: number;
  capacityTokens: number;
}

export class ShardTelemetry {
  readonly registry = new Registry();
  private readonly r = [this.registry];
  private busyMs = 0;
  private readonly idle = new IdleWindow();
  private layers = '';
  private usage: (() => KvUsage) | null = null;
  private capacity: KvCapacityLike = { slots: 0, capacityTokens: 0 };
  private transfers: (() => { hostToDevice: number; deviceToHost: number }) | null = null;
  readonly step = new Histogram({
    name: 'emu3_stage_step_seconds',
    help: "Time this stage spent on one micro-batch (prefix copies + its layers' forward pass).",
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly queue = new Histogram({
    name: 'emu3_stage_queue_seconds',
    help: 'Time a micro-batch waited in this stage before it ran.',
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly sequences = new Histogram({
    name: 'emu3_stage_micro_batch_sequences',
    help: 'Sequences per micro-batch run by this stage.',
    buckets: BATCH_SEQUENCE_BUCKETS,
    registers: this.r,
  });
  readonly tokens = new Histogram({
    name: 'emu3_stage_micro_batch_tokens',
    help: 'Tokens per micro-batch run by this stage.',
    buckets: BATCH_TOKEN_BUCKETS,
    registers: this.r,
  });
  readonly batches = new Counter({
    name: 'emu3_stage_micro_batches_total',
    help: 'Micro-batches this stage handled, by outcome (ok, or error when it refused or failed them).',
    labelNames: ['outcome'],
    registers: this.r,
  });
  readonly busy = new Counter({
    name: 'emu3_stage_busy_seconds_total',
    help: 'Time this stage spent running micro-batches; 1 - rate() of it is the idle fraction.',
    registers: this.r,
  });

  constructor() {
    new Gauge({
      name: 'emu3_stage_idle_ratio',
      help: 'Fraction of the last 10 s this stage spent not running micro-batches.',
      registers: this.r,
      collect: () => {
        this.idle.sample(performance.now(), this.busyMs);
        (this.registry.getSingleMetric('emu3_stage_idle_ratio') as Gauge).set(this.idle.idleRatio());
      },
    });
    const kv = (name: string, help: string, read: () => number) =>
      new Gauge({
        name,
        help,
        registers: this.r,
        collect: () => {
          if (this.usage) (this.registry.getSingleMetric(name) as Gauge).set(read());
        },
      });
    kv(
      'emu3_stage_kv_slots_in_use',
      "KV slots of this stage's arena holding positions.",
      () => this.usage!().slotsInUse,
    );
    kv('emu3_stage_kv_slots_capacity', "KV slots of this stage's arena.", () => this.capacity.slots);
    kv('emu3_stage_kv_tokens_in_use', 'KV positions written in this stage.', () => this.usage!().tokensInUse);
    kv('emu3_stage_kv_tokens_capacity', "KV positions this stage's arena holds.", () => this.capacity.capacityTokens);
    const bytes = new Counter({
      name: 'emu3_stage_host_device_bytes_total',
      help: "Bytes of host memory fed to this stage's ORT runs (host_to_device) and returned from them (device_to_host).",
      labelNames: ['direction'],
      registers: this.r,
      collect: () => {
        if (!this.transfers) return;
        const t = this.transfers();
        bytes.reset();
        bytes.inc({ direction: 'host_to_device' }, t.hostToDevice);
        bytes.inc({ direction: 'device_to_host' }, t.deviceToHost);
      },
    });
  }

  /** Host↔device byte totals, read at scrape time (StageRuntime.hostTransfers). */
  watchTransfers(read: () => { hostToDevice: number; deviceToHost: number }): void {
    this.transfers = read;
  }

  /** KV gauges read `usage` at scrape time; `layers` [first, end) names the stage in spans. */
  watchStage(layers: readonly [number, number], usage: () => KvUsage, capacity: KvCapacityLike): void {
    this.layers = `${layers[0]}-${layers[1]}`;
    this.usage = usage;
    this.capacity = capacity;
    const timer = setInterval(() => this.idle.sample(performance.now(), this.busyMs), 1000);
    timer.unref();
  }

  /** Runs one micro-batch under its span and metrics; a result with a non-empty `error` counts as an error. */
  async forward<R extends { error?: unknown }>(
    batch: MicroBatchLike,
    queueMs: number,
    run: () => Promise<R>,
  ): Promise<R> {
    const started = performance.now();
    let tokens = 0;
    for (const item of batch.items) tokens += item.token_count;
    const span = batch.traceparent
      ? tracing().start('emu3.stage.forward', {
          parent: batch.traceparent,
          startTime: started - queueMs,
          attributes: {
            'emu3.stage.layers': this.layers,
            'emu3.micro_batch.id': batch.micro_batch_id,
            'emu3.micro_batch.sequences': batch.items.length,
            'emu3.micro_batch.tokens': tokens,
            'emu3.stage.queue_ms': queueMs,
          },
        })
      : NOOP_SPAN;
    let failed = false;
    try {
      const result = await run();
      if (result.error) {
        failed = true;
        const e = result.error as { message?: unknown };
        span.fail(new Error(typeof e === 'string' ? e : String(e.message ?? 'stage error')));
      }
      return result;
    } catch (err) {
      failed = true;
      span.fail(err);
      throw err;
    } finally {
      const ms = performance.now() - started;
      this.busyMs += ms;
      this.busy.inc(ms / 1000);
      this.step.observe(ms / 1000);
      this.queue.observe(queueMs / 1000);
      this.sequences.observe(batch.items.length);
      this.tokens.observe(tokens);
      this.batches.inc({ outcome: failed ? 'error' : 'ok' });
      span.end();
    }
  }
}

let instance: ShardTelemetry | null = null;

export function shardTelemetry(): ShardTelemetry {
  instance ??= new ShardTelemetry();
  return instance;
}
