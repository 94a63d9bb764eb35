// Who may call what, on real processes: vq + 2 shards + coordinator (cli/system.ts, as `emu3 up` starts them) with a
// public token file, and `emu3 gateway` in front. Every service and route is called without a credential, with a
// wrong one and with the right one; health stays open. A stranger's crafted messages to the last shard (the
// measured cache poisoning) change nobody's answer, while the same message from inside the pipeline does (so the
// test would notice the guard missing). Tokens never reach the children's log files.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { type Child, freePort, startChild } from '../../cli/system.js';
import { TOKEN_FILE_CHECK_MS } from '../../lib/rpc/auth.js';
import { type ClientCredentials, createClient, unaryCall } from '../../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import {
  type ForwardRequest,
  type ForwardResponse,
  RESULT_SINK_SERVICE,
  SHARD_PROTO,
  SHARD_SERVICE,
  type ShardInfo,
} from '../../lib/rpc/shard-wire.js';
import { VQ_PROTO, VQ_SERVICE } from '../../lib/rpc/vq-wire.js';
import { type Answer, generate, type Harness, sleep, startHarness } from './pipeline-harness.js';

const T = { timeout: 120_000 };
const PUBLIC_TOKEN = 'public-token-4d1f9c0e7a2b';
const ROTATED_TOKEN = 'rotated-token-8e3a1f5b9c7d';
const WRONG = 'not-the-token';

let h: Harness;
let tokenFile: string;
let gateway: Child;
let gatewayUrl: string;
let internalToken: string;

/** The three ways to call: nothing, a wrong token, the right one. */
function variants(right: string): { name: string; creds?: ClientCredentials; ok: boolean }[] {
  return [
    { name: 'without a token', creds: undefined, ok: false },
    { name: 'with a wrong token', creds: { token: () => WRONG }, ok: false },
    { name: 'with the right token', creds: { token: () => right }, ok: true },
  ];
}

async function statusOf(p: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await p;
    return { code: grpc.status.OK, details: '' };
  } catch (err) {
    const e = err as grpc.ServiceError;
    return { code: e.code, details: e.details };
  }
}

function call(proto: string, service: string, address: string, method: string, req: object, creds?: ClientCredentials) {
  const c = createClient(proto, service, address, { credentials: creds });
  return unaryCall(c, method, req, { deadlineMs: 10_000 }).finally(() => c.close());
}

