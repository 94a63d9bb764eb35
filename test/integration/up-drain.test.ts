// Stopping `emu3 up` with real processes. The first Ctrl-C (SIGINT to up's whole process group, as a terminal sends
// it) drains: the coordinator gets SIGTERM first and lets running answers finish within --drain-timeout-ms, ending
// the rest with a final FINISH_REASON_CANCELLED and status OK; then the shards and vq stop. A second Ctrl-C kills
// everything at once.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type * as grpc from '@grpc/grpc-js';
import { emu3Client } from '../../cli/chat.js';
import { type Answer, generate, sleep } from './pipeline-harness.js';
import { isAlive, removeWork, startUp, type UpProcess, writeTinyModel } from './up-harness.js';

let work: string;
let modelDir: string;
const running: UpProcess[] = [];

before(async () => {
  ({ work, modelDir } = await writeTinyModel());
});
after(() => {
  for (const up of running) up.killAll();
  if (work) removeWork(work);
});

async function upWithAnswer(drainTimeoutMs: number, maxNewTokens: number) {
  const up = await startUp(
    ['--model', modelDir, '--listen', '127.0.0.1:0', '--drain-timeout-ms', String(drainTimeoutMs)],
    120_000,
    { group: true },
  );
  running.push(up);
  const client: grpc.Client = emu3Client(up.address);
  const answer = generate(client, {
    parts: [{ text: 'Tell a long story.' }],
    sampling: { maxNewTokens, ignoreEos: true },
  });
  let deltas = 0;
  answer.call.on('data', (m: { delta?: unknown }) => {
    if (m.delta) deltas++;
  });
  while (deltas < 5) await sleep(5);
  const done = answer.done.then(
    (a: Answer) => a,
    (err: grpc.ServiceError) =>
      assert.fail(
        `the answer ended with status ${err.code} "${err.details}" instead of a final message and status OK ` +
          "(the coordinator's drain: stop admission, finish or cancel the running answers, then exit)",
      ),
  );
  return { up, client, done };
}

test(
  'Ctrl-C: a running answer finishes normally when the drain timeout allows, then everything stops',
  { timeout: 180_000 },
  async () => {
    const { up, client, done } = await upWithAnswer(120_000, 300);
    try {
      process.kill(-up.proc.pid!, 'SIGINT');
      const answer = await done;
      assert.equal(answer.final.finishReason, 'FINISH_REASON_LENGTH');
      assert.equal(answer.final.usage.completionTokens, 300);
      const { code } = await up.exited;
      assert.equal(code, 0, up.lines.join('\n'));
      assert.ok(up.lines.some((l) => /^emu3 up: SIGINT: draining/.test(l)));
      for (const [name, pid] of up.pids) assert.ok(!isAlive(pid), `${name} stopped`);
    } finally {
      client.close();
    }
  },
);

test(
  'Ctrl-C with a short drain timeout: the answer ends with a final FINISH_REASON_CANCELLED and status OK',
  { timeout: 120_000 },
  async () => {
    const { up, client, done } = await upWithAnswer(1000, 1900);
    try {
      const signalled = Date.now();
      process.kill(-up.proc.pid!, 'SIGINT');
      const answer = await done;
      assert.equal(answer.final.finishReason, 'FINISH_REASON_CANCELLED');
      assert.ok(answer.final.usage.completionTokens < 1900, 'cut short');
      const { code } = await up.exited;
      assert.equal(code, 0, up.lines.join('\n'));
      assert.ok(Date.now() - signalled < 15_000, `stopped ${Date.now() - signalled} ms after Ctrl-C`);
    } finally {
      client.close();
    }
  },
);

test('a second Ctrl-C kills everything within 2 s', { timeout: 120_000 }, async () => {
  const { up, client, done } = await upWithAnswer(120_000, 1900);
  done.catch(() => {}); // killed: its end does not matter here
  try {
    process.kill(-up.proc.pid!, 'SIGINT');
    await up.waitFor(/^emu3 up: SIGINT: draining/, 5000);
    await sleep(800);
    const second = Date.now();
    process.kill(-up.proc.pid!, 'SIGINT');
    const { code } = await up.exited;
    assert.ok(Date.now() - second < 2000, `exited ${Date.now() - second} ms after the second Ctrl-C`);
    assert.equal(code, 130, up.lines.join('\n'));
    for (const [name, pid] of up.pids) assert.ok(!isAlive(pid), `${name} (pid ${pid}) killed`);
  } finally {
    client.close();
  }
});
