// A float64 reference of Emu3-Gen's sampling loop (docs/model.md, "Generation (Emu3-Gen)"), written from upstream's
// order for tests: per step, classifier-free guidance on the two log-softmaxed rows (scale·(lc − lu) + lu), the
// image-layout constraint (every id but the allowed ones → −inf), temperature, top-k (exactly k, ties by lower id),
// softmax, one uniform draw from the request's seeded generator (or argmax for greedy); the drawn token is appended to
// both the conditional and the unconditional sequence. No KV cache: every step recomputes both sequences.
import { imageLayoutAllowed, imageLayoutLength, type LayoutIds, type TokenGrid } from '../../lib/prompt/index.js';
import { Rng } from '../../lib/util/rng.js';
import type { Emu3Reference } from './emu3-f64.js';

export function logSoftmax64(x: ArrayLike<number>): Float64Array {
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < x.length; i++) if (x[i] > max) max = x[i];
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i] - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i] - lse;
  return out;
}

/** Upstream UnbatchedClassifierFreeGuidanceLogitsProcessor's score. */
export function guidedScores(cond: ArrayLike<number>, uncond: ArrayLike<number>, scale: number): Float64Array {
  const lc = logSoftmax64(cond);
  const lu = logSoftmax64(uncond);
  const out = new Float64Array(lc.length);
  for (let i = 0; i < out.length; i++) out[i] = scale * (lc[i] - lu[i]) + lu[i];
  return out;
}

/** Everything outside [begin, end) → −inf, in place. */
export function keepOnly(x: Float64Array, begin: number, end: number): void {
  for (let i = 0; i < x.length; i++) if (i < begin || i >= end) x[i] = Number.NEGATIVE_INFINITY;
}

export interface GenLoopOptions {
  grid: TokenGrid;
  ids: LayoutIds;
  guidanceScale: number;
  /** 0 = greedy. */
  temperature: number;
  topK: number;
  seed: number;
}

/** One draw: greedy argmax, or top-k then softmax then the generator's uniform against the cumulative mass. */
function draw(scores: Float64Array, o: GenLoopOptions, rng: Rng): number {
  const order = Array.from(scores.keys()).filter((i) => scores[i] > Number.NEGATIVE_INFINITY);
  order.sort((a, b) => scores[b] - scores[a] || a - b);
  if (o.temperature === 0) return order[0];
  const kept = order.slice(0, o.topK > 0 ? o.topK : order.length);
  const scaled = kept.map((i) => scores[i] / o.temperature);
  const max = scaled[0];
  const w = scaled.map((s) => Math.exp(s - max));
  const total = w.reduce((a, b) => a + b, 0);
  const u = rng.uniform();
  let cum = 0;
  for (let j = 0; j < kept.length; j++) {
    cum += w[j] / total;
    if (u < cum) return kept[j];
  }
  return kept[kept.length - 1];
}

/** The generated tokens (H·(W+1)+3 of them, the last eos) for one cond/uncond prompt pair. */
export function referenceImageTokens(
  ref: Emu3Reference,
  prompt: readonly number[],
  negative: readonly number[],
  o: GenLoopOptions,
): number[] {
  const cond = [...prompt];
  const uncond = [...negative];
  const rng = new Rng(o.seed);
  const out: number[] = [];
  const n = imageLayoutLength(o.grid);
  for (let step = 0; step < n; step++) {
    const scores = guidedScores(ref.logits(cond), ref.logits(uncond), o.guidanceScale);
    const allowed = imageLayoutAllowed(o.grid, step, o.ids);
    if (allowed.kind === 'visual') keepOnly(scores, allowed.start, allowed.start + allowed.count);
    else keepOnly(scores, allowed.id, allowed.id + 1);
    const token = draw(scores, o, rng);
    out.push(token);
    cond.push(token);
    uncond.push(token);
  }
  return out;
}
