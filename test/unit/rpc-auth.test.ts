// lib/rpc/auth.ts: token files, constant-time matching, the refusal rules, and the guard that serve() wraps around every method
// against a real grpc-js server on loopback (in-process): refused calls never reach their handler, on unary, server-
// and bidi-streaming methods alike; health stays open. Also the shard's reply_to allowlist.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import {
  bearerToken,
  clientToken,
  isHealth,
  parseTokens,
  refusal,
  TOKEN_FILE_CHECK_MS,
  TokenFile,
  tokenMatches,
} from '../../lib/rpc/auth.js';
import { type ClientCredentials, createClient, unaryCall } from '../../lib/rpc/client.js';
import { bidi, implement, serverStream, unary } from '../../lib/rpc/handlers.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { createLogger } from '../../lib/rpc/log.js';
import { protoRoot, serviceDefinition } from '../../lib/rpc/proto.js';
import { serve } from '../../lib/rpc/serve.js';
import { ReplyAllowlist } from '../../services/shard/links.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('parseTokens: one a line, trimmed; blank lines and # comments skipped', () => {
  assert.deepEqual(parseTokens('# keys\n  alpha  \n\r\nbeta\r\n#gamma\n'), ['alpha', 'beta']);
  assert.deepEqual(parseTokens(''), []);
});

test('tokenMatches compares whole tokens: prefixes, extensions and case differ', () => {
  const tokens = ['s3cret-one', 'other'];
  assert.equal(tokenMatches('s3cret-one', tokens), true);
  assert.equal(tokenMatches('other', tokens), true);
  for (const bad of ['s3cret', 's3cret-one-', 'S3CRET-ONE', '', 'x'])
    assert.equal(tokenMatches(bad, tokens), false, bad);
  assert.equal(tokenMatches('anything', []), false);
});

test('bearerToken reads "Bearer <token>" only', () => {
  assert.equal(bearerToken('Bearer abc'), 'abc');
  assert.equal(bearerToken('bearer  abc '), 'abc');
  for (const bad of ['abc', 'Basic abc', 'Bearer', 'Bearer a b', undefined, 7]) assert.equal(bearerToken(bad), null);
});

test('refusal: health is open; missing, malformed and wrong tokens are UNAUTHENTICATED without echoing them', () => {
  const policy = { source: '--auth-token-file', tokens: () => ['good'], open: isHealth };
  assert.equal(refusal(policy, '/grpc.health.v1.Health/Check', undefined), null);
  assert.equal(refusal(policy, '/emu3.v1.Emu3/Generate', 'Bearer good'), null);
  const cases: [unknown, RegExp][] = [
    [undefined, /^emu3\.v1\.Emu3\/Generate needs "authorization: Bearer <token>" with a token of --auth-token-file$/],
    ['Token wrong-one', /must be "Bearer <token>"/],
    ['Bearer wrong-one', /the bearer token is not one of --auth-token-file$/],
  ];
  for (const [header, message] of cases) {
    const r = refusal(policy, '/emu3.v1.Emu3/Generate', header);
    assert.equal(r?.code, grpc.status.UNAUTHENTICATED);
    assert.match(r.details, message);
    assert.ok(!r.details.includes('wrong-one'));
  }
});

