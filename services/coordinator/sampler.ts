// Coordinator-side sampling (docs/architecture.md, "Sampling split"): the last stage returns candidates (or a full row
// of logprobs) after mask, repetition penalty and temperature; here top-k, top-p and min-p truncate, and a per-request
// seeded RNG draws. One RNG per request, one uniform draw per sampled token, so a seed gives the same tokens whatever
// the batch.
import { Rng } from '../../lib/util/rng.js';
import { type Candidates, topKLogprobs } from './logits.js';

/** What the coordinator applies itself. 0 / 1 / 0 switch top_k / top_p / min_p off. */
export interface TruncationParams {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
}

/** What a request asks the last stage for: K candidates, or the whole row. */
export interface LastStagePlan {
  topK: number;
  fullRow: boolean;
}

/** The last stage's answer for one sequence (candidates sorted descending, or logprobs in id order). */
export type Distribution =
  | { kind: 'candidates'; candidates: Candidates }
  | { kind: 'full'; logprobs: ArrayLike<number> };

/** The tokens left after truncation, most probable first, with probabilities renormalised to sum 1. */
export interface TruncatedSet {
  ids: Int32Array;
  probs: Float64Array;
}

export interface SampledToken {
  id: number;
  /** Logprob of the chosen id as the last stage reported it (whole vocabulary, after penalty and temperature). */
  logprob: number;
}

/**
 * Candidates answer greedy and top-k exactly; anything else sampled (top-p or min-p alone, or plain sampling)
 * needs the whole distribution, so it gets the full row. topLogprobs widens K so alternatives can be reported.
 */
export function planLastStage(p: TruncationParams, topLogprobs = 0): LastStagePlan {
  if (p.temperature === 0) return { topK: Math.max(1, topLogprobs), fullRow: false };
  if (p.topK > 0) return { topK: Math.max(p.topK, topLogprobs), fullRow: false };
  return { topK: Math.max(1, topLogprobs), fullRow: true };
}

/** The candidates of a distribution as sorted lists (a full row is reduced to its n best). */
export function topAlternatives(d: Distribution, n: number): Candidates {
  if (d.kind === 'full') return topKLogprobs(d.logprobs, n);
  return { ids: d.candidates.ids.slice(0, n), logprobs: d.candidates.logprobs.slice(0, n) };
}

function rowMass(logprobs: ArrayLike<number>): number {
  let total = 0;
  for (let i = 0; i < logprobs.length; i++) total += Math.exp(logprobs[i]);
  return total;
}

/**
 * The sorted prefix of the distribution that truncation can touch. From a full row only as much is sorted as top-k or
 * top-p can keep: K grows eightfold until the top-p mass is inside (exact, since the top-p set is a sorted prefix).
 */
function sortedPrefix(d: Distribution, p: TruncationParams, mass: number): Candidates {
  if (d.kind === 'candidates') return d.candidates;
  const v = d.logprobs.length;
  if (p.topK > 0) return topKLogprobs(d.logprobs, p.topK);
  for (let k = 256; ; k *= 8) {
    const c = topKLogprobs(d.logprobs, Math.min(k, v));
    if (k >= v || p.topP >= 1) return c;
    if (rowMass(c.logprobs) >= p.topP * mass) return c;
  }
}

/**
 * transformers' warper order: top-k (exactly k kept, ties by lower id), then top-p on the renormalised rest (a token
 * is kept while the mass before it is < top_p), then min-p (drop p < min_p · max p). At least one token survives.
 * Without top-k, top-p is measured against the whole row's mass (a full row), or the candidates' (then exact only if
 * the candidates hold the top-p set; planLastStage asks for a full row in that case).
 */
export function truncate(d: Distribution, p: TruncationParams): TruncatedSet {
  const rowTotal = d.kind === 'full' && p.topK === 0 ? rowMass(d.logprobs) : 0;
  const c = sortedPrefix(d, p, rowTotal);
  let n = c.ids.length;
  if (p.topK > 0) n = Math.min(n, p.topK);
  const probs = new Float64Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) {
    probs[i] = Math.exp(c.logprobs[i]);
    total += probs[i];
  }
  if (d.kind === 'full' && p.topK === 0) total = rowTotal;
  if (p.topP < 1) {
    let before = 0;
    let kept = 0;
    while (kept < n && before < p.topP * total) before += probs[kept++];
    n = Math.max(1, kept);
  }
  if (p.minP > 0) {
    const threshold = p.minP * probs[0];
    let kept = 1;
    while (kept < n && probs[kept] >= threshold) kept++;
    n = kept;
  }
  total = 0;
  for (let i = 0; i < n; i++) total += probs[i];
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = probs[i] / total;
  return { ids: c.ids.slice(0, n), probs: out };
}

function argmax(d: Distribution): SampledToken {
  if (d.kind === 'candidates') return { id: d.candidates.ids[0], logprob: d.candidates.logprobs[0] };
  let best = 0;
  for (let i = 1; i < d.logprobs.length; i++) if (d.logprobs[i] > d.logprobs[best]) best = i;
  return { id: best, logprob: d.logprobs[best] };
}

function logprobOf(d: Distribution, id: number): number {
  if (d.kind === 'full') return d.logprobs[id];
  const i = d.candidates.ids.indexOf(id);
  return d.candidates.logprobs[i];
}

/** Samples one request's tokens. Create one per request; feed it only that request's distributions, in order. */
export class RequestSampler {
  private readonly rng: Rng;

  constructor(
    readonly params: TruncationParams,
    seed: number,
  ) {
    this.rng = new Rng(seed);
  }

  next(d: Distribution): SampledToken {
    if (this.params.temperature === 0) return argmax(d);
    const untruncated = d.kind === 'full' && this.params.topK === 0 && this.params.topP >= 1;
    const id = untruncated ? this.drawFromRow(d.logprobs) : this.drawFromSet(truncate(d, this.params));
    return { id, logprob: logprobOf(d, id) };
  }

  private drawFromSet(set: TruncatedSet): number {
    const u = this.rng.uniform();
    let cum = 0;
    for (let i = 0; i < set.ids.length; i++) {
      cum += set.probs[i];
      if (u < cum) return set.ids[i];
    }
    return set.ids[set.ids.length - 1];
  }

  // No sort needed when nothing is truncated (min-p only needs the maximum): draw over the row in id order.
  private drawFromRow(logprobs: ArrayLike<number>): number {
    let max = Number.NEGATIVE_INFINITY;
    for (let i = 0; i < logprobs.length; i++) if (logprobs[i] > max) max = logprobs[i];
    const floor = this.params.minP > 0 ? max + Math.log(this.params.minP) : Number.NEGATIVE_INFINITY;
    let total = 0;
    for (let i = 0; i < logprobs.length; i++) if (logprobs[i] >= floor) total += Math.exp(logprobs[i]);
    const u = this.rng.uniform() * total;
    let cum = 0;
    let last = 0;
    for (let i = 0; i < logprobs.length; i++) {
      if (logprobs[i] < floor || logprobs[i] === Number.NEGATIVE_INFINITY) continue;
      last = i;
      cum += Math.exp(logprobs[i]);
      if (u < cum) return i;
    }
    return last;
  }
}
