// lib/rpc against a real grpc-js server and client on loopback (in-process): typed errors → statuses, unexpected
// errors → INTERNAL with the stack logged and the server still answering, health Check/Watch, message size limit,
// and a graceful drain that finishes in-flight calls.
import assert from 'node:assert/strict';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { InvalidArgument, RpcError } from '../../lib/rpc/errors.js';
import { bidi, type CallContext, implement, serverStream, unary } from '../../lib/rpc/handlers.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { createLogger } from '../../lib/rpc/log.js';
import { protoRoot, serviceDefinition } from '../../lib/rpc/proto.js';
import { serve } from '../../lib/rpc/serve.js';
import { VQ_PROTO, VQ_SERVICE } from '../../lib/rpc/vq-wire.js';

class PictureError extends Error {}

type Handler = (req: Record<string, unknown>, ctx: CallContext) => Promise<unknown>;

async function start(
  handlers: Record<string, Handler>,
  extra: { maxReceiveMessageBytes?: number; onClose?: () => void } = {},
) {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger('test', { level: 'debug', write: (l) => lines.push(JSON.parse(l)) });
  const methods = Object.fromEntries(Object.entries(handlers).map(([k, fn]) => [k, unary(fn)]));
  const running = await serve({
    address: '127.0.0.1:0',
    log,
    handleSignals: false,
    drainTimeoutMs: 5000,
    ...extra,
    services: [
      {
        name: VQ_SERVICE,
        definition: serviceDefinition(VQ_PROTO, VQ_SERVICE),
        implementation: implement(
          {
            service: 'VqService',
            log,
            mapError: (e) => (e instanceof PictureError ? new InvalidArgument(`picture: ${e.message}`) : undefined),
          },
          methods,
        ),
      },
    ],
  });
  const client = createClient(VQ_PROTO, VQ_SERVICE, running.address);
  const health = createClient(HEALTH_PROTO, HEALTH_SERVICE, running.address);
  return { running, client, health, lines };
}

function rejectsWith(p: Promise<unknown>, code: grpc.status, pattern: RegExp) {
  return assert.rejects(p, (err: grpc.ServiceError) => {
    assert.equal(grpc.status[err.code], grpc.status[code], err.details);
    assert.match(err.details, pattern);
    return true;
  });
}

test('typed errors keep their status, foreign errors are mapped, bugs become INTERNAL and the server keeps serving', async () => {
  const { running, client, health, lines } = await start({
    Encode: async () => {
      throw new InvalidArgument('image: not an image (first bytes 00 01)');
    },
    Decode: async (req) => {
      if ((req.h as number) === 1) throw new PictureError('too dark');
      if ((req.h as number) === 2) throw new RpcError(grpc.status.FAILED_PRECONDITION, 'not ready');
      return (null as unknown as { x: number }).x; // a real bug: TypeError
    },
    Info: async () => ({ codebook_size: 32768, fingerprint: 'abc', pixel_limit: 40_000_000 }),
  });
  try {
    await rejectsWith(
      unaryCall(client, 'Encode', { image: Buffer.from([0, 1]) }),
      grpc.status.INVALID_ARGUMENT,
      /not an image/,
    );
    await rejectsWith(unaryCall(client, 'Decode', { h: 1 }), grpc.status.INVALID_ARGUMENT, /^picture: too dark$/);
    await rejectsWith(unaryCall(client, 'Decode', { h: 2 }), grpc.status.FAILED_PRECONDITION, /not ready/);
    await rejectsWith(unaryCall(client, 'Decode', { h: 3 }), grpc.status.INTERNAL, /VqService\/Decode: internal error/);
    const logged = lines.find((l) => l.msg === 'unexpected error in handler');
    assert.ok(logged, 'the unexpected error is logged');
    assert.match(String((logged.error as { stack: string }).stack), /TypeError/);
    // Still serving, and proto3 defaults filled in with keepCase names and longs as numbers.
    const info = await unaryCall<object, Record<string, unknown>>(client, 'Info', {});
    assert.equal(info.codebook_size, 32768);
    assert.equal(info.pixel_limit, 40_000_000);
    assert.equal(info.spatial_factor, 0);
    const ok = await unaryCall<object, { status: string }>(health, 'Check', { service: '' });
    assert.equal(ok.status, 'SERVING');
    const svc = await unaryCall<object, { status: string }>(health, 'Check', { service: VQ_SERVICE });
    assert.equal(svc.status, 'SERVING');
    await rejectsWith(unaryCall(health, 'Check', { service: 'no.Such' }), grpc.status.NOT_FOUND, /no\.Such/);
    const listening = lines.find((l) => l.msg === 'listening');
    assert.equal(listening?.address, running.address);
    assert.match(running.address, /^127\.0\.0\.1:\d+$/);
  } finally {
    client.close();
    health.close();
    await running.shutdown('test end');
  }
});

