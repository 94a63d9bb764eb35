// The failure model (docs/architecture.md, "Failure model") with real processes: the last shard is killed mid-answer
// and started again at the same address; the coordinator keeps the sequences, waits for the stage, resets the pipeline
// and prefills them again. The client sees a delay, not an error, and the same tokens (greedy, and sampled with a fixed
// seed).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { startChild } from '../../cli/system.js';
import { generate, type Harness, sleep, startHarness } from './pipeline-harness.js';

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

test('a shard killed mid-answer and restarted: the answers complete unchanged', { timeout: 180_000 }, async () => {
  const greedy = { parts: [{ text: 'Count slowly.' }], sampling: { maxNewTokens: 40, ignoreEos: true } };
  const sampled = {
    parts: [{ text: 'Tell a story.' }],
    sampling: { temperature: 0.8, topK: 20, seed: 42, maxNewTokens: 40, ignoreEos: true },
  };
  const calm = await Promise.all([generate(h.client, greedy).done, generate(h.client, sampled).done]);

  const first = generate(h.client, greedy);
  const second = generate(h.client, sampled);
  let deltas = 0;
  first.call.on('data', (m: { delta?: unknown }) => {
    if (m.delta) deltas++;
  });
  for (const started = Date.now(); deltas < 5; await sleep(5))
    if (Date.now() - started > 60_000) throw new Error(`only ${deltas} deltas in 60 s: the answer is not under way`);
  const victim = h.system.children.find((c) => c.name === 'shard-1')!;
  victim.process.kill('SIGKILL');
  await victim.exited;
  await sleep(300);
  const [a, b] = h.system.stages[1];
  h.system.children.push(
    startChild(
      'shard-1-restarted',
      victim.address,
      [
        'shard',
        '--model',
        h.modelDir,
        '--layers',
        `${a}-${b}`,
        '--listen',
        victim.address,
        ...h.system.shardSecurityArgs,
      ],
      join(h.work, 'logs'),
    ),
  );
  const [greedyAnswer, sampledAnswer] = await Promise.all([first.done, second.done]);
  assert.deepEqual(greedyAnswer.ids, calm[0].ids, 'greedy answer unchanged');
  assert.deepEqual(sampledAnswer.ids, calm[1].ids, 'seeded answer unchanged');
  assert.equal(greedyAnswer.final.finishReason, 'FINISH_REASON_LENGTH');
  const log = readFileSync(join(h.work, 'logs', 'coordinator.log'), 'utf8');
  assert.match(log, /"msg":"pipeline back"/, 'the coordinator went through a recovery');
});
