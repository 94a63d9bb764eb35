import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../lib/util/rng.js';
import {
  applyRepetitionPenalty,
  applyTaskMask,
  logSoftmax,
  processLastStageRow,
  topKLogprobs,
} from '../../services/coordinator/logits.js';

test('repetition penalty follows HF: positive logits divided, negative multiplied, each id once', () => {
  const logits = new Float64Array([2, -2, 1, 0, 3]);
  applyRepetitionPenalty(logits, 2, [0, 1, 1, 3, 0]);
  assert.deepEqual([...logits], [1, -4, 1, 0, 3]);
});

test('task mask removes exactly [start, end)', () => {
  const logits = new Float64Array([1, 2, 3, 4, 5, 6]);
  applyTaskMask(logits, { kind: 'exclude', start: 2, end: 5 });
  assert.deepEqual([...logits], [1, 2, -Infinity, -Infinity, -Infinity, 6]);
});

test('top-K logprobs are normalised over the whole vocabulary, sorted, ties by lower id', () => {
  const logits = [0, 3, 1, 3, -1, 2];
  const lse = Math.log(logits.reduce((s, x) => s + Math.exp(x), 0));
  const c = topKLogprobs(logits, 3);
  assert.deepEqual([...c.ids], [1, 3, 5]);
  for (let i = 0; i < 3; i++) assert.ok(Math.abs(c.logprobs[i] - (logits[c.ids[i]] - lse)) < 1e-12);
  const total = logSoftmax(logits).reduce((s, x) => s + Math.exp(x), 0);
  assert.ok(Math.abs(total - 1) < 1e-12);
});

test('top-K over a large random row equals a full sort', () => {
  const rng = new Rng(7);
  const row = new Float32Array(5000);
  rng.fillNormal(row, 3);
  const c = topKLogprobs(row, 50);
  const order = [...row.keys()].sort((a, b) => row[b] - row[a] || a - b).slice(0, 50);
  assert.deepEqual([...c.ids], order);
});

test('last-stage row: mask, then penalty, then temperature, then log-softmax (hand computed)', () => {
  // vocab 6, visual ids [4, 6) masked; id 0 penalised by 2; temperature 0.5.
  const raw = [2, 1, -1, 0, 9, 9];
  const r = processLastStageRow(raw, {
    mask: { kind: 'exclude', start: 4, end: 6 },
    temperature: 0.5,
    repetitionPenalty: 2,
    penalisedIds: [0, 2],
    topK: 2,
    fullRow: false,
  });
  // after penalty: [1, 1, -2, 0]; / 0.5 → [2, 2, -4, 0]
  const z = [2, 2, -4, 0];
  const lse = Math.log(z.reduce((s, x) => s + Math.exp(x), 0));
  assert.equal(r.kind, 'candidates');
  if (r.kind !== 'candidates') return;
  assert.deepEqual([...r.candidates.ids], [0, 1]);
  assert.ok(Math.abs(r.candidates.logprobs[0] - (2 - lse)) < 1e-12);
  const full = processLastStageRow(raw, {
    mask: { kind: 'exclude', start: 4, end: 6 },
    temperature: 0.5,
    repetitionPenalty: 2,
    penalisedIds: [0, 2],
    topK: 1,
    fullRow: true,
  });
  assert.equal(full.kind, 'full');
  if (full.kind !== 'full') return;
  assert.equal(full.logprobs[4], -Infinity);
  assert.ok(Math.abs(full.logprobs[2] - (-4 - lse)) < 1e-12);
  assert.deepEqual(raw, [2, 1, -1, 0, 9, 9], 'input row is not modified');
});

test('greedy (temperature 0) leaves logits unscaled', () => {
  const r = processLastStageRow([1, 2, 0], {
    mask: { kind: 'none' },
    temperature: 0,
    repetitionPenalty: 1,
    penalisedIds: [],
    topK: 1,
    fullRow: false,
  });
  assert.equal(r.kind, 'candidates');
  if (r.kind !== 'candidates') return;
  const lse = Math.log(Math.exp(1) + Math.exp(2) + 1);
  assert.equal(r.candidates.ids[0], 1);
  assert.ok(Math.abs(r.candidates.logprobs[0] - (2 - lse)) < 1e-12);
});
