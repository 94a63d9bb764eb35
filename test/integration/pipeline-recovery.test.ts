// Recovery that ends, with real processes: a stage that never comes back fails the requests it held with UNAVAILABLE
// naming it (within --stage-timeout-ms) while health says NOT_SERVING and new requests are refused at once; when it
// returns the service heals. A coordinator killed with -9 leaves no KV behind: the shards free it once their
// coordinator lease runs out. Cancelled and expired requests by the thousand leave no KV on any stage.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { startChild } from '../../cli/system.js';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { HEALTH_PROTO, HEALTH_SERVICE } from '../../lib/rpc/health.js';
import { generate, type Harness, shardInfos, sleep, startHarness } from './pipeline-harness.js';

const LEASE_MS = 1500;
let h: Harness;
before(async () => {
  h = await startHarness(
    ['--stage-timeout-ms', '3000', '--prefix-cache-entries', '0', '--max-queue', '1000'],
    ['--coordinator-lease', String(LEASE_MS)],
  );
});
after(async () => {
  await h?.close();
});

async function health(address: string): Promise<string> {
  const c = createClient(HEALTH_PROTO, HEALTH_SERVICE, address);
  try {
    const r = await unaryCall<object, { status: string }>(c, 'Check', { service: '' }, { deadlineMs: 2000 });
    return r.status;
  } finally {
    c.close();
  }
}

async function until(what: string, timeoutMs: number, check: () => Promise<boolean>): Promise<number> {
  const started = performance.now();
  while (!(await check())) {
    if (performance.now() - started > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(100);
  }
  return performance.now() - started;
}

const text = (t: string, maxNewTokens: number) => ({
  parts: [{ text: t }],
  sampling: { maxNewTokens, ignoreEos: true },
});

test('10,000 cancelled or expired requests leave no KV held on any stage', { timeout: 240_000 }, async () => {
  // 40 connections, each with its own subchannel: Node's HTTP/2 allows a connection about 1,000 stream resets in a
  // burst (docs/serving.md), and every cancel or expiry is one; 250 a connection stay well within it.
  const clients = Array.from({ length: 40 }, () =>
    emu3Client(h.system.address, { 'grpc.use_local_subchannel_pool': 1 }),
  );
  let ended = 0;
  let streamed = 0;
  try {
    for (let wave = 0; wave < 20; wave++) {
      const calls = Array.from({ length: 500 }, (_, i) => {
        const n = wave * 500 + i;
        const client = clients[n % clients.length];
        // A quarter each: cancelled after the first streamed token, after the third, expired mid-answer (a deadline
        // of 0.1–0.6 s), and cancelled at once (queued or prefilling). The answers could run to 2,000 tokens.
        const kind = n % 4;
        const g = generate(
          client,
          text(`request ${n}`, 2000),
          kind === 0 || kind === 1
            ? { cancelAfterDeltas: kind === 0 ? 1 : 3 }
            : kind === 2
              ? { deadlineMs: 100 + ((n * 37) % 500) }
              : {},
        );
        if (kind === 3) setTimeout(() => g.call.cancel(), n % 10);
        let counted = false;
        g.call.on('data', () => {
          if (!counted) streamed++;
          counted = true;
        });
        return g.done.then(
          () => assert.fail(`request ${n} finished: it should have been cut off`),
          (err: grpc.ServiceError) => {
            assert.ok(
              err.code === grpc.status.CANCELLED || err.code === grpc.status.DEADLINE_EXCEEDED,
              `request ${n}: ${err.code} ${err.details}`,
            );
            ended++;
          },
        );
      });
      await Promise.all(calls);
    }
  } finally {
    for (const c of clients) c.close();
  }
  assert.equal(ended, 10_000);
  assert.ok(streamed >= 5000, `only ${streamed} requests got as far as decoding before they were cut off`);
  await until('every stage back to 0 KV', 10_000, async () =>
    (await shardInfos(h.system)).every((i) => i.kv_tokens_in_use === 0 && i.kv_slots_in_use === 0),
  );
  const after = await generate(h.client, text('still serving', 4)).done;
  assert.equal(after.final.usage.completionTokens, 4);
});

test(
  'a stage that never returns: UNAVAILABLE naming it within the stage timeout, NOT_SERVING, then healing',
  {
    timeout: 120_000,
  },
  async () => {
    const long = generate(h.client, text('A long answer.', 1500));
    let deltas = 0;
    long.call.on('data', (m: { delta?: unknown }) => {
      if (m.delta) deltas++;
    });
    await until('the answer is under way', 30_000, async () => deltas >= 3);
    const victim = h.system.children.find((c) => c.name === 'shard-1')!;
    const killedAt = performance.now();
    victim.process.kill('SIGKILL');
    const err = await long.done.then(
      () => assert.fail('the answer finished without its stage'),
      (e: grpc.ServiceError) => e,
    );
    const failedAfter = performance.now() - killedAt;
    assert.equal(err.code, grpc.status.UNAVAILABLE, err.details);
    assert.match(err.details, new RegExp(`stage \\[\\d+, \\d+\\) at ${victim.address.replace(/\./g, '\\.')}`));
    assert.match(err.details, /--stage-timeout-ms 3000/);
    assert.ok(failedAfter < 3000 + 4000, `failed after ${Math.round(failedAfter)} ms`);
    assert.equal(await health(h.system.address), 'NOT_SERVING');
    const refusedAt = performance.now();
    const refused = await generate(h.client, text('anyone there?', 4)).done.then(
      () => assert.fail('a request was accepted with a stage missing'),
      (e: grpc.ServiceError) => e,
    );
    assert.equal(refused.code, grpc.status.UNAVAILABLE);
    assert.match(refused.details, new RegExp(victim.address.replace(/\./g, '\\.')));
    assert.ok(performance.now() - refusedAt < 1000, 'refused at once');

    const [a, b] = h.system.stages[1];
    const restarted = startChild(
      'shard-1-back',
      victim.address,
      [
        'shard',
        '--model',
        h.modelDir,
        '--layers',
        `${a}-${b}`,
        '--listen',
        victim.address,
        '--coordinator-lease',
        String(LEASE_MS),
        ...h.system.shardSecurityArgs,
      ],
      join(h.work, 'logs'),
    );
    h.system.children.push(restarted);
    await until('health SERVING again', 60_000, async () => (await health(h.system.address)) === 'SERVING');
    const healed = await generate(h.client, text('back again', 4)).done;
    assert.equal(healed.final.usage.completionTokens, 4);
  },
);

test(
  'kill -9 of the coordinator: every shard frees its KV within the lease, no new coordinator needed',
  {
    timeout: 60_000,
  },
  async () => {
    const running = generate(h.client, text('Keep going.', 1500));
    running.done.catch(() => {});
    let deltas = 0;
    running.call.on('data', (m: { delta?: unknown }) => {
      if (m.delta) deltas++;
    });
    await until('the answer is under way', 30_000, async () => deltas >= 3);
    assert.ok(
      (await shardInfos(h.system)).every((i) => i.kv_tokens_in_use > 0),
      'the running answer holds KV',
    );
    const coordinator = h.system.children.find((c) => c.name === 'coordinator')!;
    coordinator.process.kill('SIGKILL');
    await coordinator.exited;
    const freedAfter = await until('every stage back to 0 KV', LEASE_MS + 3000, async () =>
      (await shardInfos(h.system)).every((i) => i.kv_tokens_in_use === 0 && i.kv_slots_in_use === 0),
    );
    assert.ok(freedAfter <= LEASE_MS + 3000, `freed after ${Math.round(freedAfter)} ms`);
  },
);
