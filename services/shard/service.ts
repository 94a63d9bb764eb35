// emu3.internal.v1.Shard over one StageRuntime. Every request from every stream goes through one serial queue, so
// requests run strictly in the order received (a stream's next messages are read while one runs: ORT works in the
// runtime's worker thread and gRPC stays on this one). A micro-batch is checked, its prefix copies made, its tokens
// run; then the hidden states go on to the next stage, or (last stage) the candidates go to the coordinator's
// ResultSink. A refused or failed request gets its error in the ForwardResponse (and in a StepResult, so the
// coordinator hears of it whichever stage failed); the stream and the process carry on.
import type * as grpc from '@grpc/grpc-js';
import { InvalidArgument } from '../../lib/rpc/errors.js';
import { bidi, implement, unary } from '../../lib/rpc/handlers.js';
import type { Logger } from '../../lib/rpc/log.js';
import { serviceDefinition } from '../../lib/rpc/proto.js';
import type { ServiceBinding } from '../../lib/rpc/serve.js';
import {
  bytesOf,
  type ForwardResponse,
  type KvCommand,
  type MicroBatch,
  type ReceivedForwardRequest,
  type SequenceResult,
  SHARD_PROTO,
  SHARD_SERVICE,
} from '../../lib/rpc/shard-wire.js';
import type { ForwardOutput, StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { shardTelemetry } from '../../lib/telemetry/shard.js';
import type { KvCapacity } from './capacity.js';
import { KvLedger, ShardRequestError } from './kv-ledger.js';
import type { NextHop, ResultSinks } from './links.js';
import { type BatchPlan, checkKvCommand, planBatch, type StageLimits } from './validate.js';

export interface ShardDescription {
  precision: string;
  fingerprint: string;
  numLayers: number;
  capacity: KvCapacity;
  limits: StageLimits;
}

export class ShardService {
  readonly ledger: KvLedger;
  private tail: Promise<unknown> = Promise.resolve();
  private draining = false;
  private readonly drainWaiters = new Set<() => void>();

  constructor(
    private readonly runtime: StageRuntime,
    private readonly about: ShardDescription,
    private readonly links: { next?: NextHop; sinks: ResultSinks },
    private readonly log: Logger,
  ) {
    this.ledger = new KvLedger(about.capacity.slots, about.capacity.slotTokens);
  }

  binding(): ServiceBinding {
    return {
      name: SHARD_SERVICE,
      definition: serviceDefinition(SHARD_PROTO, SHARD_SERVICE),
      implementation: this.implementation(),
    };
  }

  /** Open Forward streams stop reading, finish what they queued, and end (so the server's drain completes). */
  beginDrain(): void {
    this.draining = true;
    for (const wake of this.drainWaiters) wake();
  }

  /** Runs `fn` after everything queued before it. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn);
    this.tail = run.catch(() => {});
    return run;
  }

  private implementation(): grpc.UntypedServiceImplementation {
    return implement(
      {
        service: 'Shard',
        log: this.log,
        mapError: (err) => (err instanceof ShardRequestError ? new InvalidArgument(err.message) : undefined),
      },
      {
        Info: unary(async () => this.info()),
        Forward: bidi<ReceivedForwardRequest, ForwardResponse>(async (requests, send, ctx) => {
          const drained = new Promise<'drain'>((resolve) => {
            const wake = () => resolve('drain');
            if (this.draining) wake();
            this.drainWaiters.add(wake);
            ctx.signal.addEventListener('abort', () => this.drainWaiters.delete(wake), { once: true });
          });
          const it = requests[Symbol.asyncIterator]();
          let last: Promise<unknown> = Promise.resolve();
          try {
            for (;;) {
              const next = await Promise.race([it.next(), drained]);
              if (next === 'drain' || next.done) break;
              const receivedAt = performance.now();
              const request = next.value;
              last = this.serial(() => this.handle(request, receivedAt)).then((ack) => send(ack).catch(() => {}));
            }
          } finally {
            await last;
            void it.return?.();
          }
        }),
        Free: unary(async (req: { slots: number[] }) =>
          this.serial(async () => {
            const slots = req.slots ?? [];
            slots.forEach((slot, i) => {
              this.ledger.checkSlot(slot, `slots[${i}]`);
            });
            for (const slot of slots) {
              await this.runtime.free(slot);
              this.ledger.free(slot, 'slot');
            }
            return { kv_tokens_in_use: this.ledger.tokensInUse };
          }),
        ),
        Reset: unary(async () =>
          this.serial(async () => {
            for (let slot = 0; slot < this.ledger.slots; slot++)
              if (this.ledger.held(slot) > 0) await this.runtime.free(slot);
            this.ledger.reset();
            this.log.info('reset: all KV dropped');
            return {};
          }),
        ),
      },
    );
  }

  info() {
    const { capacity: cap, limits } = this.about;
    return {
      layer_begin: this.runtime.first,
      layer_end: this.runtime.last,
      num_layers: this.about.numLayers,
      is_first: this.runtime.isFirst,
      is_last: this.runtime.isLast,
      precision: this.about.precision,
      model_fingerprint: this.about.fingerprint,
      hidden_size: this.runtime.hiddenSize,
      vocab_size: this.runtime.vocabSize,
      hidden_dtype: 'DTYPE_FLOAT32',
      kv_slots: cap.slots,
      kv_slot_tokens: cap.slotTokens,
      kv_capacity_tokens: cap.capacityTokens,
      kv_tokens_in_use: this.ledger.tokensInUse,
      kv_slots_in_use: this.ledger.slotsInUse,
      kv_bytes_per_token: cap.bytesPerToken,
      visual_token_begin: limits.visualBegin,
      visual_token_end: limits.visualEnd,
      max_top_k: limits.maxTopK,
    };
  }

  private async handle(request: ReceivedForwardRequest, receivedAt: number): Promise<ForwardResponse> {
    const queueMs = performance.now() - receivedAt;
    const batch = request.batch;
    if (batch) return shardTelemetry().forward(batch, queueMs, () => this.runBatch(batch, queueMs));
    if (request.kv) return this.runKv(request.kv, queueMs);
    return { micro_batch_id: 0, error: 'ForwardRequest has neither batch nor kv', compute_ms: 0, queue_ms: queueMs };
  }

  private async runKv(cmd: KvCommand, queueMs: number): Promise<ForwardResponse> {
    const started = performance.now();
    let error = '';
    try {
      checkKvCommand(cmd, this.ledger);
      for (const [i, c] of (cmd.copies ?? []).entries()) {
        await this.runtime.copyKv(c.from_slot, c.to_slot, c.length);
        this.ledger.copy(c.from_slot, c.to_slot, c.length, `kv.copies[${i}]`);
      }
      for (const slot of cmd.free_slots ?? []) {
        await this.runtime.free(slot);
        this.ledger.free(slot, 'kv.free_slots');
      }
    } catch (err) {
      error = this.describe(err);
      this.log.warn('kv command refused', { error });
    }
    // Every stage applies every command in stream order, whatever happened here.
    this.links.next?.send({ kv: cmd });
    return { micro_batch_id: 0, error, compute_ms: performance.now() - started, queue_ms: queueMs };
  }

  private async runBatch(batch: MicroBatch, queueMs: number): Promise<ForwardResponse> {
    const id = batch.micro_batch_id;
    const started = performance.now();
    let plan: BatchPlan;
    let output: ForwardOutput;
    try {
      plan = planBatch(batch, this.about.limits, this.ledger);
      for (const c of plan.copies) {
        await this.runtime.copyKv(c.from, c.to, c.length);
        this.ledger.copy(c.from, c.to, c.length, 'copy_prefix');
      }
      output = await this.runtime.forward(plan.items, plan.input, { sampling: plan.sampling });
      for (const item of plan.items) this.ledger.write(item.slot, item.start, item.length);
    } catch (err) {
      const error = this.describe(err);
      this.log.warn('micro-batch refused', { microBatch: id, error });
      if (batch.reply_to)
        this.links.sinks.deliver(batch.reply_to, {
          micro_batch_id: id,
          results: [],
          stage_compute_ms: [],
          error: `${this.where()}: ${error}`,
        });
      return { micro_batch_id: id, error, compute_ms: 0, queue_ms: queueMs };
    }
    const computeMs = performance.now() - started;
    const stageMs = [...(batch.stage_compute_ms ?? []), computeMs];
    if ('hidden' in output) {
      // A stage before the last always has a next hop (server.ts refuses to start without --next).
      this.links.next?.send({
        batch: {
          ...batch,
          token_ids: [],
          hidden_states: {
            data: bytesOf(output.hidden),
            dtype: 'DTYPE_FLOAT32',
            shape: [output.hidden.length / this.runtime.hiddenSize, this.runtime.hiddenSize],
          },
          stage_compute_ms: stageMs,
        },
      });
    } else if ('topIds' in output) {
      const results: SequenceResult[] = plan.sampled.map((s) => {
        const full = output.fullRows[s.index];
        if (s.fullRow && full)
          return {
            sequence_id: s.sequenceId,
            candidate_ids: null,
            logprobs: { data: bytesOf(full), dtype: 'DTYPE_FLOAT32', shape: [full.length] },
          };
        const at = s.index * output.k;
        return {
          sequence_id: s.sequenceId,
          candidate_ids: {
            data: bytesOf(output.topIds.slice(at, at + s.topK)),
            dtype: 'DTYPE_INT32',
            shape: [s.topK],
          },
          logprobs: {
            data: bytesOf(output.topLogprobs.slice(at, at + s.topK)),
            dtype: 'DTYPE_FLOAT32',
            shape: [s.topK],
          },
        };
      });
      this.links.sinks.deliver(batch.reply_to, {
        micro_batch_id: id,
        results,
        stage_compute_ms: stageMs,
        error: '',
      });
    }
    return { micro_batch_id: id, error: '', compute_ms: computeMs, queue_ms: queueMs };
  }

  private where(): string {
    return `stage [${this.runtime.first}, ${this.runtime.last})`;
  }

  private describe(err: unknown): string {
    if (err instanceof ShardRequestError) return err.message;
    return `internal error: ${err instanceof Error ? err.message : String(err)}`;
  }
}
