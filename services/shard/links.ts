// The shard's outgoing streams: ONE long-lived Forward stream to the next stage (opened on first use, re-opened after
// a break) and one Deliver stream per ResultSink address (the last stage's results, and any stage's errors).
import type * as grpc from '@grpc/grpc-js';
import { type ClientCredentials, createClient } from '../../lib/rpc/client.js';
import type { Logger } from '../../lib/rpc/log.js';
import {
  type ForwardRequest,
  type ForwardResponse,
  RESULT_SINK_SERVICE,
  SHARD_PROTO,
  SHARD_SERVICE,
  type StageError,
  type StepResult,
} from '../../lib/rpc/shard-wire.js';

type ForwardCall = grpc.ClientDuplexStream<ForwardRequest, ForwardResponse>;

/** Requests sent on the current stream and not yet acknowledged, so a break can be reported for each lost batch. */
export interface Unacked {
  /** 0 for a KvCommand or Heartbeat. */
  microBatchId: number;
  replyTo: string;
  /** The batch's refusals so far (the coordinator still needs to hear of them). */
  refusals: StageError[];
}

/**
 * How long a new stream waits for the next stage's connection before it is opened anyway (and fails at once if the
 * stage is still gone): a next stage restarted a moment ago is reached on the channel's next retry (≤ 1 s,
 * INTERNAL_RECONNECT) instead of the first batch after the restart being lost to a stale connection failure.
 */
export const CONNECT_WAIT_MS = 2000;

export class NextHop {
  private readonly client: grpc.Client;
  private stream: ForwardCall | null = null;
  private unacked: Unacked[] = [];
  /** Requests waiting for the channel before a new stream opens (in order); null when not waiting. */
  private waiting: ForwardRequest[] | null = null;
  private closed = false;

  constructor(
    readonly address: string,
    private readonly log: Logger,
    /** A micro-batch sent downstream was lost (the stream broke before the next stage acknowledged it). */
    private readonly onLost: (lost: Unacked, why: string) => void,
    credentials?: ClientCredentials,
  ) {
    this.client = createClient(SHARD_PROTO, SHARD_SERVICE, address, { credentials });
  }

  send(request: ForwardRequest): void {
    if (this.closed) return;
    if (this.stream) this.write(this.stream, request);
    else if (this.waiting) this.waiting.push(request);
    else this.connectThenOpen(request);
  }

  /** Waits (≤ CONNECT_WAIT_MS) for the channel, then opens a stream and writes what queued meanwhile, in order. */
  private connectThenOpen(request: ForwardRequest): void {
    this.waiting = [request];
    this.client.waitForReady(Date.now() + CONNECT_WAIT_MS, () => {
      const queued = this.waiting ?? [];
      this.waiting = null;
      if (this.closed) return;
      const stream = this.stream ?? this.open();
      for (const r of queued) this.write(stream, r);
    });
  }

  close(): void {
    this.closed = true;
    this.waiting = null;
    this.stream?.end();
    this.stream = null;
    this.client.close();
  }

  private write(stream: ForwardCall, request: ForwardRequest): void {
    const batch = 'batch' in request ? request.batch : null;
    this.unacked.push({
      microBatchId: batch?.micro_batch_id ?? 0,
      replyTo: batch?.reply_to ?? '',
      refusals: batch?.refusals ?? [],
    });
    stream.write(request);
  }

  private open(): ForwardCall {
    const stream = (this.client as unknown as { Forward(): ForwardCall }).Forward();
    this.stream = stream;
    this.log.info('next-stage stream open', { next: this.address });
    let broken = false;
    const fail = (why: string) => {
      if (broken) return;
      broken = true;
      if (this.stream === stream) this.stream = null;
      const lost = this.unacked;
      this.unacked = [];
      this.log.warn('next-stage stream broken', { next: this.address, why, unacked: lost.length });
      for (const u of lost) if (u.replyTo) this.onLost(u, why);
    };
    stream.on('data', (ack: ForwardResponse) => {
      const sent = this.unacked.shift();
      // The next stage reports its own errors to the ResultSink itself; here they are only logged.
      if (ack.error)
        this.log.warn('next stage did not run a request', {
          next: this.address,
          microBatch: sent?.microBatchId,
          kind: ack.error.kind,
          error: ack.error.message,
        });
    });
    stream.on('error', (err: Error) => fail(`Forward stream to ${this.address} failed: ${err.message}`));
    stream.on('end', () => fail(`Forward stream to ${this.address} ended`));
    return stream;
  }
}

interface Sink {
  client: grpc.Client;
  call: grpc.ClientWritableStream<StepResult>;
}

/** The ResultSink addresses a stage may send to (--allow-reply-to): nothing else is ever dialled. */
export class ReplyAllowlist {
  private readonly allowed: Set<string>;

  constructor(addresses: readonly string[]) {
    this.allowed = new Set(addresses.map((a) => a.trim()).filter((a) => a !== ''));
  }

  allows(address: string): boolean {
    return this.allowed.has(address);
  }

  /** Why `address` is refused, or null. */
  refusal(address: string): string | null {
    if (this.allows(address)) return null;
    return `reply_to "${address}" is not one of this stage's --allow-reply-to addresses (${[...this.allowed].join(', ')}): nothing was run or sent`;
  }

  list(): string[] {
    return [...this.allowed];
  }
}

export class ResultSinks {
  private readonly sinks = new Map<string, Sink>();

  constructor(
    private readonly log: Logger,
    private readonly allowlist: ReplyAllowlist,
    private readonly credentials?: ClientCredentials,
  ) {}

  deliver(address: string, result: StepResult): void {
    // The last line of defence: a result never goes to an address the operator did not configure.
    if (!this.allowlist.allows(address)) {
      this.log.warn('result not sent: reply_to is not allowed', {
        replyTo: address,
        microBatch: result.micro_batch_id,
        allowed: this.allowlist.list(),
      });
      return;
    }
    let sink = this.sinks.get(address);
    if (!sink) {
      sink = this.open(address);
      this.sinks.set(address, sink);
    }
    sink.call.write(result);
  }

  close(): void {
    for (const { client, call } of this.sinks.values()) {
      call.end();
      client.close();
    }
    this.sinks.clear();
  }

  private open(address: string): Sink {
    const client = createClient(SHARD_PROTO, RESULT_SINK_SERVICE, address, { credentials: this.credentials });
    type Deliver = (cb: (err: grpc.ServiceError | null) => void) => grpc.ClientWritableStream<StepResult>;
    let sink: Sink | undefined;
    const call = (client as unknown as { Deliver: Deliver }).Deliver((err) => {
      // The stream ended: the next result opens a new one.
      if (this.sinks.get(address) === sink) this.sinks.delete(address);
      client.close();
      if (err) this.log.warn('result stream broken', { replyTo: address, error: err.message });
    });
    sink = { client, call };
    this.log.info('result stream open', { replyTo: address });
    return sink;
  }
}
