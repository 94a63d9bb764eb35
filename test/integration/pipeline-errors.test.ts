// Bad inputs, cancellation and deadlines against the real system (prefix cache off, so "no KV in use" is exactly 0
// on every shard). Each refusal names the field, and the next good request still succeeds.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type * as grpc from '@grpc/grpc-js';
import { generate, type Harness, picture, shardInfos, sleep, startHarness, unary } from './pipeline-harness.js';

let h: Harness;
before(async () => {
  h = await startHarness(['--prefix-cache-entries', '0', '--max-message-bytes', String(1024 * 1024)]);
});
after(async () => {
  await h?.close();
});

const good = { parts: [{ text: 'Hello there.' }], sampling: { maxNewTokens: 3, ignoreEos: true } };

async function refused(request: object, code: string, field: RegExp): Promise<void> {
  await assert.rejects(generate(h.client, request).done, (err: grpc.ServiceError) => {
    assert.equal(err.code, { INVALID_ARGUMENT: 3, RESOURCE_EXHAUSTED: 8 }[code], `${err.code} ${err.details}`);
    assert.match(err.details, field);
    return true;
  });
  const ok = await generate(h.client, good).done;
  assert.equal(ok.ids.length, 3, 'the next good request succeeds');
}

test('bad inputs get INVALID_ARGUMENT (RESOURCE_EXHAUSTED for size) naming the field', async () => {
  const img = await picture(64, 64, 3);
  await refused({ parts: [] }, 'INVALID_ARGUMENT', /parts/);
  await refused({ ...good, task: 7 }, 'INVALID_ARGUMENT', /task/);
  await refused(
    { ...good, task: 'TASK_GENERATE_IMAGE' },
    'INVALID_ARGUMENT',
    /sampling\.max_new_tokens.*TASK_GENERATE_IMAGE/,
  );
  await refused({ ...good, sampling: { temperature: Number.NaN } }, 'INVALID_ARGUMENT', /sampling\.temperature/);
  await refused({ ...good, sampling: { temperature: -1 } }, 'INVALID_ARGUMENT', /sampling\.temperature/);
  await refused({ ...good, sampling: { topP: 0 } }, 'INVALID_ARGUMENT', /sampling\.top_p/);
  await refused({ ...good, sampling: { topP: 1.5 } }, 'INVALID_ARGUMENT', /sampling\.top_p/);
  await refused({ ...good, sampling: { topK: -1 } }, 'INVALID_ARGUMENT', /sampling\.top_k/);
  await refused({ ...good, sampling: { maxNewTokens: 5000 } }, 'INVALID_ARGUMENT', /sampling\.max_new_tokens/);
  await refused({ parts: [{ text: 'word '.repeat(3000) }] }, 'INVALID_ARGUMENT', /parts.*context/);
  await refused(
    { parts: [...Array.from({ length: 5 }, () => ({ image: { data: img } })), { text: 'hi' }] },
    'INVALID_ARGUMENT',
    /parts.*images/,
  );
  await refused(
    { parts: [{ image: { data: Buffer.from('not an image at all') } }, { text: 'hi' }] },
    'INVALID_ARGUMENT',
    /parts\[0\]\.image/,
  );
  await refused({ parts: [{ image: { data: Buffer.alloc(2 * 1024 * 1024, 7) } }] }, 'RESOURCE_EXHAUSTED', /./);
});

async function assertNoKvInUse(): Promise<void> {
  for (let i = 0; i < 50; i++) {
    const infos = await shardInfos(h.system);
    if (infos.every((s) => s.kv_tokens_in_use === 0 && s.kv_slots_in_use === 0)) return;
    await sleep(100);
  }
  const infos = await shardInfos(h.system);
  assert.deepEqual(
    infos.map((s) => [s.kv_tokens_in_use, s.kv_slots_in_use]),
    infos.map(() => [0, 0]),
    'KV tokens and slots in use on every shard',
  );
}

test('a cancelled stream and a stream past its deadline leave zero KV in use on every shard', async () => {
  const long = { parts: [{ text: 'Tell me a long story.' }], sampling: { maxNewTokens: 1500, ignoreEos: true } };
  const cancelled = generate(h.client, long, { cancelAfterDeltas: 3 });
  await assert.rejects(cancelled.done, (e: grpc.ServiceError) => e.code === 1);
  await assertNoKvInUse();
  const late = generate(h.client, long, { deadlineMs: 400 });
  await assert.rejects(late.done, (e: grpc.ServiceError) => e.code === 4);
  await assertNoKvInUse();
  const info = await unary<{ kvTokensInUse: number }>(h.client, 'GetModelInfo', {});
  assert.equal(Number(info.kvTokensInUse), 0);
  const ok = await generate(h.client, good).done;
  assert.equal(ok.ids.length, 3);
  await assertNoKvInUse();
});
