// Reference logits processing: the work the last stage does over the whole vocabulary before the coordinator samples
// (docs/architecture.md, "Sampling split"), in plain JS with float64 accumulation. Used by tests as the truth for the
// shard's graph and by a CPU fallback. Order follows transformers' generate(): mask, repetition penalty, temperature,
// then log-softmax over the whole vocabulary and top-K extraction.

/** Candidate tokens, sorted by logprob descending (ties: lower id first). Logprobs are normalised over the whole vocabulary. */
export interface Candidates {
  ids: Int32Array;
  logprobs: Float64Array;
}

/** Which ids may never be produced: `exclude` removes [start, end) (e.g. the visual ids from a text answer). */
export type TaskMask = { kind: 'none' } | { kind: 'exclude'; start: number; end: number };

/** The per-sequence parameters the last stage needs (mirrors emu3.internal.v1.SamplingSide). */
export interface LastStageParams {
  mask: TaskMask;
  /** 0 means greedy: logits are not scaled (the candidates then answer argmax and logprobs at temperature 1). */
  temperature: number;
  /** HF semantics; 1 = off. */
  repetitionPenalty: number;
  /** Ids the penalty applies to (each once, however often it occurred). */
  penalisedIds: ArrayLike<number>;
  /** How many candidates to return (≥ 1). */
  topK: number;
  /** Return the whole row of logprobs instead of candidates. */
  fullRow: boolean;
}

export type LastStageResult = { kind: 'candidates'; candidates: Candidates } | { kind: 'full'; logprobs: Float64Array };

/** Sets every id in the mask to -Infinity, in place. */
export function applyTaskMask(logits: Float32Array | Float64Array, mask: TaskMask): void {
  if (mask.kind === 'none') return;
  const end = Math.min(mask.end, logits.length);
  for (let i = Math.max(0, mask.start); i < end; i++) logits[i] = Number.NEGATIVE_INFINITY;
}

/** HF RepetitionPenaltyLogitsProcessor: a positive logit is divided by the penalty, a negative one multiplied. In place. */
export function applyRepetitionPenalty(
  logits: Float32Array | Float64Array,
  penalty: number,
  penalisedIds: ArrayLike<number>,
): void {
  if (penalty === 1) return;
  const seen = new Set<number>();
  for (let i = 0; i < penalisedIds.length; i++) {
    const id = penalisedIds[i];
    if (seen.has(id) || id < 0 || id >= logits.length) continue;
    seen.add(id);
    const x = logits[id];
    logits[id] = x < 0 ? x * penalty : x / penalty;
  }
}

/** Divides by the temperature, in place; temperature 0 (greedy) leaves the logits as they are. */
export function applyTemperature(logits: Float32Array | Float64Array, temperature: number): void {
  if (temperature === 0 || temperature === 1) return;
  for (let i = 0; i < logits.length; i++) logits[i] /= temperature;
}

/** log(sum(exp(x))) in float64; -Infinity when every entry is -Infinity. */
export function logSumExp(logits: ArrayLike<number>): number {
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  if (max === Number.NEGATIVE_INFINITY) return max;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  return max + Math.log(sum);
}

/** The whole row as logprobs (float64). */
export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  const lse = logSumExp(logits);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i] - lse;
  return out;
}

/** The k largest entries as logprobs normalised over the whole row, sorted descending, ties by lower id. */
export function topKLogprobs(logits: ArrayLike<number>, k: number): Candidates {
  const lse = logSumExp(logits);
  const n = Math.min(k, logits.length);
  // Min-heap of the best n seen so far, keyed (value asc, id desc) so the root is the one to drop first.
  const heap: number[] = [];
  const worse = (a: number, b: number) => logits[a] < logits[b] || (logits[a] === logits[b] && a > b);
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < heap.length && worse(heap[l], heap[m])) m = l;
      if (r < heap.length && worse(heap[r], heap[m])) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m], heap[i]];
      i = m;
    }
  };
  for (let id = 0; id < logits.length; id++) {
    if (heap.length < n) {
      heap.push(id);
      for (let i = heap.length - 1; i > 0; ) {
        const p = (i - 1) >> 1;
        if (!worse(heap[i], heap[p])) break;
        [heap[i], heap[p]] = [heap[p], heap[i]];
        i = p;
      }
    } else if (n > 0 && worse(heap[0], id)) {
      heap[0] = id;
      siftDown(0);
    }
  }
  heap.sort((a, b) => (worse(a, b) ? 1 : worse(b, a) ? -1 : 0));
  const ids = Int32Array.from(heap);
  const logprobs = new Float64Array(ids.length);
  for (let i = 0; i < ids.length; i++) logprobs[i] = logits[ids[i]] - lse;
  return { ids, logprobs };
}

/** Everything the last stage does to one row of raw logits (copied; the input is not changed). */
export function processLastStageRow(rawLogits: ArrayLike<number>, params: LastStageParams): LastStageResult {
  const logits = Float64Array.from(rawLogits);
  applyTaskMask(logits, params.mask);
  applyRepetitionPenalty(logits, params.repetitionPenalty, params.penalisedIds);
  applyTemperature(logits, params.temperature);
  if (params.fullRow) return { kind: 'full', logprobs: logSoftmax(logits) };
  return { kind: 'candidates', candidates: topKLogprobs(logits, Math.max(1, params.topK)) };
}