test("a client deadline aborts the handler's signal; the client gets DEADLINE_EXCEEDED", async () => {
  let aborted!: () => void;
  const sawAbort = new Promise<void>((r) => {
    aborted = r;
  });
  const { running, client } = await start({
    Encode: (_req, ctx) =>
      new Promise((_, reject) => {
        ctx.signal.addEventListener('abort', () => {
          aborted();
          reject(ctx.signal.reason);
        });
      }),
  });
  try {
    await rejectsWith(
      unaryCall(client, 'Encode', { image: Buffer.from('x') }, { deadlineMs: 200 }),
      grpc.status.DEADLINE_EXCEEDED,
      /Deadline/i,
    );
    await sawAbort;
  } finally {
    client.close();
    await running.shutdown('test end');
  }
});

test('a request over the receive limit gets RESOURCE_EXHAUSTED from grpc-js, and the next one succeeds', async () => {
  const { running, client } = await start(
    { Encode: async (req) => ({ h: (req.image as Buffer).length }) },
    { maxReceiveMessageBytes: 1024 },
  );
  try {
    await rejectsWith(
      unaryCall(client, 'Encode', { image: Buffer.alloc(2000) }),
      grpc.status.RESOURCE_EXHAUSTED,
      /1024/,
    );
    const res = await unaryCall<object, { h: number }>(client, 'Encode', { image: Buffer.alloc(500) });
    assert.equal(res.h, 500);
  } finally {
    client.close();
    await running.shutdown('test end');
  }
});

test('drain: health goes NOT_SERVING, Watch ends, the in-flight call finishes, new calls are refused, onClose runs', async () => {
  let closedHook = false;
  let release!: () => void;
  const gate = new Promise<void>((r) => {
    release = r;
  });
  let started!: () => void;
  const isStarted = new Promise<void>((r) => {
    started = r;
  });
  const { running, client, health } = await start(
    {
      Encode: async () => {
        started();
        await gate;
        return { h: 7 };
      },
    },
    { onClose: () => void (closedHook = true) },
  );
  const seen: string[] = [];
  const watch = (
    health as unknown as Record<string, (r: object) => grpc.ClientReadableStream<{ status: string }>>
  ).Watch.call(health, { service: '' });
  const watchEnded = new Promise<void>((resolve, reject) => {
    watch.on('data', (m) => seen.push(m.status));
    watch.on('end', resolve);
    watch.on('error', reject);
  });
  const inFlight = unaryCall<object, { h: number }>(client, 'Encode', { image: Buffer.from('x') });
  await isStarted;
  const drained = running.shutdown('test');
  await watchEnded;
  assert.deepEqual(seen, ['SERVING', 'NOT_SERVING']);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(closedHook, false, 'onClose waits for the in-flight call');
  release();
  assert.equal((await inFlight).h, 7);
  await drained;
  await running.closed;
  assert.equal(closedHook, true);
  const late = createClient(VQ_PROTO, VQ_SERVICE, running.address);
  await rejectsWith(
    unaryCall(late, 'Encode', { image: Buffer.from('x') }, { deadlineMs: 2000 }),
    grpc.status.UNAVAILABLE,
    /./,
  );
  late.close();
  client.close();
  health.close();
});

const ECHO_PROTO = join(dirname(protoRoot()), 'test', 'fixtures', 'rpc', 'echo.proto');
const ECHO_SERVICE = 'emu3.test.v1.Echo';

interface Echo {
  text: string;
  count: number;
  data: Buffer;
}

