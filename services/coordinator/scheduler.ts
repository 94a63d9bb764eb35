// The scheduling decision (vLLM v1's schedule() idea): a pure function from a snapshot of the coordinator's state to
// plain data: which waiting requests are admitted (only with KV capacity), and what the next micro-batch runs: which
// sequences, from which position, how many tokens each. The pipeline client executes it; nothing here does I/O.
//
// Policy:
// * up to S micro-batches in flight for S stages; a sequence is in at most one in-flight micro-batch;
// * decodes first, so a long prefill never stalls running answers; the decoding set is spread over the S
//   micro-batches (about D/S each) and rotated least-recently-scheduled first, so no decode starves;
// * prefill in chunks from the rest of the per-batch token budget, oldest request first;
// * admission FIFO without overtaking (a large request is not starved by small ones), each admitted request
//   reserving KV for prompt + max_new_tokens up front, so the shards are never over-committed and nothing is
//   preempted; a request that could never fit is rejected with ResourceExhausted naming the budget.
import { ResourceExhaustedError } from './errors.js';

export interface SchedulerConfig {
  /** Pipeline stages S: up to S micro-batches in flight. */
  stages: number;
  /** Tokens per micro-batch (decodes count 1 each, prefill chunks their length). */
  maxBatchTokens: number;
  /** Sequences per micro-batch. */
  maxBatchSeqs: number;
  /** Sequences admitted (holding KV) at once. */
  maxRunning: number;
}

export interface RunningSeq {
  id: string;
  promptLength: number;
  /** Positions whose KV exists on every stage (cached prefix + prefilled + fed decode tokens). */
  computed: number;
  inFlight: boolean;
  /** Step of its last micro-batch; -1 if never scheduled. */
  lastScheduled: number;
  /** Admission order; lower is older. */
  arrival: number;
}

export interface WaitingRequest {
  id: string;
  promptLength: number;
  maxNewTokens: number;
  /** Leading prompt tokens available from the prefix cache (0 if none). */
  cachedLength: number;
  arrival: number;
}

export interface KvCapacity {
  freeSlots: number;
  freeTokens: number;
  totalSlots: number;
  totalTokens: number;
  blockSize: number;
}

export interface SchedulerState {
  /** Counter of scheduled micro-batches; the next one gets this number. */
  step: number;
  running: readonly RunningSeq[];
  /** Oldest first. */
  waiting: readonly WaitingRequest[];
  inFlightBatches: number;
  kv: KvCapacity;
}

export interface Admission {
  id: string;
  /** KV to reserve on every stage: prompt + max_new_tokens. */
  reserveTokens: number;
  /** Positions already computed at admission (from the prefix cache). */
  cachedLength: number;
}

export interface BatchItem {
  seqId: string;
  kind: 'prefill' | 'decode';
  /** Position of the first token in this item. */
  start: number;
  count: number;
  /** The last stage returns candidates for this sequence (the last prefill chunk, or a decode). */
  sample: boolean;
}

export interface MicroBatchPlan {
  step: number;
  items: BatchItem[];
  tokens: number;
}

export interface ScheduleDecision {
  admit: Admission[];
  reject: { id: string; error: ResourceExhaustedError }[];
  batch: MicroBatchPlan | null;
}

function roundUpToBlocks(tokens: number, blockSize: number): number {
  return Math.ceil(tokens / blockSize) * blockSize;
}

export function schedule(state: SchedulerState, config: SchedulerConfig): ScheduleDecision {
  const { admit, reject } = admitWaiting(state, config);
  const running = [...state.running, ...admittedSeqs(state, admit)];
  const batch = state.inFlightBatches < config.stages ? planBatch(state.step, running, config) : null;
  return { admit, reject, batch };
}

function admittedSeqs(state: SchedulerState, admit: readonly Admission[]): RunningSeq[] {
  return admit.map((a) => {
    const w = state.waiting.find((x) => x.id === a.id)!;
    return {
      id: a.id,
      promptLength: w.promptLength,
      computed: a.cachedLength,
      inFlight: false,
      lastScheduled: -1,
      arrival: w.arrival,
    };
  });
}

