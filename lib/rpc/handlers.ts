// Handlers are plain async functions; these wrappers adapt them to grpc-js once: thrown errors become statuses
// (errors.ts), client cancellation becomes an AbortSignal, server-stream writes respect backpressure, and every call
// is logged with its duration and outcome.
import type * as grpc from '@grpc/grpc-js';
import { Cancelled, type ErrorMapper, toServiceError } from './errors.js';
import type { Logger } from './log.js';

export interface CallContext {
  /** 'Service/Method', for logs and error messages. */
  method: string;
  metadata: grpc.Metadata;
  peer: string;
  /** Aborted when grpc-js reports the call cancelled: the client cancels, disconnects, or its deadline passes. */
  signal: AbortSignal;
  log: Logger;
}

export type UnaryHandler<Req, Res> = (request: Req, ctx: CallContext) => Promise<Res>;
export type ServerStreamHandler<Req, Res> = (
  request: Req,
  send: (message: Res) => Promise<void>,
  ctx: CallContext,
) => Promise<void>;

/** Requests arrive as an async iterable (ends when the client half-closes; throws Cancelled if the client goes away). */
export type BidiHandler<Req, Res> = (
  requests: AsyncIterable<Req>,
  send: (message: Res) => Promise<void>,
  ctx: CallContext,
) => Promise<void>;

export type MethodImpl =
  | { kind: 'unary'; fn: UnaryHandler<never, unknown> }
  | { kind: 'serverStream'; fn: ServerStreamHandler<never, unknown> }
  | { kind: 'bidi'; fn: BidiHandler<never, unknown> };

export function unary<Req, Res>(fn: UnaryHandler<Req, Res>): MethodImpl {
  return { kind: 'unary', fn: fn as UnaryHandler<never, unknown> };
}

export function serverStream<Req, Res>(fn: ServerStreamHandler<Req, Res>): MethodImpl {
  return { kind: 'serverStream', fn: fn as ServerStreamHandler<never, unknown> };
}

export function bidi<Req, Res>(fn: BidiHandler<Req, Res>): MethodImpl {
  return { kind: 'bidi', fn: fn as BidiHandler<never, unknown> };
}

export interface ImplementOptions {
  /** Service name for logs, e.g. 'VqService'. */
  service: string;
  log: Logger;
  /** Maps the service's own error classes to statuses (see errors.ts). */
  mapError?: ErrorMapper;
}

type AnyCall =
  | grpc.ServerUnaryCall<unknown, unknown>
  | grpc.ServerWritableStream<unknown, unknown>
  | grpc.ServerDuplexStream<unknown, unknown>;
type WritableCall = grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>;

function context(call: AnyCall, method: string, log: Logger): CallContext {
  const controller = new AbortController();
  (call as NodeJS.EventEmitter).on('cancelled', () =>
    controller.abort(new Cancelled(`${method}: cancelled by the client`)),
  );
  return { method, metadata: call.metadata, peer: call.getPeer(), signal: controller.signal, log };
}

function wrapUnary(
  method: string,
  fn: UnaryHandler<never, unknown>,
  opts: ImplementOptions,
): grpc.handleUnaryCall<unknown, unknown> {
  return (call, callback) => {
    const started = performance.now();
    const ctx = context(call, method, opts.log);
    Promise.resolve()
      .then(() => fn(call.request as never, ctx))
      .then(
        (response) => {
          opts.log.debug('call done', { method, ms: +(performance.now() - started).toFixed(2) });
          callback(null, response);
        },
        (err: unknown) => callback(toServiceError(err, method, opts.log, opts.mapError)),
      );
  };
}

/** call.write with backpressure: waits for 'drain'; throws the abort reason once the client is gone. */
function sender(call: WritableCall, ctx: CallContext): (message: unknown) => Promise<void> {
  return async (message) => {
    if (ctx.signal.aborted) throw ctx.signal.reason;
    if (!call.write(message)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          call.off('drain', done);
          call.off('cancelled', done);
          resolve();
        };
        call.on('drain', done);
        call.on('cancelled', done);
      });
      if (ctx.signal.aborted) throw ctx.signal.reason;
    }
  };
}

/** Ends a streaming call with OK, or with the error's status (grpc-js sends the status of an emitted 'error'). */
function finish(
  call: WritableCall,
  ctx: CallContext,
  run: Promise<void>,
  opts: ImplementOptions,
  started: number,
): void {
  run.then(
    () => {
      opts.log.debug('call done', { method: ctx.method, ms: +(performance.now() - started).toFixed(2) });
      call.end();
    },
    (err: unknown) => {
      if (ctx.signal.aborted) return; // the client is gone; nobody to tell
      call.emit('error', toServiceError(err, ctx.method, opts.log, opts.mapError));
    },
  );
}

function wrapServerStream(
  method: string,
  fn: ServerStreamHandler<never, unknown>,
  opts: ImplementOptions,
): grpc.handleServerStreamingCall<unknown, unknown> {
  return (call) => {
    const started = performance.now();
    const ctx = context(call, method, opts.log);
    const run = Promise.resolve().then(() => fn(call.request as never, sender(call, ctx), ctx));
    finish(call, ctx, run, opts, started);
  };
}

/** The call's incoming messages, ending when the client half-closes and throwing once the client cancels. */
async function* incoming(
  call: grpc.ServerDuplexStream<unknown, unknown>,
  signal: AbortSignal,
): AsyncGenerator<unknown> {
  let onAbort = () => {};
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(signal.reason);
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  });
  aborted.catch(() => {}); // observed below; never an unhandled rejection
  // destroyOnReturn false: the default iterator destroys the whole duplex when reading ends, which would cut off the
  // replies still to be written and the final status.
  const it = call.iterator({ destroyOnReturn: false });
  try {
    for (;;) {
      const next = await Promise.race([it.next(), aborted]);
      if (next.done) return;
      yield next.value;
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    void it.return?.();
  }
}

function wrapBidi(
  method: string,
  fn: BidiHandler<never, unknown>,
  opts: ImplementOptions,
): grpc.handleBidiStreamingCall<unknown, unknown> {
  return (call) => {
    const started = performance.now();
    const ctx = context(call, method, opts.log);
    const run = Promise.resolve().then(() =>
      fn(incoming(call, ctx.signal) as AsyncIterable<never>, sender(call, ctx), ctx),
    );
    finish(call, ctx, run, opts, started);
  };
}

/**
 * A grpc-js service implementation from plain handlers:
 * `implement({ service, log, mapError }, { Encode: unary(async (req, ctx) => res), Watch: serverStream(...), Forward: bidi(...) })`.
 */
export function implement(
  opts: ImplementOptions,
  methods: Record<string, MethodImpl>,
): grpc.UntypedServiceImplementation {
  const impl: grpc.UntypedServiceImplementation = {};
  for (const [name, m] of Object.entries(methods)) {
    const method = `${opts.service}/${name}`;
    if (m.kind === 'unary') impl[name] = wrapUnary(method, m.fn, opts);
    else if (m.kind === 'serverStream') impl[name] = wrapServerStream(method, m.fn, opts);
    else impl[name] = wrapBidi(method, m.fn, opts);
  }
  return impl;
}
