// emu3.internal.v1.Shard over one StageRuntime. Every request from every stream goes through one serial queue, so
// requests run strictly in the order received (a stream's next messages are read while one runs: ORT works in the
// runtime's worker thread and gRPC stays on this one).
//
// A micro-batch is checked item by item (validate.ts): refused items leave the batch (listed in its refusals), the
// rest runs — prefix copies, then the tokens — and goes on: hidden states to the next stage, or (last stage) one
// StepResult with the candidates and every refusal to the coordinator's ResultSink. A batch this stage cannot run at
// all (malformed, an ORT failure, a stale epoch) is not forwarded: its StepResult carries the error. The stream and
// the process carry on whatever a request holds.
//
// Coordinator epoch and lease: every ForwardRequest carries the coordinator's epoch. A larger one than this stage's
// means a new coordinator took over: all KV (and penalty sets) of the old one is freed first. A smaller one (or 0) is
// not executed. With no ForwardRequest of the current epoch for --coordinator-lease ms, all KV is freed (the
// coordinator is gone or cut off); the epoch stays, so a late message of it is refused for KV no longer held.
import type * as grpc from '@grpc/grpc-js';
import { FailedPrecondition, InvalidArgument, RpcError } from '../../lib/rpc/errors.js';
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
  type ShardInfo,
  type StageError,
  type StageErrorKindName,
} from '../../lib/rpc/shard-wire.js';
import type { ForwardOutput, StageRuntime } from '../../lib/runtime/stage-runtime.js';
import { shardTelemetry } from '../../lib/telemetry/shard.js';
import type { KvCapacity } from './capacity.js';
import { KvLedger, ShardRequestError } from './kv-ledger.js';
import type { NextHop, ReplyAllowlist, ResultSinks } from './links.js';
import { PenaltySets } from './penalty-sets.js';
import { type BatchPlan, planBatch, planKvCommand, type StageLimits, samplingRows } from './validate.js';

export interface ShardDescription {
  precision: string;
  /** Where ORT runs the stage: cpu, webgpu or cuda. */
  device: string;
  fingerprint: string;
  numLayers: number;
  capacity: KvCapacity;
  limits: StageLimits;
  /** --coordinator-lease: free all KV after this long without a ForwardRequest of the current epoch; 0 = never. */
  leaseMs: number;
}

function stageError(kind: StageErrorKindName, message: string): StageError {
  return { kind, message, sequence_id: 0, status_code: 0 };
}

