// The coordinator's side of the shard chain: a Shard client per stage (Info, Free, Reset), and the one long-lived
// Forward stream to stage 0 that carries micro-batches, KV commands and heartbeats in order, each stamped with the
// coordinator's epoch. Each stage forwards to the next itself; the last stage's results arrive at the coordinator's
// ResultSink (result-sink.ts), not here.
import type * as grpc from '@grpc/grpc-js';
import { type ClientCredentials, createClient, unaryCall } from '../../lib/rpc/client.js';
import type { Logger } from '../../lib/rpc/log.js';
import {
  type ForwardRequest,
  type ForwardResponse,
  SHARD_PROTO,
  SHARD_SERVICE,
  type ShardInfo,
} from '../../lib/rpc/shard-wire.js';
import type { Outgoing } from './engine.js';
import { checkTopology, type PipelineShape, type StageDescription, TopologyError } from './topology.js';

export interface PipelineEvents {
  onAck(ack: ForwardResponse): void;
  /** The Forward stream ended or failed: in-flight work is lost. */
  onBroken(error: Error): void;
}

/** One stage that did not answer Info. */
export interface MissingStage {
  index: number;
  address: string;
  error: string;
}

export class PipelineClient {
  private readonly clients: grpc.Client[];
  private stream: grpc.ClientDuplexStream<ForwardRequest, ForwardResponse> | null = null;

  constructor(
    readonly addresses: readonly string[],
    private readonly log: Logger,
    /**
     * The coordinator's epoch: a new coordinator's is larger (its start time in ms), and every recovery moves it on
     * by one, so work queued on the stages before a Reset is never executed after it (STALE_EPOCH).
     */
    public epoch: number,
    /** The pipeline's secret (and mTLS) presented on every call and stream. */
    credentials?: ClientCredentials,
  ) {
    this.clients = addresses.map((a) => createClient(SHARD_PROTO, SHARD_SERVICE, a, { credentials }));
  }

  /** Info from every stage, retried until `timeoutMs` (shards may still be loading), then the topology check. */
  async describe(
    timeoutMs: number,
    expectedLayers?: number,
  ): Promise<{ stages: StageDescription[]; shape: PipelineShape }> {
    const stages = await Promise.all(
      this.addresses.map(async (address, i) => ({ address, info: await this.infoWithRetry(i, timeoutMs) })),
    );
    return { stages, shape: checkTopology(stages, expectedLayers) };
  }

  info(i: number, deadlineMs = 5000): Promise<ShardInfo> {
    return unaryCall<object, ShardInfo>(this.clients[i], 'Info', {}, { deadlineMs });
  }

  private async infoWithRetry(i: number, timeoutMs: number): Promise<ShardInfo> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await this.info(i, Math.max(1000, Math.min(5000, until - Date.now())));
      } catch (err) {
        if (Date.now() >= until)
          throw new TopologyError(
            `shard ${this.addresses[i]} did not answer Info within ${timeoutMs} ms: ${(err as Error).message}`,
          );
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  /** The stages that do not answer Info within `deadlineMs` (empty: all answer). */
  async missing(deadlineMs: number): Promise<MissingStage[]> {
    const answers = await Promise.allSettled(this.clients.map((_, i) => this.info(i, deadlineMs)));
    return answers.flatMap((a, index) =>
      a.status === 'fulfilled'
        ? []
        : [{ index, address: this.addresses[index], error: (a.reason as Error).message ?? String(a.reason) }],
    );
  }

  /** Drops all KV on every stage and makes `epoch` theirs (a coordinator must not inherit another's slots). */
  async resetAll(): Promise<void> {
    const epoch = this.epoch;
    await Promise.all(this.clients.map((c) => unaryCall(c, 'Reset', { epoch }, { deadlineMs: 10_000 })));
  }

  /** Opens the Forward stream to stage 0. */
  open(events: PipelineEvents): void {
    const stream = (
      this.clients[0] as unknown as { Forward(): grpc.ClientDuplexStream<ForwardRequest, ForwardResponse> }
    ).Forward();
    this.stream = stream;
    let broken = false;
    const fail = (error: Error) => {
      if (broken) return;
      broken = true;
      if (this.stream === stream) this.stream = null;
      events.onBroken(error);
    };
    stream.on('data', (ack: ForwardResponse) => events.onAck(ack));
    stream.on('error', (err: Error) =>
      fail(new Error(`Forward stream to ${this.addresses[0]} failed: ${err.message}`)),
    );
    stream.on('end', () => fail(new Error(`Forward stream to ${this.addresses[0]} ended`)));
    this.log.info('forward stream open', { stage0: this.addresses[0] });
  }

  get isOpen(): boolean {
    return this.stream !== null;
  }

  send(request: Outgoing): void {
    if (!this.stream) throw new Error(`no Forward stream to ${this.addresses[0]} (pipeline down)`);
    this.stream.write({ ...request, epoch: this.epoch } as ForwardRequest);
  }

  close(): void {
    this.stream?.end();
    this.stream = null;
    for (const c of this.clients) c.close();
  }
}