test('server streams and bidi streams: messages in order, errors as statuses, client cancel seen by the handler', async () => {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger('test', { level: 'debug', write: (l) => lines.push(JSON.parse(l)) });
  let cancelSeen!: () => void;
  const cancelled = new Promise<void>((r) => {
    cancelSeen = r;
  });
  const running = await serve({
    address: '127.0.0.1:0',
    log,
    handleSignals: false,
    drainTimeoutMs: 2000,
    services: [
      {
        name: ECHO_SERVICE,
        definition: serviceDefinition(ECHO_PROTO, ECHO_SERVICE),
        implementation: implement(
          { service: 'Echo', log },
          {
            Repeat: serverStream(async (req: Echo, send: (m: Partial<Echo>) => Promise<void>, ctx) => {
              if (req.count > 1000) throw new InvalidArgument(`count ${req.count} exceeds the limit 1000`);
              for (let i = 0; i < req.count; i++) await send({ text: `${req.text} ${i}`, count: i });
              if (req.text === 'then fail') throw new Error('stream bug');
              if (req.text === 'forever') {
                ctx.signal.addEventListener('abort', () => cancelSeen());
                await new Promise(() => {}); // until the client cancels; the wrapper must not leak the call
              }
            }),
            Chat: bidi(async (requests: AsyncIterable<Echo>, send: (m: Partial<Echo>) => Promise<void>) => {
              let total = 0;
              for await (const m of requests) {
                if (m.text === 'bad') throw new InvalidArgument('message "bad" refused');
                total += m.data.length;
                await send({ text: m.text.toUpperCase(), count: total });
              }
              await send({ text: 'done', count: total });
            }),
          },
        ),
      },
    ],
  });
  const client = createClient(ECHO_PROTO, ECHO_SERVICE, running.address) as unknown as Record<
    string,
    (...args: unknown[]) => grpc.ClientReadableStream<Echo> & grpc.ClientDuplexStream<Echo, Echo>
  > & { close(): void };
  const collect = (stream: grpc.ClientReadableStream<Echo>) =>
    new Promise<{ messages: Echo[]; error?: grpc.ServiceError }>((resolve) => {
      const messages: Echo[] = [];
      stream.on('data', (m: Echo) => messages.push(m));
      stream.on('error', (error: grpc.ServiceError) => resolve({ messages, error }));
      stream.on('end', () => resolve({ messages }));
    });
  try {
    const ok = await collect(client.Repeat({ text: 'hi', count: 3 }));
    assert.equal(ok.error, undefined);
    assert.deepEqual(
      ok.messages.map((m) => [m.text, m.count]),
      [
        ['hi 0', 0],
        ['hi 1', 1],
        ['hi 2', 2],
      ],
    );
    const refused = await collect(client.Repeat({ text: 'x', count: 5000 }));
    assert.equal(refused.error?.code, grpc.status.INVALID_ARGUMENT);
    assert.match(refused.error?.details ?? '', /count 5000 exceeds the limit 1000/);
    const bug = await collect(client.Repeat({ text: 'then fail', count: 2 }));
    assert.equal(bug.messages.length, 2, 'messages sent before the failure arrive');
    assert.equal(bug.error?.code, grpc.status.INTERNAL);
    assert.match(bug.error?.details ?? '', /Echo\/Repeat: internal error \(stream bug\)/);

    const forever = client.Repeat({ text: 'forever', count: 1 });
    const foreverDone = collect(forever);
    await new Promise<void>((r) => forever.once('data', () => r()));
    forever.cancel();
    await cancelled;
    assert.equal((await foreverDone).error?.code, grpc.status.CANCELLED);

    const chat = client.Chat();
    const chatDone = collect(chat);
    chat.write({ text: 'a', data: Buffer.alloc(3) } as Echo);
    chat.write({ text: 'b', data: Buffer.alloc(4) } as Echo);
    chat.end();
    const conversation = await chatDone;
    assert.equal(conversation.error, undefined);
    assert.deepEqual(
      conversation.messages.map((m) => [m.text, m.count]),
      [
        ['A', 3],
        ['B', 7],
        ['done', 7],
      ],
    );
    const rude = client.Chat();
    const rudeDone = collect(rude);
    rude.write({ text: 'ok', data: Buffer.alloc(1) } as Echo);
    rude.write({ text: 'bad' } as Echo);
    const rudeResult = await rudeDone;
    assert.deepEqual(
      rudeResult.messages.map((m) => m.text),
      ['OK'],
    );
    assert.equal(rudeResult.error?.code, grpc.status.INVALID_ARGUMENT);
    assert.match(rudeResult.error?.details ?? '', /message "bad" refused/);
    rude.end();
  } finally {
    client.close();
    await running.shutdown('test end');
  }
});
