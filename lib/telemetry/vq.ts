// The VQ service's metrics and spans (one instance per process, vqTelemetry()). Hooks in the service:
//   service.ts Encode/Decode:  t.run('encode', ctx.metadata, pool, (codec) => ..., ctx.signal)   (instead of pool.run)
//   server.ts, once started:   t.watchPool(pool)
// Each call gets a server span (parent: the caller's traceparent in the metadata) with a child for the time it
// waited for a worker and one for the work.
import type { Metadata } from '@grpc/grpc-js';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { LATENCY_BUCKETS } from './buckets.js';
import { statusName } from './coordinator.js';
import { traceparentOf } from './grpc.js';
import { tracing } from './tracing.js';

/** The worker pool as read here (services/vq/pool.ts WorkerPool is assignable). */
export interface PoolLike<W> {
  run<T>(task: (worker: W, signal?: AbortSignal) => Promise<T>, signal?: AbortSignal): Promise<T>;
  readonly queued: number;
  readonly busy: number;
  readonly size: number;
  readonly queueLimit: number;
}

export type VqMethod = 'encode' | 'decode';

export class VqTelemetry {
  readonly registry = new Registry();
  private readonly r = [this.registry];
  private pool: PoolLike<unknown> | null = null;
  readonly work = new Histogram({
    name: 'emu3_vq_run_seconds',
    help: 'Time a worker spent on one request (preprocess + encode, or decode + PNG), by method.',
    labelNames: ['method'],
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly wait = new Histogram({
    name: 'emu3_vq_queue_seconds',
    help: 'Time a request waited for a free worker, by method.',
    labelNames: ['method'],
    buckets: LATENCY_BUCKETS,
    registers: this.r,
  });
  readonly requests = new Counter({
    name: 'emu3_vq_requests_total',
    help: 'Encode and Decode calls that reached the worker pool, by method and gRPC status.',
    labelNames: ['method', 'status'],
    registers: this.r,
  });
  readonly refusals = new Counter({
    name: 'emu3_vq_refusals_total',
    help: 'Requests refused because every worker was busy and the queue was full (RESOURCE_EXHAUSTED).',
    labelNames: ['method'],
    registers: this.r,
  });

  constructor() {
    const gauge = (name: string, help: string, read: (p: PoolLike<unknown>) => number) =>
      new Gauge({
        name,
        help,
        registers: this.r,
        collect: () => {
          if (this.pool) (this.registry.getSingleMetric(name) as Gauge).set(read(this.pool));
        },
      });
    gauge('emu3_vq_queue_depth', 'Requests waiting for a worker.', (p) => p.queued);
    gauge('emu3_vq_queue_capacity', 'Requests that may wait for a worker (--queue).', (p) => p.queueLimit);
    gauge('emu3_vq_workers_busy', 'Workers running a request.', (p) => p.busy);
    gauge('emu3_vq_workers', 'Codec workers.', (p) => p.size);
  }

  watchPool(pool: PoolLike<unknown>): void {
    this.pool = pool;
  }

  /** pool.run(task) under the call's span and metrics. */
  async run<W, T>(
    method: VqMethod,
    metadata: Metadata | undefined,
    pool: PoolLike<W>,
    task: (worker: W, signal?: AbortSignal) => Promise<T>,
    signal?: AbortSignal,
  ): Promise<T> {
    const name = method === 'encode' ? 'Encode' : 'Decode';
    const parent = traceparentOf(metadata);
    const span = tracing().start(`emu3.internal.v1.VqService/${name}`, {
      parent: parent || null,
      kind: 'server',
      attributes: { 'rpc.system': 'grpc', 'rpc.service': 'emu3.internal.v1.VqService', 'rpc.method': name },
    });
    const queued = performance.now();
    let started = 0;
    try {
      const result = await pool.run((worker, abort) => {
        started = performance.now();
        this.wait.observe({ method }, (started - queued) / 1000);
        return task(worker, abort);
      }, signal);
      this.requests.inc({ method, status: 'OK' });
      return result;
    } catch (err) {
      const status = statusName(err);
      this.requests.inc({ method, status });
      if (status === 'RESOURCE_EXHAUSTED' && started === 0) this.refusals.inc({ method });
      span.fail(err);
      throw err;
    } finally {
      const now = performance.now();
      if (started > 0) this.work.observe({ method }, (now - started) / 1000);
      if (span.recording) {
        const waited = tracing().start('vq.queue', { parent: span, startTime: queued });
        waited.end(started || now);
        if (started > 0) tracing().start(`vq.${method}`, { parent: span, startTime: started }).end(now);
      }
      span.end(now);
    }
  }
}

let instance: VqTelemetry | null = null;

export function vqTelemetry(): VqTelemetry {
  instance ??= new VqTelemetry();
  return instance;
}
