// vq + 2 shards + coordinator as real processes (test/integration/pipeline-harness.ts): answers are the model's,
// batching changes nothing, the prefix cache skips a repeated image prompt.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  type Answer,
  generate,
  type Harness,
  picture,
  singleStageGreedy,
  startHarness,
  unary,
} from './pipeline-harness.js';

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

test('the greedy answer to an image + text equals the single-stage greedy (visual ids masked) continuation of its prompt ids', async () => {
  const image = await picture(96, 80, 1);
  const parts = [{ image: { data: image, mimeType: 'image/png' } }, { text: 'Describe the image.' }];
  const { tokenIds } = await unary<{ tokenIds: number[] }>(h.client, 'Tokenize', { parts });
  const answer = await generate(h.client, { parts, sampling: { maxNewTokens: 8, ignoreEos: true } }).done;
  assert.equal(answer.final.usage.promptTokens, tokenIds.length);
  assert.ok(answer.final.timings.vqMs > 0);
  const info = await unary<{ visualTokenBegin: number; visualTokenEnd: number }>(h.client, 'GetModelInfo', {});
  const visual = { begin: info.visualTokenBegin, end: info.visualTokenEnd };
  assert.ok(
    answer.ids.every((id) => id < visual.begin || id >= visual.end),
    'no visual ids in a text answer',
  );
  const reference = await singleStageGreedy(h.modelDir, tokenIds, 8, visual);
  assert.deepEqual(answer.ids, reference);
});

test('32 concurrent streams of mixed lengths all complete, each equal to its solo run', async () => {
  const request = (i: number) => ({
    parts: [{ text: `Question ${i}: ${'tell me more '.repeat(1 + (i % 7) * 6)}` }],
    sampling: { maxNewTokens: 3 + (i % 10), ignoreEos: true },
  });
  const solo: Answer[] = [];
  for (let i = 0; i < 32; i++) solo.push(await generate(h.client, request(i)).done);
  const together = await Promise.all(Array.from({ length: 32 }, (_, i) => generate(h.client, request(i)).done));
  together.forEach((a, i) => {
    assert.equal(a.final.finishReason, 'FINISH_REASON_LENGTH', `stream ${i}`);
    assert.equal(a.ids.length, 3 + (i % 10));
    assert.deepEqual(a.ids, solo[i].ids, `stream ${i} equals its solo run`);
    assert.equal(a.text, solo[i].text);
  });
});

test('a repeated image + prompt reports cached tokens and skips its prefill', async () => {
  const image = await picture(128, 96, 7);
  const req = {
    parts: [{ image: { data: image } }, { text: 'What is in it?' }],
    sampling: { maxNewTokens: 4, ignoreEos: true },
  };
  const first = await generate(h.client, req).done;
  const second = await generate(h.client, req).done;
  assert.equal(second.final.usage.cachedTokens, first.final.usage.promptTokens - 1);
  assert.deepEqual(second.ids, first.ids);
  // Only the last prompt token runs: the time to first token minus the VQ encode drops well below the first's.
  const prefill = (a: typeof first) => a.final.timings.ttftMs - a.final.timings.vqMs;
  console.log(`prefill+first token: first ${prefill(first).toFixed(1)} ms, repeated ${prefill(second).toFixed(1)} ms`);
});

test('a seeded sampled answer repeats exactly with different batch neighbours', async () => {
  const req = {
    parts: [{ text: 'Write a short poem.' }],
    sampling: { temperature: 0.9, topK: 50, seed: 1234, maxNewTokens: 10, ignoreEos: true },
  };
  const alone = await generate(h.client, req).done;
  const neighbours = Array.from(
    { length: 5 },
    (_, i) =>
      generate(h.client, {
        parts: [{ text: `Other ${i} ${'x '.repeat(i * 9)}` }],
        sampling: { maxNewTokens: 6 + i, ignoreEos: true },
      }).done,
  );
  const crowded = await generate(h.client, req).done;
  await Promise.all(neighbours);
  assert.equal(alone.final.seed, 1234);
  assert.deepEqual(crowded.ids, alone.ids);
  const topP = { ...req, sampling: { temperature: 1, topP: 0.8, seed: 5, maxNewTokens: 6, ignoreEos: true } };
  const a = await generate(h.client, topP).done;
  const b = await generate(h.client, topP).done;
  assert.deepEqual(a.ids, b.ids, 'full-row (top-p) sampling repeats too');
});
