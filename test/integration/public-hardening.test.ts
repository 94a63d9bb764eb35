// The public service against hostile or careless clients, on the real system (vq + 2 shards + coordinator):
// malformed protobuf, cancelled image requests, and one connection resetting streams in bulk.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import http2 from 'node:http2';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoRoot } from '../../lib/rpc/proto.js';
import { Rng } from '../../lib/util/rng.js';
import { generate, type Harness, picture, sleep, startHarness } from './pipeline-harness.js';

let h: Harness;
before(async () => {
  h = await startHarness(['--prefix-cache-entries', '0']);
});
after(async () => {
  await h?.close();
});

const GENERATE = '/emu3.v1.Emu3/Generate';
const good = { parts: [{ text: 'Hello there.' }], sampling: { maxNewTokens: 2, ignoreEos: true } };

/** A client on a connection of its own (grpc-js otherwise shares one connection among clients of one target). */
function ownConnection(): grpc.Client {
  return new grpc.Client(h.system.address, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 });
}

const identity = (b: Buffer) => b;

/** Sends raw bytes as a GenerateRequest; resolves with the final status. A call that streams is cancelled at once. */
function rawGenerate(client: grpc.Client, payload: Buffer): Promise<grpc.StatusObject> {
  return new Promise((resolve) => {
    const call = client.makeServerStreamRequest(GENERATE, identity, identity, payload, new grpc.Metadata(), {
      deadline: Date.now() + 20_000,
    });
    call.on('data', () => call.cancel());
    call.on('error', () => {});
    call.on('status', resolve);
  });
}

function encoder(): (request: object) => Buffer {
  const root = protoRoot();
  const pkg = protoLoader.loadSync(join(root, 'emu3/v1/emu3.proto'), {
    keepCase: false,
    longs: Number,
    enums: String,
    includeDirs: [root],
  });
  const method = (pkg['emu3.v1.Emu3'] as grpc.ServiceDefinition).Generate;
  return (request) => method.requestSerialize(request);
}

function mutate(rng: Rng, base: Buffer): Buffer {
  const bytes = [...base];
  const edits = 1 + (rng.nextU32() % 4);
  for (let e = 0; e < edits; e++) {
    const at = bytes.length === 0 ? 0 : rng.nextU32() % bytes.length;
    switch (rng.nextU32() % 5) {
      case 0: // flip a bit
        if (bytes.length > 0) bytes[at] ^= 1 << (rng.nextU32() % 8);
        break;
      case 1: // a random byte
        if (bytes.length > 0) bytes[at] = rng.nextU32() & 255;
        break;
      case 2: // cut the message short
        bytes.length = at;
        break;
      case 3: // insert random bytes
        bytes.splice(at, 0, ...Array.from({ length: 1 + (rng.nextU32() % 6) }, () => rng.nextU32() & 255));
        break;
      default: // a continuation bit on, lengthening a varint
        if (bytes.length > 0) bytes[at] |= 0x80;
    }
  }
  return Buffer.from(bytes);
}

