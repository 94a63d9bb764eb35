import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Rng } from '../../lib/util/rng.js';
import { type Candidates, logSoftmax } from '../../services/coordinator/logits.js';
import {
  type Distribution,
  planLastStage,
  RequestSampler,
  type TruncationParams,
  topAlternatives,
  truncate,
} from '../../services/coordinator/sampler.js';

// Whole-vocabulary probabilities of the five most likely ids (the rest of the vocabulary holds no mass).
const ids = [7, 3, 9, 1, 4];
const probs = [0.5, 0.2, 0.15, 0.1, 0.05];
const candidates: Candidates = { ids: Int32Array.from(ids), logprobs: Float64Array.from(probs.map(Math.log)) };
const cand: Distribution = { kind: 'candidates', candidates };
const fullRow = new Float64Array(12).fill(Number.NEGATIVE_INFINITY);
ids.forEach((id, i) => {
  fullRow[id] = Math.log(probs[i]);
});
const full: Distribution = { kind: 'full', logprobs: fullRow };

const params = (p: Partial<TruncationParams>): TruncationParams => ({
  temperature: 1,
  topK: 0,
  topP: 1,
  minP: 0,
  ...p,
});

function assertSet(d: Distribution, p: Partial<TruncationParams>, wantIds: number[], wantProbs: number[]) {
  const s = truncate(d, params(p));
  assert.deepEqual([...s.ids], wantIds);
  const total = wantProbs.reduce((a, b) => a + b, 0);
  wantProbs.forEach((w, i) => assert.ok(Math.abs(s.probs[i] - w / total) < 1e-12, `prob ${i}: ${s.probs[i]}`));
}

test('top-k keeps exactly k and renormalises', () => {
  assertSet(cand, { topK: 3 }, [7, 3, 9], [0.5, 0.2, 0.15]);
  assertSet(cand, { topK: 1 }, [7], [1]);
});

test('top-p keeps tokens while the mass before them is below p', () => {
  assertSet(cand, { topP: 0.45 }, [7], [0.5]);
  assertSet(cand, { topP: 0.69 }, [7, 3], [0.5, 0.2]);
  assertSet(cand, { topP: 0.71 }, [7, 3, 9], [0.5, 0.2, 0.15]);
  assertSet(full, { topP: 0.71 }, [7, 3, 9], [0.5, 0.2, 0.15]);
});

test('top-p applies to the top-k-renormalised distribution (transformers order)', () => {
  // After top-k 4 the mass before id 9 is 0.7/0.95 = 0.737 ≥ 0.72; without top-k it is 0.7 < 0.72.
  assertSet(cand, { topK: 4, topP: 0.72 }, [7, 3], [0.5, 0.2]);
  assertSet(cand, { topP: 0.72 }, [7, 3, 9], [0.5, 0.2, 0.15]);
});

test('min-p drops tokens below min_p times the top probability', () => {
  assertSet(cand, { minP: 0.25 }, [7, 3, 9], [0.5, 0.2, 0.15]);
  assertSet(cand, { minP: 0.35 }, [7, 3], [0.5, 0.2]);
  assertSet(cand, { minP: 1 }, [7], [1]);
});

test('greedy takes the most likely id (ties: the lower id)', () => {
  const s = new RequestSampler(params({ temperature: 0 }), 1);
  assert.deepEqual(s.next(cand), { id: 7, logprob: Math.log(0.5) });
  const tie = new Float64Array([-2, -1, -1, -3]);
  assert.equal(s.next({ kind: 'full', logprobs: tie }).id, 1);
});

