// TLS on real processes: a system whose every process was given a throwaway CA's certificate (mTLS inside, TLS on the
// public port). A client with a foreign CA's certificate, or none, is refused by every internal service; one with the
// pipeline's certificate still needs the secret. Then `emu3 up --tls --auth-token-file F`: the commands it prints
// work as printed, and fail without the credentials.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { binPath } from '../../cli/system.js';
import { makeThrowawayPki, type ThrowawayPki } from '../../cli/throwaway-pki.js';
import { type ClientCredentials, createClient, unaryCall } from '../../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { SHARD_PROTO, SHARD_SERVICE } from '../../lib/rpc/shard-wire.js';
import { VQ_PROTO, VQ_SERVICE } from '../../lib/rpc/vq-wire.js';
import { generate, type Harness, startHarness } from './pipeline-harness.js';
import { removeWork, startUp, writeTinyModel } from './up-harness.js';

const T = { timeout: 120_000 };

let pki: ThrowawayPki;
let foreign: ThrowawayPki;
let h: Harness;
let secret: string;

before(
  async () => {
    pki = makeThrowawayPki();
    foreign = makeThrowawayPki([], 7, 'a foreign CA');
    h = await startHarness([], [], { tls: pki.tls });
    secret = readFileSync(h.system.internalTokenFile, 'utf8').trim();
  },
  { timeout: 240_000 },
);

after(async () => {
  await h?.close();
  pki?.remove();
  foreign?.remove();
});

async function codeOf(p: Promise<unknown>): Promise<number> {
  try {
    await p;
    return grpc.status.OK;
  } catch (err) {
    return (err as grpc.ServiceError).code;
  }
}

function info(proto: string, service: string, address: string, creds?: ClientCredentials): Promise<number> {
  const c = createClient(proto, service, address, { credentials: creds });
  return codeOf(unaryCall(c, 'Info', {}, { deadlineMs: 5000 })).finally(() => c.close());
}

test('internal services: only a client with a certificate of the pipeline CA and the secret is obeyed', T, async () => {
  const token = () => secret;
  const ours = pki.tls;
  const theirs = foreign.tls;
  const cases: { name: string; creds?: ClientCredentials; ok: boolean }[] = [
    { name: 'plaintext', creds: { token }, ok: false },
    { name: 'TLS without a client certificate', creds: { token, tls: { ca: ours.ca } }, ok: false },
    {
      name: "a foreign CA's client certificate",
      creds: { token, tls: { ca: ours.ca, cert: theirs.cert, key: theirs.key } },
      ok: false,
    },
    { name: 'trusting only a foreign CA', creds: { token, tls: theirs }, ok: false },
    { name: 'the right certificate without the secret', creds: { tls: ours }, ok: false },
    { name: 'the right certificate and the secret', creds: { token, tls: ours }, ok: true },
  ];
  const targets = [
    ...h.system.shardAddresses.map((a) => ({ proto: SHARD_PROTO, service: SHARD_SERVICE, address: a })),
    { proto: VQ_PROTO, service: VQ_SERVICE, address: h.system.vqAddress },
  ];
  for (const t of targets)
    for (const c of cases) {
      const code = await info(t.proto, t.service, t.address, c.creds);
      if (c.ok) assert.equal(code, grpc.status.OK, `${t.service} at ${t.address}, ${c.name}`);
      else assert.notEqual(code, grpc.status.OK, `${t.service} at ${t.address}, ${c.name}: refused`);
      if (c.name === 'the right certificate without the secret') assert.equal(code, grpc.status.UNAUTHENTICATED);
    }
  // Health needs the TLS handshake but no token or client certificate... only on the public port; inside, mTLS.
  const hc = createClient(HEALTH_PROTO, HEALTH_SERVICE, h.system.shardAddresses[0], { credentials: { tls: ours } });
  try {
    assert.deepEqual(await unaryCall(hc, 'Check', { service: '' }, { deadlineMs: 5000 }), { status: 'SERVING' });
  } finally {
    hc.close();
  }
});