export class ShardService {
  readonly ledger: KvLedger;
  /** Last stage: the penalised ids per slot (SamplingSide.penalised_ids are deltas). */
  readonly penalties = new PenaltySets();
  private tail: Promise<unknown> = Promise.resolve();
  private draining = false;
  private readonly drainWaiters = new Set<() => void>();
  /** The coordinator epoch obeyed now (0 before any). */
  private epoch = 0;
  /** performance.now() of the last ForwardRequest received with the current (or a newer) epoch. */
  private lastSeenAt = 0;
  private leaseTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly runtime: StageRuntime,
    private readonly about: ShardDescription,
    private readonly links: { next?: NextHop; sinks: ResultSinks; replyAllowlist: ReplyAllowlist },
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
    this.stopLease();
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
        Forward: bidi<ReceivedForwardRequest, ForwardResponse>(async (requests, send) => {
          const it = requests[Symbol.asyncIterator]();
          // One drain waiter per stream, removed when the stream ends; each read races it through `wake`.
          let wake: (() => void) | null = null;
          const onDrain = () => wake?.();
          this.drainWaiters.add(onDrain);
          // Acks are written one at a time: concurrent writes under backpressure would each wait on the call.
          let acks: Promise<void> = Promise.resolve();
          try {
            while (!this.draining) {
              const next = await new Promise<IteratorResult<ReceivedForwardRequest> | 'drain'>((resolve, reject) => {
                wake = () => resolve('drain');
                it.next().then(resolve, reject);
              });
              wake = null;
              if (next === 'drain' || next.done) break;
              const receivedAt = performance.now();
              const request = next.value;
              this.touchLease(request.epoch, receivedAt);
              const ack = this.serial(() => this.handle(request, receivedAt));
              acks = acks.then(() => ack.then((a) => send(a))).catch(() => {});
            }
          } finally {
            this.drainWaiters.delete(onDrain);
            await acks;
            void it.return?.();
          }
        }),
        Free: unary(async (req: { slots: number[] }) =>
          this.serial(async () => {
            const slots = req.slots ?? [];
            slots.forEach((slot, i) => {
              this.ledger.checkSlot(slot, `slots[${i}]`);
            });
            for (const slot of slots) await this.freeSlot(slot);
            return { kv_tokens_in_use: this.ledger.tokensInUse };
          }),
        ),
        Reset: unary(async (req: { epoch: number }) =>
          this.serial(async () => {
            const epoch = req.epoch ?? 0;
            if (!epoch) throw new InvalidArgument('ResetRequest.epoch must be ≥ 1 (the coordinator epoch to adopt)');
            if (epoch < this.epoch)
              throw new FailedPrecondition(
                `ResetRequest.epoch ${epoch} is older than this stage's coordinator epoch ${this.epoch} (another coordinator took over)`,
              );
            const freed = await this.freeAll();
            if (epoch > this.epoch) this.logTakeover(epoch, freed);
            else this.log.info('reset: all KV dropped', { epoch, ...freed });
            this.epoch = epoch;
            return {};
          }),
        ),
      },
    );
  }

  info(): ShardInfo {
    const { capacity: cap, limits } = this.about;
    return {
      layer_begin: this.runtime.first,
      layer_end: this.runtime.last,
      num_layers: this.about.numLayers,
      is_first: this.runtime.isFirst,
      is_last: this.runtime.isLast,
      precision: this.about.precision,
      device: this.about.device,
      adapter: this.runtime.adapter,
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
      lease_ms: this.about.leaseMs,
      epoch: this.epoch,
    };
  }

  /** Stops the lease timer (drain, shutdown). */
  stopLease(): void {
    if (this.leaseTimer) clearTimeout(this.leaseTimer);
    this.leaseTimer = null;
  }

  private async handle(request: ReceivedForwardRequest, receivedAt: number): Promise<ForwardResponse> {
    const queueMs = performance.now() - receivedAt;
    const id = request.batch?.micro_batch_id ?? 0;
    try {
      // Before anything else (even an epoch takeover): a batch naming a ResultSink the operator did not configure is
      // not run, not forwarded, and not reported to that address; only the sender hears of it.
      const badReply = request.batch ? this.links.replyAllowlist.refusal(request.batch.reply_to ?? '') : null;
      if (badReply) {
        const error = stageError('STAGE_ERROR_KIND_INTERNAL', `${this.where()}: micro-batch ${id}: ${badReply}`);
        this.log.warn('micro-batch not run', { microBatch: id, kind: error.kind, error: error.message });
        return { micro_batch_id: id, error, compute_ms: 0, queue_ms: queueMs };
      }
      const epoch = request.epoch ?? 0;
      const stale = this.staleReason(epoch);
      if (stale) {
        const error = stageError('STAGE_ERROR_KIND_STALE_EPOCH', `${this.where()}: ${stale}`);
        if (request.batch) return this.stopBatch(request.batch, error, queueMs, request.batch.refusals ?? []);
        this.log.warn('stale request dropped', { kind: request.kind, error: error.message });
        return { micro_batch_id: 0, error, compute_ms: 0, queue_ms: queueMs };
      }
      if (epoch > this.epoch) {
        const freed = await this.freeAll();
        this.epoch = epoch;
        this.logTakeover(epoch, freed);
      }
      const batch = request.batch;
      if (batch) return await shardTelemetry().forward(batch, queueMs, () => this.runBatch(batch, epoch, queueMs));
      if (request.kv) return await this.runKv(request.kv, epoch, queueMs);
      if (request.heartbeat || request.kind === 'heartbeat') {
        this.links.next?.send({ heartbeat: {}, epoch });
        return { micro_batch_id: 0, error: null, compute_ms: 0, queue_ms: queueMs };
      }
      const error = stageError(
        'STAGE_ERROR_KIND_INTERNAL',
        `${this.where()}: ForwardRequest has none of batch, kv, heartbeat`,
      );
      return { micro_batch_id: 0, error, compute_ms: 0, queue_ms: queueMs };
    } catch (err) {
      // A bug or a dead worker: still one ack per request, so the sender's count of unacknowledged ones stays right.
      const error = stageError('STAGE_ERROR_KIND_INTERNAL', `${this.where()}: internal error: ${describe(err)}`);
      this.log.error('request failed', { kind: request.kind, error: error.message });
      if (request.batch) return this.stopBatch(request.batch, error, queueMs, request.batch.refusals ?? []);
      return { micro_batch_id: id, error, compute_ms: 0, queue_ms: queueMs };
    }
  }

  /** Why a ForwardRequest of `epoch` is not executed, or null. */
  private staleReason(epoch: number): string | null {
    if (!epoch) return 'ForwardRequest.epoch is 0 (unset): a coordinator sends its epoch (≥ 1) with every request';
    if (epoch < this.epoch)
      return `ForwardRequest.epoch ${epoch} is older than this stage's coordinator epoch ${this.epoch} (another coordinator took over)`;
    return null;
  }

  private async runKv(cmd: KvCommand, epoch: number, queueMs: number): Promise<ForwardResponse> {
    const started = performance.now();
    const { ops, errors } = planKvCommand(cmd, this.ledger);
    const problems = errors.map((e) => e.message);
    try {
      for (const op of ops) {
        if ('copy' in op) {
          await this.runtime.copyKv(op.copy.from, op.copy.to, op.copy.length);
          this.ledger.copy(op.copy.from, op.copy.to, op.copy.length, 'kv.copies');
          this.penalties.drop(op.copy.to);
        } else await this.freeSlot(op.free);
      }
    } catch (err) {
      problems.push(`internal error: ${describe(err)}`);
    }
    let error: StageError | null = null;
    if (problems.length > 0) {
      // Informational (no sequence is refused): the entries not applied, with the first one's status.
      error = {
        kind: errors.length > 0 ? 'STAGE_ERROR_KIND_REFUSED' : 'STAGE_ERROR_KIND_INTERNAL',
        message: `${this.where()}: ${problems.join('; ')}`,
        sequence_id: 0,
        status_code: errors[0]?.code ?? 0,
      };
      this.log.warn('kv command entries not applied', { errors: problems });
    }
    // Every stage applies every command in stream order, whatever happened here.
    this.links.next?.send({ kv: cmd, epoch });
    return { micro_batch_id: 0, error, compute_ms: performance.now() - started, queue_ms: queueMs };
  }

  private async runBatch(batch: MicroBatch, epoch: number, queueMs: number): Promise<ForwardResponse> {
    const id = batch.micro_batch_id;
    const started = performance.now();
    const earlier = batch.refusals ?? [];
    let plan: BatchPlan;
    try {
      plan = planBatch(batch, this.about.limits, this.ledger);
    } catch (err) {
      if (!(err instanceof ShardRequestError)) throw err;
      const error = stageError('STAGE_ERROR_KIND_INTERNAL', `${this.where()}: micro-batch ${id}: ${err.message}`);
      return this.stopBatch(batch, error, queueMs, earlier);
    }
    for (const r of plan.refusals)
      this.log.warn('item refused', { microBatch: id, sequence: r.sequence_id, error: r.message });
    const refusals = [...earlier, ...plan.refusals];
    let output: ForwardOutput | null = null;
    try {
      for (const c of plan.copies) {
        await this.runtime.copyKv(c.from, c.to, c.length);
        this.ledger.copy(c.from, c.to, c.length, 'copy_prefix');
        this.penalties.drop(c.to);
      }
      if (plan.input) {
        const sampling = this.about.limits.isLast ? samplingRows(plan, this.penalties) : null;
        // plan.input holds the one aligned copy of the received hidden states (validate.ts); the runtime may
        // transfer its buffer to the worker thread without copying, so it is not touched after this call.
        output = await this.runtime.forward(plan.items, plan.input, { sampling: sampling?.rows });
        for (const item of plan.items) this.ledger.write(item.slot, item.start, item.length);
        sampling?.commit();
      }
    } catch (err) {
      const error = stageError('STAGE_ERROR_KIND_INTERNAL', `${this.where()}: micro-batch ${id}: ${describe(err)}`);
      return this.stopBatch(batch, error, queueMs, refusals);
    }
    const computeMs = performance.now() - started;
    const stageMs = [...(batch.stage_compute_ms ?? []), computeMs];
    if (!this.about.limits.isLast) {
      if (output && !('hidden' in output)) throw new Error('the stage returned no hidden states');
      const D = this.runtime.hiddenSize;
      const hidden = output ? bytesOf(output.hidden) : Buffer.alloc(0);
      // A stage before the last always has a next hop (server.ts refuses to start without --next).
      this.links.next?.send({
        epoch,
        batch: {
          ...batch,
          items: plan.kept,
          sampling: plan.keptSampling,
          token_ids: [],
          hidden_states: { data: hidden, dtype: 'DTYPE_FLOAT32', shape: [hidden.length / 4 / D, D] },
          stage_compute_ms: stageMs,
          refusals,
        },
      });
    } else {
      if (output && !('topIds' in output)) throw new Error('the last stage returned no sampling candidates');
      this.links.sinks.deliver(batch.reply_to, {
        micro_batch_id: id,
        results: output ? sequenceResults(plan, output) : [],
        stage_compute_ms: stageMs,
        error: null,
        refusals,
      });
    }
    return { micro_batch_id: id, error: null, compute_ms: computeMs, queue_ms: queueMs };
  }

  /** A batch this stage does not run: its StepResult (with the refusals so far) goes to reply_to, not on. */
  private stopBatch(batch: MicroBatch, error: StageError, queueMs: number, refusals: StageError[]): ForwardResponse {
    this.log.warn('micro-batch not run', { microBatch: batch.micro_batch_id, kind: error.kind, error: error.message });
    if (batch.reply_to)
      this.links.sinks.deliver(batch.reply_to, {
        micro_batch_id: batch.micro_batch_id,
        results: [],
        stage_compute_ms: batch.stage_compute_ms ?? [],
        error,
        refusals,
      });
    return { micro_batch_id: batch.micro_batch_id, error, compute_ms: 0, queue_ms: queueMs };
  }

  private async freeSlot(slot: number): Promise<void> {
    await this.runtime.free(slot);
    this.ledger.free(slot, 'slot');
    this.penalties.drop(slot);
  }

  /** Frees every slot and penalty set; says how much was held. */
  private async freeAll(): Promise<{ slots: number; positions: number }> {
    const held = { slots: this.ledger.slotsInUse, positions: this.ledger.tokensInUse };
    for (let slot = 0; slot < this.ledger.slots; slot++) if (this.ledger.held(slot) > 0) await this.runtime.free(slot);
    this.ledger.reset();
    this.penalties.clear();
    return held;
  }

  private logTakeover(epoch: number, freed: { slots: number; positions: number }): void {
    this.log.info(`coordinator epoch ${epoch} took over: freed ${freed.slots} slots, ${freed.positions} positions`, {
      epoch,
      previousEpoch: this.epoch,
    });
  }

  /** A ForwardRequest arrived: if it is of the current (or a newer) epoch, the lease runs from now. */
  private touchLease(epoch: number, at: number): void {
    if (!epoch || epoch < this.epoch || this.about.leaseMs <= 0 || this.draining) return;
    this.lastSeenAt = at;
    if (!this.leaseTimer) this.armLease(this.about.leaseMs);
  }

  private armLease(ms: number): void {
    this.leaseTimer = setTimeout(() => {
      this.leaseTimer = null;
      const left = this.lastSeenAt + this.about.leaseMs - performance.now();
      if (left > 0) this.armLease(left);
      else void this.serial(() => this.expireLease()).catch(() => {});
    }, ms);
    this.leaseTimer.unref();
  }

  private async expireLease(): Promise<void> {
    // Something may have arrived while this waited in the queue.
    const idle = performance.now() - this.lastSeenAt;
    if (idle < this.about.leaseMs) {
      if (!this.leaseTimer) this.armLease(this.about.leaseMs - idle);
      return;
    }
    if (this.ledger.slotsInUse === 0 && this.penalties.size === 0) return;
    const freed = await this.freeAll();
    this.log.warn(
      `coordinator lease expired: no request of epoch ${this.epoch} for ${Math.round(idle)} ms (--coordinator-lease ${this.about.leaseMs}): freed ${freed.slots} slots, ${freed.positions} positions`,
      { epoch: this.epoch },
    );
  }

  private where(): string {
    return this.about.limits.where;
  }
}

function sequenceResults(plan: BatchPlan, output: Extract<ForwardOutput, { topIds: Int32Array }>): SequenceResult[] {
  return plan.sampled.map((s) => {
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
}

function describe(err: unknown): string {
  if (err instanceof ShardRequestError || err instanceof RpcError) return err.message;
  return err instanceof Error ? err.message : String(err);
}