test('TokenFile re-reads a changed file, keeps the last tokens while it is gone, and refuses a missing one', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-auth-'));
  try {
    const file = join(dir, 'tokens');
    assert.throws(() => new TokenFile(file), /cannot read the token file .*tokens: ENOENT/);
    writeFileSync(file, 'first\n');
    const tokens = new TokenFile(file);
    assert.deepEqual(tokens.tokens(), ['first']);
    writeFileSync(file, 'second\nthird\n');
    await sleep(TOKEN_FILE_CHECK_MS + 50);
    assert.deepEqual(tokens.tokens(), ['second', 'third']);
    assert.equal(tokens.first(), 'second');
    rmSync(file);
    await sleep(TOKEN_FILE_CHECK_MS + 50);
    assert.deepEqual(tokens.tokens(), ['second', 'third']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('clientToken: EMU3_AUTH_TOKEN first, else the first token of the file, else none', () => {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-auth-'));
  try {
    const file = join(dir, 'tokens');
    writeFileSync(file, '# mine\nfrom-file\nsecond\n');
    assert.equal(clientToken(file, { EMU3_AUTH_TOKEN: 'from-env' })?.(), 'from-env');
    assert.equal(clientToken(file, {})?.(), 'from-file');
    assert.equal(clientToken(undefined, {}), undefined);
    writeFileSync(file, '\n');
    assert.throws(() => clientToken(file, {}), /holds no token/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('ReplyAllowlist: only the configured addresses; the refusal names the address', () => {
  const list = new ReplyAllowlist([' 10.0.0.5:50060 ', 'coordinator:50060', '']);
  assert.equal(list.allows('coordinator:50060'), true);
  assert.equal(list.allows('10.0.0.5:50060'), true);
  assert.equal(list.allows('attacker:50060'), false);
  assert.equal(list.refusal('coordinator:50060'), null);
  assert.match(list.refusal('attacker:1') ?? '', /^reply_to "attacker:1" is not one of this stage's --allow-reply-to/);
});

const ECHO_PROTO = join(dirname(protoRoot()), 'test', 'fixtures', 'rpc', 'echo.proto');
const ECHO_SERVICE = 'emu3.test.v1.Echo';

test(
  'serve() with an auth policy: no handler runs for a refused call (unary, server stream, bidi); health is open; refusals are logged at most once a second',
  { timeout: 30_000 },
  async () => {
    const lines: { msg: string; why?: string }[] = [];
    const log = createLogger('test', { level: 'warn', write: (l) => lines.push(JSON.parse(l)) });
    let handled = 0;
    const running = await serve({
      address: '127.0.0.1:0',
      log,
      handleSignals: false,
      auth: { source: 'the test tokens', tokens: () => ['right'] },
      services: [
        {
          name: ECHO_SERVICE,
          definition: serviceDefinition(ECHO_PROTO, ECHO_SERVICE),
          implementation: implement(
            { service: 'Echo', log },
            {
              Once: unary(async (req: { text: string }) => {
                handled++;
                return req;
              }),
              Repeat: serverStream(async (req: { text: string }, send) => {
                handled++;
                await send(req);
              }),
              Chat: bidi(async (reqs: AsyncIterable<{ text: string }>, send) => {
                handled++;
                for await (const r of reqs) await send(r);
              }),
            },
          ),
        },
      ],
    });
    type Stub = Record<
      string,
      (...a: unknown[]) => grpc.ClientReadableStream<unknown> & grpc.ClientDuplexStream<unknown, unknown>
    >;
    const run = async (creds: ClientCredentials | undefined): Promise<number[]> => {
      const client = createClient(ECHO_PROTO, ECHO_SERVICE, running.address, { credentials: creds });
      const stub = client as unknown as Stub;
      const ended = (s: grpc.ClientReadableStream<unknown>) =>
        new Promise<number>((resolve) => {
          s.on('data', () => {});
          s.on('error', (e: grpc.ServiceError) => resolve(e.code));
          s.on('end', () => resolve(grpc.status.OK));
        });
      try {
        const once = await unaryCall(client, 'Once', { text: 'a' }).then(
          () => grpc.status.OK,
          (e: grpc.ServiceError) => e.code,
        );
        const repeat = await ended(stub.Repeat({ text: 'b' }));
        const chat = stub.Chat();
        const chatEnded = ended(chat);
        chat.write({ text: 'c' });
        chat.end();
        return [once, repeat, await chatEnded];
      } finally {
        client.close();
      }
    };
    try {
      const U = grpc.status.UNAUTHENTICATED;
      assert.deepEqual(await run(undefined), [U, U, U]);
      assert.deepEqual(await run({ token: () => 'wrong' }), [U, U, U]);
      assert.equal(handled, 0, 'no handler ran for a refused call');
      // Six refusals within a moment: one log line (throttled), naming no token.
      const refused = lines.filter((l) => l.msg === 'call refused');
      assert.ok(refused.length >= 1 && refused.length <= 2, `${refused.length} lines`);
      assert.ok(!JSON.stringify(lines).includes('wrong'));
      assert.deepEqual(await run({ token: () => 'right' }), [0, 0, 0]);
      assert.equal(handled, 3);
      const health = createClient(HEALTH_PROTO, HEALTH_SERVICE, running.address);
      assert.deepEqual(await unaryCall(health, 'Check', { service: '' }), { status: 'SERVING' });
      health.close();
    } finally {
      await running.shutdown('test');
    }
  },
);