function frequencies(d: Distribution, p: Partial<TruncationParams>, seed: number, n: number): Map<number, number> {
  const s = new RequestSampler(params(p), seed);
  const counts = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    const id = s.next(d).id;
    counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

// Each observed frequency within 5 standard deviations of the expected binomial count; nothing outside the set.
function assertFrequencies(counts: Map<number, number>, expected: Map<number, number>, n: number) {
  for (const id of counts.keys()) assert.ok(expected.has(id), `id ${id} was drawn but is outside the set`);
  for (const [id, p] of expected) {
    const got = counts.get(id) ?? 0;
    const sd = Math.sqrt(n * p * (1 - p));
    assert.ok(Math.abs(got - n * p) <= 5 * sd + 1, `id ${id}: ${got} draws, expected ${n * p} ± ${5 * sd}`);
  }
}

test('sampling frequencies match the truncated distribution (candidates and full row)', () => {
  const n = 20000;
  const top3 = new Map([
    [7, 0.5 / 0.85],
    [3, 0.2 / 0.85],
    [9, 0.15 / 0.85],
  ]);
  assertFrequencies(frequencies(cand, { topK: 3 }, 42, n), top3, n);
  assertFrequencies(frequencies(full, { topP: 0.71 }, 43, n), top3, n);
  const all = new Map(ids.map((id, i) => [id, probs[i]]));
  assertFrequencies(frequencies(full, {}, 44, n), all, n);
  const minP = new Map([
    [7, 0.5 / 0.7],
    [3, 0.2 / 0.7],
  ]);
  assertFrequencies(frequencies(full, { minP: 0.35 }, 45, n), minP, n);
});

test('the same seed gives the same tokens whatever else is sampled in between', () => {
  const p = params({ topK: 5 });
  const solo = new RequestSampler(p, 2024);
  const soloIds = Array.from({ length: 200 }, () => solo.next(cand).id);
  const a = new RequestSampler(p, 2024);
  const neighbours = [new RequestSampler(p, 1), new RequestSampler(params({}), 2)];
  const batched: number[] = [];
  for (let i = 0; i < 200; i++) {
    for (let j = 0; j < i % 3; j++) neighbours[j % 2].next(j % 2 ? full : cand);
    batched.push(a.next(cand).id);
  }
  assert.deepEqual(batched, soloIds);
  const other = new RequestSampler(p, 2025);
  assert.notDeepEqual(
    Array.from({ length: 200 }, () => other.next(cand).id),
    soloIds,
  );
});

test('plan: greedy and top-k use candidates (K widened for top_logprobs); other sampling gets the full row', () => {
  assert.deepEqual(planLastStage(params({ temperature: 0 })), { topK: 1, fullRow: false });
  assert.deepEqual(planLastStage(params({ temperature: 0 }), 5), { topK: 5, fullRow: false });
  assert.deepEqual(planLastStage(params({ topK: 50 }), 5), { topK: 50, fullRow: false });
  assert.deepEqual(planLastStage(params({ topK: 3 }), 5), { topK: 5, fullRow: false });
  assert.deepEqual(planLastStage(params({ topP: 0.9 })), { topK: 1, fullRow: true });
  assert.deepEqual(planLastStage(params({})), { topK: 1, fullRow: true });
});

test('alternatives for top_logprobs come sorted from candidates or a full row', () => {
  const a = topAlternatives(full, 2);
  assert.deepEqual([...a.ids], [7, 3]);
  assert.ok(Math.abs(a.logprobs[1] - Math.log(0.2)) < 1e-12);
  assert.deepEqual([...topAlternatives(cand, 3).ids], [7, 3, 9]);
});

test('top-p over a large full row equals a brute-force sort of the whole row', () => {
  const rng = new Rng(3);
  const logits = new Float32Array(50000);
  rng.fillNormal(logits, 2.5);
  const row = logSoftmax(logits);
  const order = [...row.keys()].sort((a, b) => row[b] - row[a] || a - b);
  for (const topP of [0.5, 0.9, 0.999]) {
    let before = 0;
    let n = 0;
    while (before < topP) before += Math.exp(row[order[n++]]);
    const s = truncate({ kind: 'full', logprobs: row }, params({ topP }));
    assert.equal(s.ids.length, n, `top_p ${topP}`);
    assert.deepEqual([...s.ids], order.slice(0, n));
    assert.ok(Math.abs(s.probs[0] - Math.exp(row[order[0]]) / before) < 1e-9);
  }
});