test('the public port serves TLS: a client checking the CA is answered, a plaintext one is not', T, async () => {
  const tlsClient = emu3Client(h.system.address, {}, { tls: { ca: pki.tls.ca } });
  const plain = emu3Client(h.system.address);
  const wrongCa = emu3Client(h.system.address, {}, { tls: { ca: foreign.tls.ca } });
  try {
    const a = await generate(tlsClient, { parts: [{ text: 'Hello over TLS' }], sampling: { maxNewTokens: 4 } }).done;
    assert.equal(a.final.usage.completionTokens, 4);
    for (const [what, c] of [
      ['plaintext', plain],
      ['a foreign CA', wrongCa],
    ] as const) {
      const code = await codeOf(unaryCall(c, 'GetModelInfo', {}, { deadlineMs: 5000 }));
      assert.equal(code, grpc.status.UNAVAILABLE, what);
    }
  } finally {
    tlsClient.close();
    plain.close();
    wrongCa.close();
  }
});

function httpsGet(url: string, ca: Buffer, headers: Record<string, string> = {}): Promise<number> {
  return new Promise((resolve, reject) => {
    get(url, { ca, headers }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    }).on('error', reject);
  });
}

test(
  'emu3 up --tls --auth-token-file: the printed chat command works as printed; without credentials it is refused',
  { timeout: 240_000 },
  async () => {
    const model = await writeTinyModel();
    const secrets = mkdtempSync(join(tmpdir(), 'emu3-up-sec-'));
    const tokenFile = join(secrets, 'tokens');
    writeFileSync(tokenFile, 'up-public-token-31415\n', { mode: 0o600 });
    const up = await startUp(
      ['--model', model.modelDir, '--listen', '127.0.0.1:0', '--tls', '--auth-token-file', tokenFile],
      180_000,
    );
    const run = promisify(execFile);
    try {
      const printed = up.lines.find((l) => l.includes('npx emu3 chat'))!;
      const m = /npx emu3 chat (.*) --image/.exec(printed)!;
      const args = m[1].split(' ');
      assert.ok(args.includes('--auth-token-file') && args.includes('--tls-ca'), printed);
      const ok = await run(process.execPath, [binPath(), 'chat', ...args, '--max-new-tokens', '3', 'Hi'], {
        env: { ...process.env, EMU3_AUTH_TOKEN: '' },
      });
      assert.match(ok.stderr, /finish/i, ok.stderr);
      const ca = args[args.indexOf('--tls-ca') + 1];
      const refused = await run(
        process.execPath,
        [binPath(), 'chat', '--addr', up.address, '--tls-ca', ca, '--max-new-tokens', '3', 'Hi'],
        { env: { ...process.env, EMU3_AUTH_TOKEN: '' } },
      ).then(
        () => null,
        (e: { code: number; stderr: string }) => e,
      );
      assert.ok(refused, 'chat without the token fails');
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /UNAUTHENTICATED/);
      const viaEnv = await run(
        process.execPath,
        [binPath(), 'chat', '--addr', up.address, '--tls-ca', ca, '--max-new-tokens', '3', 'Hi'],
        { env: { ...process.env, EMU3_AUTH_TOKEN: 'up-public-token-31415' } },
      );
      assert.match(viaEnv.stderr, /finish/i, 'EMU3_AUTH_TOKEN works too');
      const base = /OpenAI-compatible HTTP API: (https:\/\/\S+\/v1)/.exec(up.lines.join('\n'))![1];
      const caPem = readFileSync(ca);
      assert.equal(await httpsGet(`${base}/models`, caPem), 401);
      assert.equal(await httpsGet(`${base}/models`, caPem, { authorization: 'Bearer up-public-token-31415' }), 200);
      assert.equal(await httpsGet(base.replace(/\/v1$/, '/health'), caPem), 200);
    } finally {
      up.proc.kill('SIGTERM');
      const exited = await Promise.race([up.exited, new Promise((r) => setTimeout(() => r(null), 60_000))]);
      if (exited === null) up.killAll();
      removeWork(model.work);
      rmSync(secrets, { recursive: true, force: true });
    }
  },
);