test(
  'thousands of malformed or mutated Generate payloads: never INTERNAL or UNKNOWN, and the server still answers',
  {
    timeout: 240_000,
  },
  async (t) => {
    const encode = encoder();
    const bases = [
      encode(good),
      encode({ ...good, task: 'TASK_UNDERSTAND', requestId: 'fuzz', topLogprobs: 2 }),
      encode({ ...good, sampling: { ...good.sampling, temperature: 0.8, topK: 5, seed: 7, stop: ['x'] } }),
      encode({ parts: [{ image: { data: Buffer.from('not really an image'), mimeType: 'image/png' } }] }),
    ];
    const rng = new Rng(20240601);
    const count = 3000;
    const budgetMs = 150_000;
    const started = performance.now();
    const codes = new Map<number, number>();
    const samples = new Map<number, string>();
    let sent = 0;
    let client = ownConnection();
    try {
      while (sent < count && performance.now() - started < budgetMs) {
        // A fresh connection every 200 calls: the calls that stream are cancelled, and Node closes a connection after
        // about 1,000 resets (the rapid-reset test below).
        if (sent > 0 && sent % 200 === 0) {
          client.close();
          client = ownConnection();
        }
        const batch: Promise<void>[] = [];
        for (let i = 0; i < 16 && sent < count; i++, sent++) {
          const kind = rng.nextU32() % 4;
          const payload =
            kind === 0
              ? Buffer.from(Array.from({ length: rng.nextU32() % 48 }, () => rng.nextU32() & 255))
              : mutate(rng, bases[rng.nextU32() % bases.length]);
          batch.push(
            rawGenerate(client, payload).then((s) => {
              codes.set(s.code, (codes.get(s.code) ?? 0) + 1);
              if (!samples.has(s.code)) samples.set(s.code, `${payload.toString('hex')} → ${s.details}`);
            }),
          );
        }
        await Promise.all(batch);
      }
    } finally {
      client.close();
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    t.diagnostic(`${sent} payloads in ${seconds} s; statuses ${JSON.stringify(Object.fromEntries(codes))}`);
    for (const [code, sample] of samples) t.diagnostic(`status ${code}: ${sample.slice(0, 300)}`);
    assert.ok(sent >= 1000, `only ${sent} payloads sent within ${budgetMs} ms`);
    assert.equal(codes.get(grpc.status.INTERNAL) ?? 0, 0, samples.get(grpc.status.INTERNAL));
    assert.equal(codes.get(grpc.status.UNKNOWN) ?? 0, 0, samples.get(grpc.status.UNKNOWN));
    assert.ok((codes.get(grpc.status.INVALID_ARGUMENT) ?? 0) > 0, 'some payloads are refused as invalid');
    const decodeRefusal = samples.get(grpc.status.INVALID_ARGUMENT) ?? '';
    assert.ok(decodeRefusal.length > 0);
    // A valid 6-byte varint (task = 2^40 + 1) is refused by validation, naming the field.
    const wide = await rawGenerate(
      ownConnection(),
      Buffer.concat([encode(good), Buffer.from([0x10, 0x81, 0x80, 0x80, 0x80, 0x80, 0x20])]),
    );
    assert.equal(wide.code, grpc.status.INVALID_ARGUMENT, wide.details);
    assert.match(wide.details, /^task: unknown task 1099511627777/);
    const cut = await rawGenerate(ownConnection(), Buffer.from([0x0a, 0x05, 0x0a]));
    assert.equal(cut.code, grpc.status.INVALID_ARGUMENT, cut.details);
    assert.match(cut.details, /^GenerateRequest: not a valid protobuf message/);
    for (const [method, type] of [
      ['Tokenize', 'TokenizeRequest'],
      ['GetModelInfo', 'GetModelInfoRequest'],
    ]) {
      const s = await rawUnary(`/emu3.v1.Emu3/${method}`, Buffer.from([0x0a, 0x05, 0x0a]));
      assert.equal(s.code, grpc.status.INVALID_ARGUMENT, `${method}: ${s.details}`);
      assert.match(s.details, new RegExp(`^${type}: not a valid protobuf message`));
    }
    const answer = await generate(h.client, good).done;
    assert.equal(answer.ids.length, 2, 'a valid request is still answered');
  },
);

function rawUnary(path: string, payload: Buffer): Promise<{ code: number; details: string }> {
  const client = ownConnection();
  return new Promise((resolve) => {
    client.makeUnaryRequest(path, identity, identity, payload, (err) => {
      client.close();
      resolve({ code: err?.code ?? grpc.status.OK, details: err?.details ?? '' });
    });
  });
}

function vqLog(): Record<string, unknown>[] {
  return readFileSync(join(h.work, 'logs', 'vq.log'), 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
}

async function timedImageRequest(seed: number): Promise<number> {
  const img = await picture(256, 256, seed);
  const started = performance.now();
  const answer = await generate(h.client, {
    parts: [{ image: { data: img } }, { text: 'Describe.' }],
    sampling: { maxNewTokens: 1 },
  }).done;
  assert.equal(answer.ids.length, 1);
  return performance.now() - started;
}

test(
  '16 cancelled image requests do not delay the next one: the vq skips or abandons their encodes',
  {
    timeout: 180_000,
  },
  async (t) => {
    await timedImageRequest(1000); // warm-up
    const solo = Math.min(await timedImageRequest(1001), await timedImageRequest(1002));
    const images = await Promise.all(Array.from({ length: 16 }, (_, i) => picture(256, 256, 2000 + i)));
    const before = vqLog().filter((l) => l.msg === 'encode cancelled').length;
    const calls = images.map((img) =>
      generate(h.client, { parts: [{ image: { data: img } }, { text: 'Describe.' }], sampling: { maxNewTokens: 1 } }),
    );
    await sleep(100); // every Encode is sent; the first is running, the rest queued behind the single vq worker
    for (const c of calls) c.call.cancel();
    const outcomes = await Promise.allSettled(calls.map((c) => c.done));
    const after = await timedImageRequest(3000);
    let cancelled: Record<string, unknown>[] = [];
    for (let i = 0; i < 50; i++) {
      cancelled = vqLog()
        .filter((l) => l.msg === 'encode cancelled')
        .slice(before);
      if (cancelled.length >= 14) break;
      await sleep(100);
    }
    const steps = cancelled.map((l) => l.step);
    const finished = outcomes.filter((o) => o.status === 'fulfilled').length;
    t.diagnostic(
      `solo ${solo.toFixed(0)} ms, after 16 cancels ${after.toFixed(0)} ms; cancelled at ${JSON.stringify(steps)}; ` +
        `${finished} answered before the cancel`,
    );
    assert.ok(cancelled.length + finished >= 14, `only ${cancelled.length} encodes were cancelled at the vq`);
    assert.ok(steps.filter((s) => s === 'queued').length >= 12, 'queued encodes never run');
    assert.ok(steps.filter((s) => s === 'model').length <= 1, 'at most the running encode finishes its model run');
    // Before, the new request waited for all 16 encodes; now for at most the one in the model.
    assert.ok(after < 4 * solo + 500, `after the cancels ${after.toFixed(0)} ms, solo ${solo.toFixed(0)} ms`);
  },
);

/** Opens `n` Generate streams on one raw HTTP/2 connection and resets each at once (RST_STREAM CANCEL). */
async function resetStorm(n: number): Promise<{ reset: number; goaway: number | null }> {
  const session = http2.connect(`http://${h.system.address}`);
  session.on('error', () => {});
  let goaway: number | null = null;
  session.on('goaway', (code) => {
    goaway = code;
  });
  let reset = 0;
  for (; reset < n && goaway === null && !session.destroyed; reset++) {
    const stream = session.request({
      ':method': 'POST',
      ':path': GENERATE,
      'content-type': 'application/grpc',
      te: 'trailers',
    });
    stream.on('error', () => {});
    await new Promise((r) => setImmediate(r));
    stream.close(http2.constants.NGHTTP2_CANCEL);
  }
  await sleep(200);
  session.destroy();
  return { reset, goaway };
}

test(
  "one connection resetting 1,500 streams does not fail another connection's streams",
  { timeout: 180_000 },
  async (t) => {
    // h.client's connection is not the raw session's: the storm may close only its own connection.
    const client = h.client;
    const streaming = Array.from(
      { length: 12 },
      (_, i) =>
        generate(client, { parts: [{ text: `Count to ${i}.` }], sampling: { maxNewTokens: 24, ignoreEos: true } }).done,
    );
    const storm = await resetStorm(1500);
    const answers = await Promise.all(streaming);
    t.diagnostic(`the resetting connection sent ${storm.reset} resets; GOAWAY code ${storm.goaway}`);
    for (const a of answers) assert.equal(a.ids.length, 24);
    assert.equal(storm.reset >= 1000, true);
    const again = await generate(h.client, good).done;
    assert.equal(again.ids.length, 2);
  },
);

test(
  'image requests past their deadline free the vq too: queued encodes are skipped',
  { timeout: 120_000 },
  async () => {
    const before = vqLog().filter((l) => l.msg === 'encode cancelled').length;
    const images = await Promise.all(Array.from({ length: 6 }, (_, i) => picture(256, 256, 4000 + i)));
    const outcomes = await Promise.allSettled(
      images.map(
        (img) =>
          generate(
            h.client,
            { parts: [{ image: { data: img } }, { text: 'Describe.' }], sampling: { maxNewTokens: 1 } },
            { deadlineMs: 200 },
          ).done,
      ),
    );
    // The first image may be encoded and answered within the deadline (its encode starts at once); the others queue
    // behind it and expire there.
    const expired = outcomes.filter((o) => o.status === 'rejected');
    for (const o of expired) assert.equal((o as PromiseRejectedResult).reason.code, grpc.status.DEADLINE_EXCEEDED);
    assert.ok(expired.length >= 4, `${expired.length} of 6 image requests expired`);
    let cancelled: Record<string, unknown>[] = [];
    for (let i = 0; i < 50 && cancelled.length < 5; i++) {
      cancelled = vqLog()
        .filter((l) => l.msg === 'encode cancelled')
        .slice(before);
      await sleep(100);
    }
    const steps = JSON.stringify(cancelled.map((l) => l.step));
    // Only the request holding the worker when the deadlines expired can be past the queue (in the model, whose ORT
    // run ends with its result dropped, or preprocessing); the worker then goes to the next request, which may reach
    // preprocessing before its own cancel arrives (the deadlines expire together). The rest never left the queue.
    assert.ok(cancelled.filter((l) => l.step === 'model').length <= 1, steps);
    assert.ok(cancelled.filter((l) => l.step === 'queued').length >= Math.max(3, cancelled.length - 2), steps);
    await timedImageRequest(4100); // and the next image request is answered
  },
);