function admitWaiting(state: SchedulerState, config: SchedulerConfig): Omit<ScheduleDecision, 'batch'> {
  const admit: Admission[] = [];
  const reject: ScheduleDecision['reject'] = [];
  const { kv } = state;
  let freeSlots = kv.freeSlots;
  let freeTokens = kv.freeTokens;
  let runningCount = state.running.length;
  for (const w of state.waiting) {
    const need = roundUpToBlocks(w.promptLength + w.maxNewTokens, kv.blockSize);
    if (kv.totalSlots === 0 || need > kv.totalTokens) {
      reject.push({
        id: w.id,
        error: new ResourceExhaustedError(
          `request needs ${w.promptLength} prompt + ${w.maxNewTokens} new tokens of KV, more than the whole KV budget of ` +
            `${kv.totalTokens} tokens in ${kv.totalSlots} slots (shard --kv-budget); lower max_new_tokens or the prompt`,
        ),
      });
      continue;
    }
    if (runningCount >= config.maxRunning || freeSlots === 0 || need > freeTokens) break;
    // The last prompt token always runs: its logits give the first new token.
    const cachedLength = Math.max(0, Math.min(w.cachedLength, w.promptLength - 1));
    admit.push({ id: w.id, reserveTokens: w.promptLength + w.maxNewTokens, cachedLength });
    freeSlots--;
    freeTokens -= need;
    runningCount++;
  }
  return { admit, reject };
}

function planBatch(step: number, running: readonly RunningSeq[], config: SchedulerConfig): MicroBatchPlan | null {
  const items: BatchItem[] = [];
  let tokens = 0;
  const decoding = running.filter((s) => s.computed >= s.promptLength);
  const decodeCap = Math.min(Math.ceil(decoding.length / config.stages), config.maxBatchSeqs, config.maxBatchTokens);
  const readyDecodes = decoding
    .filter((s) => !s.inFlight)
    .sort((a, b) => a.lastScheduled - b.lastScheduled || a.arrival - b.arrival)
    .slice(0, decodeCap);
  for (const s of readyDecodes) {
    items.push({ seqId: s.id, kind: 'decode', start: s.computed, count: 1, sample: true });
    tokens++;
  }
  const prefilling = running
    .filter((s) => !s.inFlight && s.computed < s.promptLength)
    .sort((a, b) => a.arrival - b.arrival);
  for (const s of prefilling) {
    if (tokens >= config.maxBatchTokens || items.length >= config.maxBatchSeqs) break;
    const count = Math.min(s.promptLength - s.computed, config.maxBatchTokens - tokens);
    items.push({
      seqId: s.id,
      kind: 'prefill',
      start: s.computed,
      count,
      sample: s.computed + count === s.promptLength,
    });
    tokens += count;
  }
  return items.length === 0 ? null : { step, items, tokens };
}

/**
 * The state after the coordinator carried out a decision: admitted requests run holding their KV reservation, the
 * batch's sequences are in flight. (A reference for the coordinator's loop and for tests.)
 */
export function applyDecision(state: SchedulerState, decision: ScheduleDecision): SchedulerState {
  const gone = new Set([...decision.admit.map((a) => a.id), ...decision.reject.map((r) => r.id)]);
  const admitted = admittedSeqs(state, decision.admit);
  let reservedTokens = 0;
  for (const a of decision.admit) reservedTokens += roundUpToBlocks(a.reserveTokens, state.kv.blockSize);
  const inBatch = new Set(decision.batch?.items.map((i) => i.seqId) ?? []);
  const running = [...state.running, ...admitted].map((s) =>
    inBatch.has(s.id) ? { ...s, inFlight: true, lastScheduled: state.step } : s,
  );
  return {
    ...state,
    step: decision.batch ? state.step + 1 : state.step,
    running,
    waiting: state.waiting.filter((w) => !gone.has(w.id)),
    inFlightBatches: state.inFlightBatches + (decision.batch ? 1 : 0),
    kv: {
      ...state.kv,
      freeSlots: state.kv.freeSlots - decision.admit.length,
      freeTokens: state.kv.freeTokens - reservedTokens,
    },
  };
}

/** The state after a micro-batch's results came back: its sequences are free again and their KV has grown. */
export function completeBatch(state: SchedulerState, batch: MicroBatchPlan): SchedulerState {
  const byId = new Map(batch.items.map((i) => [i.seqId, i]));
  return {
    ...state,
    running: state.running.map((s) => {
      const item = byId.get(s.id);
      return item ? { ...s, inFlight: false, computed: item.start + item.count } : s;
    }),
    inFlightBatches: state.inFlightBatches - 1,
  };
}