/** Opens a Forward stream, writes `requests`, half-closes; resolves with the acks, or rejects with the call's error. */
function forward(address: string, requests: ForwardRequest[], creds?: ClientCredentials): Promise<ForwardResponse[]> {
  const c = createClient(SHARD_PROTO, SHARD_SERVICE, address, { credentials: creds });
  const stream = (c as unknown as { Forward(): grpc.ClientDuplexStream<ForwardRequest, ForwardResponse> }).Forward();
  const acks: ForwardResponse[] = [];
  return new Promise<ForwardResponse[]>((resolve, reject) => {
    stream.on('data', (a: ForwardResponse) => {
      acks.push(a);
      if (acks.length === requests.length) stream.end();
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(acks));
    for (const r of requests) stream.write(r);
  }).finally(() => c.close());
}

function internalCreds(): ClientCredentials {
  return { token: () => internalToken };
}

async function lastInfo(): Promise<ShardInfo> {
  const last = h.system.shardAddresses[h.system.shardAddresses.length - 1];
  return (await call(SHARD_PROTO, SHARD_SERVICE, last, 'Info', {}, internalCreds())) as ShardInfo;
}

/**
 * The last shard's Info once its KV has settled: a finished answer's free (and its prompt's copy into the cache)
 * travels down the pipeline after the answer's last token, so it may land a moment after the client has it.
 */
async function settledInfo(): Promise<ShardInfo> {
  let prev = await lastInfo();
  for (let i = 0; i < 50; i++) {
    await new Promise((r) => setTimeout(r, 100));
    const now = await lastInfo();
    if (now.kv_tokens_in_use === prev.kv_tokens_in_use && now.kv_slots_in_use === prev.kv_slots_in_use) return now;
    prev = now;
  }
  throw new Error("the last shard's KV did not settle within 5 s");
}

before(
  async () => {
    const { mkdtempSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    tokenFile = join(mkdtempSync(join(tmpdir(), 'emu3-sec-')), 'tokens');
    writeFileSync(tokenFile, `# public API tokens\n${PUBLIC_TOKEN}\n`, { mode: 0o600 });
    h = await startHarness([], [], { authTokenFile: tokenFile });
    internalToken = readFileSync(h.system.internalTokenFile, 'utf8').trim();
    const port = await freePort();
    const address = `127.0.0.1:${port}`;
    gateway = startChild(
      'gateway',
      address,
      [
        'gateway',
        '--listen',
        address,
        '--coordinator',
        h.system.address,
        '--auth-token-file',
        tokenFile,
        '--drain-timeout-ms',
        '500',
      ],
      join(h.work, 'logs'),
    );
    gatewayUrl = `http://${address}`;
    const until = Date.now() + 60_000;
    for (;;) {
      try {
        if ((await fetch(`${gatewayUrl}/health`)).status === 200) break;
      } catch {
        // not listening yet
      }
      if (Date.now() > until) throw new Error(`gateway not healthy: ${gateway.tail.join('\n')}`);
      await sleep(200);
    }
  },
  { timeout: 240_000 },
);

after(async () => {
  if (gateway && gateway.process.exitCode === null) {
    gateway.process.kill('SIGTERM');
    await gateway.exited;
  }
  await h?.close();
});

const hello = { parts: [{ text: 'Tell me about security.' }], sampling: { maxNewTokens: 6 } };

test('the public API: every method needs the bearer token; health does not', T, async () => {
  for (const v of variants(PUBLIC_TOKEN)) {
    const client = emu3Client(h.system.address, {}, v.creds);
    try {
      const gen = await statusOf(generate(client, hello).done);
      const tok = await statusOf(unaryCall(client, 'Tokenize', hello, { deadlineMs: 10_000 }));
      const info = await statusOf(unaryCall(client, 'GetModelInfo', {}, { deadlineMs: 10_000 }));
      for (const [what, s] of Object.entries({ Generate: gen, Tokenize: tok, GetModelInfo: info })) {
        assert.equal(s.code, v.ok ? grpc.status.OK : grpc.status.UNAUTHENTICATED, `${what} ${v.name}: ${s.details}`);
        if (!v.ok) assert.match(s.details, new RegExp(`^Emu3/${what}|emu3\\.v1\\.Emu3/${what}`));
        assert.ok(!s.details.includes(WRONG), 'the refusal does not echo the token');
      }
    } finally {
      client.close();
    }
  }
  const health = await call(HEALTH_PROTO, HEALTH_SERVICE, h.system.address, 'Check', { service: '' });
  assert.deepEqual(health, { status: 'SERVING' });
});

test('the public token file is re-read when it changes', T, async () => {
  writeFileSync(tokenFile, `${ROTATED_TOKEN}\n`);
  await sleep(TOKEN_FILE_CHECK_MS + 300);
  const oldClient = emu3Client(h.system.address, {}, { token: () => PUBLIC_TOKEN });
  const newClient = emu3Client(h.system.address, {}, { token: () => ROTATED_TOKEN });
  try {
    const old = await statusOf(unaryCall(oldClient, 'GetModelInfo', {}, { deadlineMs: 10_000 }));
    assert.equal(old.code, grpc.status.UNAUTHENTICATED, 'the removed token no longer works');
    const fresh = await statusOf(unaryCall(newClient, 'GetModelInfo', {}, { deadlineMs: 10_000 }));
    assert.equal(fresh.code, grpc.status.OK, fresh.details);
    const viaGateway = await fetch(`${gatewayUrl}/v1/models`, {
      headers: { authorization: `Bearer ${ROTATED_TOKEN}` },
    });
    assert.equal(viaGateway.status, 200, 'the gateway re-read it too');
  } finally {
    oldClient.close();
    newClient.close();
    writeFileSync(tokenFile, `${PUBLIC_TOKEN}\n`);
    await sleep(TOKEN_FILE_CHECK_MS + 300);
  }
});

test(
  'the HTTP gateway: every route but /health needs the key; refusals are 401 with OpenAI error JSON',
  T,
  async () => {
    const chat = {
      method: 'POST',
      path: '/v1/chat/completions',
      body: { model: 'emu3-tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4 },
    };
    const routes = [
      chat,
      { method: 'GET', path: '/v1/models' },
      { method: 'GET', path: '/v1/models/emu3-tiny' },
      { method: 'POST', path: '/v1/images/generations', body: { prompt: 'a cat' } },
    ];
    const headersFor = (auth?: string): Record<string, string> => ({
      'content-type': 'application/json',
      ...(auth ? { authorization: auth } : {}),
    });
    for (const r of routes) {
      for (const auth of [undefined, `Bearer ${WRONG}`, `Basic ${PUBLIC_TOKEN}`]) {
        const res = await fetch(`${gatewayUrl}${r.path}`, {
          method: r.method,
          headers: headersFor(auth),
          body: r.body ? JSON.stringify(r.body) : undefined,
        });
        assert.equal(res.status, 401, `${r.method} ${r.path} with ${auth ?? 'no authorization'}`);
        assert.equal(res.headers.get('www-authenticate'), 'Bearer');
        const body = (await res.json()) as { error: Record<string, unknown> };
        assert.deepEqual(Object.keys(body.error).sort(), ['code', 'message', 'param', 'type']);
        assert.equal(body.error.code, 'invalid_api_key');
        assert.equal(body.error.type, 'invalid_request_error');
        assert.ok(!String(body.error.message).includes(WRONG));
      }
      const ok = await fetch(`${gatewayUrl}${r.path}`, {
        method: r.method,
        headers: headersFor(`Bearer ${PUBLIC_TOKEN}`),
        body: r.body ? JSON.stringify(r.body) : undefined,
      });
      // With the key the request reaches the coordinator and is answered (an image too: emu3-tiny draws it).
      assert.equal(
        ok.status,
        200,
        `${r.method} ${r.path} with the key: ${ok.status} ${(await ok.text()).slice(0, 300)}`,
      );
    }
    const health = await fetch(`${gatewayUrl}/health`);
    assert.equal(health.status, 200, 'health needs no key');
  },
);

test('shards, vq and the ResultSink obey only the pipeline: a stranger is refused, health is open', T, async () => {
  const before = await lastInfo();
  for (const v of variants(internalToken)) {
    const expect = v.ok ? grpc.status.OK : grpc.status.UNAUTHENTICATED;
    for (const shard of h.system.shardAddresses) {
      const info = await statusOf(call(SHARD_PROTO, SHARD_SERVICE, shard, 'Info', {}, v.creds));
      assert.equal(info.code, expect, `Shard/Info at ${shard} ${v.name}: ${info.details}`);
      if (!v.ok) {
        // Reset and Free with a stranger's credentials: refused before the handler runs.
        const reset = await statusOf(
          call(SHARD_PROTO, SHARD_SERVICE, shard, 'Reset', { epoch: Date.now() * 10 }, v.creds),
        );
        assert.equal(reset.code, grpc.status.UNAUTHENTICATED, `Reset ${v.name}: ${reset.details}`);
        const free = await statusOf(call(SHARD_PROTO, SHARD_SERVICE, shard, 'Free', { slots: [0, 1, 2] }, v.creds));
        assert.equal(free.code, grpc.status.UNAUTHENTICATED, `Free ${v.name}: ${free.details}`);
        const fwd = await statusOf(forward(shard, [{ heartbeat: {}, epoch: Date.now() * 10 }], v.creds));
        assert.equal(fwd.code, grpc.status.UNAUTHENTICATED, `Forward ${v.name}: ${fwd.details}`);
      } else {
        // Free of slots nobody holds is a no-op: the right token gets through.
        const free = await statusOf(call(SHARD_PROTO, SHARD_SERVICE, shard, 'Free', { slots: [] }, v.creds));
        assert.equal(free.code, grpc.status.OK, free.details);
      }
      const health = await call(HEALTH_PROTO, HEALTH_SERVICE, shard, 'Check', { service: '' });
      assert.deepEqual(health, { status: 'SERVING' });
    }
    const vqInfo = await statusOf(call(VQ_PROTO, VQ_SERVICE, h.system.vqAddress, 'Info', {}, v.creds));
    assert.equal(vqInfo.code, expect, `VqService/Info ${v.name}: ${vqInfo.details}`);
    const encode = await statusOf(
      call(VQ_PROTO, VQ_SERVICE, h.system.vqAddress, 'Encode', { image: Buffer.from('x'), mime_type: '' }, v.creds),
    );
    // With the token the (bad) image reaches the service and is refused for what it is.
    assert.equal(encode.code, v.ok ? grpc.status.INVALID_ARGUMENT : grpc.status.UNAUTHENTICATED, encode.details);
    const sink = await statusOf(deliverNothing(h.system.sinkAddress, v.creds));
    assert.equal(sink.code, expect, `ResultSink/Deliver ${v.name}: ${sink.details}`);
  }
  assert.deepEqual(await call(HEALTH_PROTO, HEALTH_SERVICE, h.system.vqAddress, 'Check', { service: '' }), {
    status: 'SERVING',
  });
  const now = await lastInfo();
  assert.equal(now.epoch, before.epoch, "a stranger's Reset did not change the epoch");
  assert.equal(now.kv_tokens_in_use, before.kv_tokens_in_use, "a stranger's Free did not free anything");
  // The pipeline itself is untouched.
  const client = emu3Client(h.system.address, {}, { token: () => PUBLIC_TOKEN });
  try {
    const a = await generate(client, hello).done;
    assert.equal(a.final.usage.completionTokens, 6);
  } finally {
    client.close();
  }
});

function deliverNothing(address: string, creds?: ClientCredentials): Promise<unknown> {
  const c = createClient(SHARD_PROTO, RESULT_SINK_SERVICE, address, { credentials: creds });
  return new Promise((resolve, reject) => {
    const stream = (
      c as unknown as {
        Deliver(cb: (err: grpc.ServiceError | null, r: unknown) => void): grpc.ClientWritableStream<object>;
      }
    ).Deliver((err, r) => (err ? reject(err) : resolve(r)));
    stream.end();
  }).finally(() => c.close());
}

/** Poisoning the last shard's cached prompts: frees of every slot (the cached prompt's among them). */
function poison(info: ShardInfo): ForwardRequest[] {
  const slots = Array.from({ length: info.kv_slots }, (_, i) => i);
  return [{ kv: { free_slots: slots, copies: [] }, epoch: info.epoch }];
}

/**
 * A micro-batch of the kind the measured attack sent: it rewrites position 3 of every slot with junk hidden states
 * (each slot's first 3 positions copied from the next slot, where that one holds them), replying to the real
 * ResultSink.
 */
function overwrite(info: ShardInfo): ForwardRequest {
  const n = info.kv_slots;
  const d = info.hidden_size;
  return {
    epoch: info.epoch,
    batch: {
      micro_batch_id: 4242,
      items: Array.from({ length: n }, (_, s) => ({
        sequence_id: 9000 + s,
        slot: s,
        start_position: 3,
        token_count: 1,
        sample: false,
        copy_prefix: { from_slot: (s + 1) % n, length: 3 },
      })),
      token_ids: [],
      hidden_states: { data: Buffer.alloc(n * d * 4, 0x41), dtype: 'DTYPE_FLOAT32', shape: [n, d] },
      sampling: [],
      reply_to: h.system.sinkAddress,
      traceparent: '',
    },
  };
}

test("a stranger's crafted Forward to the last shard changes nobody's answer", T, async () => {
  const last = h.system.shardAddresses[h.system.shardAddresses.length - 1];
  const client = emu3Client(h.system.address, {}, { token: () => PUBLIC_TOKEN });
  const ask = {
    parts: [{ text: 'The cached prompt: a long enough system text to be cached.' }],
    sampling: { maxNewTokens: 8 },
  };
  try {
    const first: Answer = await generate(client, ask).done;
    const cached = await generate(client, ask).done;
    assert.ok(cached.final.usage.cachedTokens > 0, 'the second identical request uses the cached prompt');
    assert.deepEqual(cached.ids, first.ids);
    const info = await settledInfo();
    assert.ok(info.kv_tokens_in_use > 0, 'the last shard holds the cached prompt');
    // The stranger knows the epoch and the slot count (as the measured attack did) but not the secret.
    for (const creds of [undefined, { token: () => WRONG }])
      for (const message of [overwrite(info), ...poison(info)]) {
        const s = await statusOf(forward(last, [message], creds));
        assert.equal(s.code, grpc.status.UNAUTHENTICATED, s.details);
      }
    const after = await lastInfo();
    assert.equal(after.kv_tokens_in_use, info.kv_tokens_in_use, 'nothing was freed');
    const again = await generate(client, ask).done;
    assert.deepEqual(again.ids, first.ids, 'the same answer');
    assert.equal(again.final.usage.cachedTokens, cached.final.usage.cachedTokens, 'from the same cached prompt');

    // A message naming a ResultSink the shard was not configured with is not run, even from inside the pipeline.
    const [ack] = await forward(
      last,
      [
        {
          epoch: info.epoch,
          batch: {
            micro_batch_id: 987654321,
            items: [],
            token_ids: [],
            hidden_states: null,
            sampling: [],
            reply_to: '127.0.0.1:9',
            traceparent: '',
          },
        },
      ],
      internalCreds(),
    );
    assert.equal(ack.error?.kind, 'STAGE_ERROR_KIND_INTERNAL');
    assert.match(ack.error?.message ?? '', /reply_to "127\.0\.0\.1:9" is not one of this stage's --allow-reply-to/);

    // Control: the same poisoning with the pipeline's secret does take effect, so the check above can fail.
    const acks = await forward(last, poison(await lastInfo()), internalCreds());
    assert.equal(acks.length, 1);
    assert.equal((await lastInfo()).kv_tokens_in_use, 0, 'with the secret, the frees ran');
    const poisoned = await statusOf(generate(client, ask).done.then((a) => assert.deepEqual(a.ids, first.ids)));
    assert.notEqual(poisoned.code, grpc.status.OK, 'the poisoned cache changes the answer (or fails it)');
  } finally {
    client.close();
  }
});

test('no token appears in any log file', T, async () => {
  const dir = join(h.work, 'logs');
  const files = readdirSync(dir);
  assert.ok(
    files.includes('coordinator.log') && files.includes('shard-1.log') && files.includes('gateway.log'),
    files.join(),
  );
  for (const f of files) {
    const text = readFileSync(join(dir, f), 'utf8');
    for (const secret of [PUBLIC_TOKEN, ROTATED_TOKEN, internalToken, WRONG])
      assert.ok(!text.includes(secret), `${f} contains a token`);
  }
  assert.match(readFileSync(join(dir, 'coordinator.log'), 'utf8'), /"msg":"call refused"/, 'refusals are logged');
});
