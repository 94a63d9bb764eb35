// `emu3 up` giving up on a child (--max-restarts 0, so the first death is one too many), with real processes: on vq
// it keeps serving text-only requests and says image requests fail; on a shard nothing can be answered, so it stops
// everything and exits 1. The same system checks that coordinator limit flags passed through up are in force.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { generate, unary } from './pipeline-harness.js';
import { isAlive, removeWork, startUp, type UpProcess, writeTinyModel } from './up-harness.js';

let work: string;
let up: UpProcess & { address: string };
let client: grpc.Client;

before(async () => {
  const model = await writeTinyModel();
  work = model.work;
  up = await startUp([
    '--model',
    model.modelDir,
    '--listen',
    '127.0.0.1:0',
    '--max-restarts',
    '0',
    '--coordinator-arg=--max-text-chars=40',
    '--coordinator-arg=--max-stop-strings=2',
  ]);
  client = emu3Client(up.address);
});
after(() => {
  client?.close();
  up?.killAll();
  if (work) removeWork(work);
});

test(
  'coordinator limit flags given through up are in force and reported by GetModelInfo',
  { timeout: 60_000 },
  async () => {
    const info = await unary<{ limits: { maxTextChars: number; maxStopStrings: number; maxTopLogprobs: number } }>(
      client,
      'GetModelInfo',
      {},
    );
    assert.equal(info.limits.maxTextChars, 40);
    assert.equal(info.limits.maxStopStrings, 2);
    assert.equal(info.limits.maxTopLogprobs, 20, 'an unset limit keeps its default');
    await assert.rejects(generate(client, { parts: [{ text: 'x'.repeat(41) }] }).done, (e: grpc.ServiceError) => {
      assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
      assert.match(e.details, /parts\[\]\.text.*40 characters/);
      return true;
    });
  },
);

test(
  'vq dies for good: up says so and keeps serving text; then a shard dies for good: up stops everything, exit 1',
  { timeout: 120_000 },
  async () => {
    const vq = up.pids.get('vq')!;
    process.kill(vq, 'SIGKILL');
    await up.waitFor(/^emu3 up: vq \(.*\) killed by SIGKILL; giving up on it: 1 failures within 60000 ms/, 5000);
    await up.waitFor(/^emu3 up: ERROR vq is down for good: requests with images now fail/, 5000);
    const answer = await generate(client, { parts: [{ text: 'Hello' }], sampling: { maxNewTokens: 4 } }).done;
    assert.equal(answer.final.usage.completionTokens, 4, 'text-only requests are still served');
    assert.ok(isAlive(up.proc.pid!), 'up keeps running');

    process.kill(up.pids.get('shard-1')!, 'SIGKILL');
    await up.waitFor(/^emu3 up: ERROR shard-1 cannot be kept running, so nothing can be answered; stopping all/, 5000);
    const { code } = await up.exited;
    assert.equal(code, 1, up.lines.join('\n'));
    for (const [name, pid] of up.pids) assert.ok(!isAlive(pid), `${name} (pid ${pid}) stopped`);
  },
);
