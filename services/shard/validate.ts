// Checks a micro-batch against this stage and its KV ledger and turns it into what the runtime runs. Pure: it works
// on a copy of the ledger, and every message names the field and the limit.
//
// Each item is checked on its own: an item this stage cannot run (slot, positions, KV not present, token ids, its
// sampling entry) is refused — removed with its sampling entry and its tokens or hidden rows — and the rest runs. A
// refused item changes nothing here and later stages never see it, so the stages' ledgers stay equal. Sampling
// entries are checked on every stage (not only the last), so a bad one is refused before any stage wrote its KV.
// What cannot be blamed on one item (duplicate slots or sequences, token ids or hidden rows that do not add up,
// sampling entries that do not line up with the items) throws for the whole batch.
import { NEUTRAL_ROW, type SamplingRow } from '../../lib/onnx/sampling-head.js';
import {
  type BatchItem,
  float32Of,
  type MicroBatch,
  type SamplingSide,
  type StageError,
} from '../../lib/rpc/shard-wire.js';
import type { ForwardInput, ForwardItem } from '../../lib/runtime/stage-runtime.js';
import {
  FAILED_PRECONDITION,
  INVALID_ARGUMENT,
  type KvLedger,
  RESOURCE_EXHAUSTED,
  ShardRequestError,
} from './kv-ledger.js';
import type { PenaltySets } from './penalty-sets.js';

export interface StageLimits {
  /** "stage [A, B)": starts every refusal message. */
  where: string;
  isFirst: boolean;
  isLast: boolean;
  vocabSize: number;
  hiddenSize: number;
  maxTopK: number;
  /** Visual ids [begin, end): what MASK_KIND_TEXT removes (known on the last stage). */
  visualBegin: number;
  visualEnd: number;
}

/** How a kept item that samples is answered, and what it does to its slot's penalised set. */
export interface SampledItem {
  /** Index among the kept items (= the runtime's output row). */
  index: number;
  sequenceId: number;
  slot: number;
  topK: number;
  fullRow: boolean;
  /** The row for the sampling head, penalisedIds still empty (filled from the slot's set by samplingRows). */
  row: SamplingRow;
  penaltyOn: boolean;
  penaltyReset: boolean;
  penaltyDelta: number[];
  /** Classifier-free guidance: the unconditional partner's sequence id and the scale (resolved to a row later). */
  guidance: { partnerSequenceId: number; scale: number } | null;
}

export interface BatchPlan {
  /** The items that run, as received: what goes on to the next stage. */
  kept: BatchItem[];
  /** The kept items' sampling entries, in order. */
  keptSampling: SamplingSide[];
  /** This stage's refusals (StageError kind REFUSED), in item order. */
  refusals: StageError[];
  /** Prefix copies to make before running, in item order. */
  copies: { from: number; to: number; length: number }[];
  items: ForwardItem[];
  /** The kept items' tokens (stage 0) or hidden rows (later stages); null when no item is kept. */
  input: ForwardInput | null;
  /** Items that sample, in kept order (filled on every stage; only the last stage answers them). */
  sampled: SampledItem[];
}

/** Checks `batch`; the ledger is not changed. Throws ShardRequestError for a whole-batch problem. */
export function planBatch(batch: MicroBatch, stage: StageLimits, ledger: KvLedger): BatchPlan {
  // A guided row needs its partner's row in the same run, and an unconditional row is only there for the row it
  // guides: when either item of a pair is refused, the other is too (the batch is planned again without it).
  const guides = new Map<number, number>();
  for (const side of batch.sampling ?? [])
    if (side.cfg_uncond_sequence_id) guides.set(side.cfg_uncond_sequence_id, side.sequence_id);
  let excluded = new Map<number, string>();
  for (;;) {
    const plan = planOnce(batch, stage, ledger, excluded);
    const kept = new Set(plan.sampled.map((s) => s.sequenceId));
    const next = new Map(excluded);
    for (const s of plan.sampled) {
      const partner = s.guidance?.partnerSequenceId;
      if (partner !== undefined && !kept.has(partner))
        next.set(s.sequenceId, `its guidance partner (sequence ${partner}) is not a sampled item that runs here`);
      const guided = guides.get(s.sequenceId);
      if (guided !== undefined && !kept.has(guided))
        next.set(s.sequenceId, `the sequence it guides (sequence ${guided}) does not run here`);
    }
    if (next.size === excluded.size) return plan;
    excluded = next;
  }
}

function planOnce(batch: MicroBatch, stage: StageLimits, ledger: KvLedger, excluded: Map<number, string>): BatchPlan {
  const items = batch.items ?? [];
  if (!batch.reply_to) throw new ShardRequestError('reply_to is empty (every micro-batch needs a ResultSink address)');
  if (items.length > ledger.slots)
    throw new ShardRequestError(`${items.length} items exceed the ${ledger.slots} KV slots (kv_slots)`);
  checkUnique(items);
  const offsets = tokenOffsets(items);
  const total = offsets[items.length];
  if (stage.isFirst) checkTokenCount(batch, total);
  else checkHidden(batch, total, stage);
  const sides = lineUpSampling(batch);

  const sim = ledger.clone();
  const plan: BatchPlan = {
    kept: [],
    keptSampling: [],
    refusals: [],
    copies: [],
    items: [],
    input: null,
    sampled: [],
  };
  const keptRanges: [number, number][] = [];
  items.forEach((item, i) => {
    const what = `items[${i}] (sequence ${item.sequence_id})`;
    const side = sides[i];
    try {
      const why = excluded.get(item.sequence_id);
      if (why !== undefined) throw new ShardRequestError(`${what}: ${why}`, FAILED_PRECONDITION);
      checkItem(item, what, sim);
      if (stage.isFirst) checkTokens(batch.token_ids, offsets[i], offsets[i + 1], what, stage);
      const sampled = side
        ? samplingOf(side.entry, `sampling[${side.at}] (sequence ${side.entry.sequence_id})`, stage)
        : null;
      const copy = item.copy_prefix;
      if (copy) {
        sim.copy(copy.from_slot, item.slot, copy.length, `${what}.copy_prefix`);
        plan.copies.push({ from: copy.from_slot, to: item.slot, length: copy.length });
      }
      if (sampled) {
        plan.sampled.push({ ...sampled, index: plan.kept.length, sequenceId: item.sequence_id, slot: item.slot });
        plan.keptSampling.push(side?.entry as SamplingSide);
      }
      plan.kept.push(item);
      plan.items.push({ slot: item.slot, start: item.start_position, length: item.token_count });
      keptRanges.push([offsets[i], offsets[i + 1]]);
    } catch (err) {
      if (!(err instanceof ShardRequestError)) throw err;
      plan.refusals.push({
        kind: 'STAGE_ERROR_KIND_REFUSED',
        message: `${stage.where}: ${err.message}`,
        sequence_id: item.sequence_id,
        status_code: err.code,
      });
    }
  });
  if (plan.kept.length > 0)
    plan.input = stage.isFirst
      ? { tokens: Int32Array.from(keptRanges.flatMap(([a, b]) => batch.token_ids.slice(a, b))) }
      : { hidden: hiddenRows(batch, keptRanges, total, stage.hiddenSize) };
  return plan;
}

/**
 * The sampling head's rows for the kept items (neutral for items that do not sample), each sampled row with the
 * full id list of its slot's penalised set after this step's reset and delta. `commit` keeps the new sets: call it
 * once the batch ran.
 */
export function samplingRows(plan: BatchPlan, penalties: PenaltySets): { rows: SamplingRow[]; commit: () => void } {
  const rows: SamplingRow[] = plan.kept.map(() => NEUTRAL_ROW);
  const updates: [number, Set<number>][] = [];
  for (const s of plan.sampled) {
    const set = penalties.preview(s.slot, s.penaltyReset, s.penaltyOn ? s.penaltyDelta : []);
    if (s.penaltyOn || s.penaltyReset) updates.push([s.slot, set]);
    const partner = s.guidance ? plan.sampled.find((p) => p.sequenceId === s.guidance?.partnerSequenceId) : null;
    if (s.guidance && !partner) throw new Error(`sequence ${s.sequenceId}: its guidance partner is not in the run`);
    const cfg = s.guidance && partner ? { partnerRow: partner.index, scale: s.guidance.scale } : null;
    rows[s.index] = { ...s.row, penalisedIds: s.penaltyOn ? [...set] : [], ...(cfg ? { cfg } : {}) };
  }
  return {
    rows,
    commit: () => {
      for (const [slot, set] of updates) penalties.commit(slot, set);
    },
  };
}

function checkUnique(items: readonly BatchItem[]): void {
  const sequences = new Map<number, number>();
  const slots = new Map<number, number>();
  items.forEach((item, i) => {
    const seq = sequences.get(item.sequence_id);
    if (seq !== undefined)
      throw new ShardRequestError(
        `items[${seq}] and items[${i}]: sequence ${item.sequence_id} appears twice in one micro-batch`,
      );
    sequences.set(item.sequence_id, i);
    const slot = slots.get(item.slot);
    if (slot !== undefined)
      throw new ShardRequestError(`items[${slot}] and items[${i}]: slot ${item.slot} appears twice in one micro-batch`);
    slots.set(item.slot, i);
  });
}

/** offsets[i] = the first token of items[i]; offsets[items.length] = all tokens. */
function tokenOffsets(items: readonly BatchItem[]): number[] {
  const offsets = [0];
  for (const item of items) offsets.push(offsets[offsets.length - 1] + Math.max(0, item.token_count));
  return offsets;
}

function checkTokenCount(batch: MicroBatch, total: number): void {
  const ids = batch.token_ids ?? [];
  if (ids.length !== total)
    throw new ShardRequestError(`token_ids has ${ids.length} ids but the items' token_count add up to ${total}`);
}

function checkHidden(batch: MicroBatch, total: number, stage: StageLimits): void {
  const t = batch.hidden_states;
  const D = stage.hiddenSize;
  if (total === 0) {
    if (t?.data && t.data.length > 0)
      throw new ShardRequestError(`hidden_states has ${t.data.length} bytes but the micro-batch has no tokens`);
    return;
  }
  if (!t || !t.data || t.data.length === 0)
    throw new ShardRequestError(`hidden_states is missing (a stage after the first takes [tokens, ${D}] float32)`);
  if (t.dtype !== 'DTYPE_FLOAT32') throw new ShardRequestError(`hidden_states.dtype ${t.dtype} is not DTYPE_FLOAT32`);
  const shape = t.shape ?? [];
  if (shape.length > 0 && (shape.length !== 2 || shape[0] !== total || shape[1] !== D))
    throw new ShardRequestError(
      `hidden_states.shape [${shape.join(', ')}] must be [${total}, ${D}] (tokens, hidden_size)`,
    );
  if (t.data.length !== total * D * 4)
    throw new ShardRequestError(
      `hidden_states.data has ${t.data.length} bytes; ${total} tokens × hidden_size ${D} × 4 = ${total * D * 4}`,
    );
}

/** Per item: its sampling entry and that entry's index, or undefined for an item that does not sample. */
function lineUpSampling(batch: MicroBatch): ({ entry: SamplingSide; at: number } | undefined)[] {
  const sides = batch.sampling ?? [];
  let next = 0;
  const out = (batch.items ?? []).map((item, index) => {
    if (!item.sample) return undefined;
    const entry = sides[next];
    if (!entry)
      throw new ShardRequestError(
        `sampling has ${sides.length} entries but more items have sample = true (items[${index}] is one)`,
      );
    if (entry.sequence_id !== item.sequence_id)
      throw new ShardRequestError(
        `sampling[${next}].sequence_id ${entry.sequence_id} does not match items[${index}].sequence_id ${item.sequence_id}`,
      );
    return { entry, at: next++ };
  });
  if (next !== sides.length)
    throw new ShardRequestError(`sampling has ${sides.length} entries but only ${next} items have sample = true`);
  return out;
}

function checkItem(item: BatchItem, what: string, sim: KvLedger): void {
  sim.checkSlot(item.slot, `${what}.slot`);
  if (!Number.isInteger(item.token_count) || item.token_count < 1)
    throw new ShardRequestError(`${what}.token_count must be ≥ 1, got ${item.token_count}`);
  const start = item.start_position;
  if (start + item.token_count > sim.slotTokens)
    throw new ShardRequestError(
      `${what}: start_position ${start} + token_count ${item.token_count} exceeds the slot capacity ${sim.slotTokens} (kv_slot_tokens)`,
      RESOURCE_EXHAUSTED,
    );
  const copy = item.copy_prefix;
  if (copy) {
    if (copy.length !== start)
      throw new ShardRequestError(`${what}.copy_prefix.length ${copy.length} must equal start_position ${start}`);
    sim.checkCopy(copy.from_slot, item.slot, copy.length, `${what}.copy_prefix`);
  } else if (start !== sim.held(item.slot)) {
    throw new ShardRequestError(
      `${what}.start_position ${start} but slot ${item.slot} holds ${sim.held(item.slot)} positions`,
      FAILED_PRECONDITION,
    );
  }
}

function checkTokens(ids: readonly number[], from: number, to: number, what: string, stage: StageLimits): void {
  for (let k = from; k < to; k++) {
    const id = ids[k];
    if (!Number.isInteger(id) || id < 0 || id >= stage.vocabSize)
      throw new ShardRequestError(
        `${what}: token_ids[${k}] = ${id} is outside the vocabulary [0, ${stage.vocabSize})`,
        INVALID_ARGUMENT,
      );
  }
}

/** The kept items' rows of hidden_states, copied once into an aligned array (received bytes need not be aligned). */
function hiddenRows(batch: MicroBatch, ranges: readonly [number, number][], total: number, D: number): Float32Array {
  const data = (batch.hidden_states as { data: Buffer }).data;
  const kept = ranges.reduce((n, [a, b]) => n + b - a, 0);
  if (kept === total) return float32Of(data);
  const out = new Float32Array(kept * D);
  const bytes = new Uint8Array(out.buffer);
  let at = 0;
  for (const [a, b] of ranges) {
    bytes.set(data.subarray(a * D * 4, b * D * 4), at);
    at += (b - a) * D * 4;
  }
  return out;
}

function samplingOf(
  side: SamplingSide,
  what: string,
  stage: StageLimits,
): Omit<SampledItem, 'index' | 'sequenceId' | 'slot'> {
  if (side.mask !== 'MASK_KIND_TEXT' && side.mask !== 'MASK_KIND_UNSPECIFIED' && side.mask !== 'MASK_KIND_IMAGE_LAYOUT')
    throw new ShardRequestError(`${what}.mask ${side.mask} is not a known MaskKind`);
  const text = side.mask === 'MASK_KIND_TEXT';
  const layout = side.mask === 'MASK_KIND_IMAGE_LAYOUT';
  const allowBegin = side.allow_begin ?? 0;
  const allowEnd = side.allow_end ?? 0;
  if (layout && !(Number.isInteger(allowBegin) && allowBegin < allowEnd && allowEnd <= stage.vocabSize))
    throw new ShardRequestError(
      `${what}: MASK_KIND_IMAGE_LAYOUT needs allow_begin < allow_end ≤ ${stage.vocabSize} (got [${allowBegin}, ${allowEnd}))`,
    );
  if (!layout && (allowBegin !== 0 || allowEnd !== 0))
    throw new ShardRequestError(`${what}: allow_begin/allow_end are only for MASK_KIND_IMAGE_LAYOUT`);
  const partnerSequenceId = side.cfg_uncond_sequence_id ?? 0;
  const scale = side.guidance_scale ?? 0;
  if (partnerSequenceId !== 0) {
    if (partnerSequenceId === side.sequence_id)
      throw new ShardRequestError(`${what}.cfg_uncond_sequence_id must name another sequence, not itself`);
    if (!Number.isFinite(scale) || scale < 0)
      throw new ShardRequestError(`${what}.guidance_scale ${scale} must be finite and ≥ 0`);
  }
  if (!Number.isFinite(side.temperature) || side.temperature < 0)
    throw new ShardRequestError(`${what}.temperature ${side.temperature} must be finite and ≥ 0`);
  const penalty = side.repetition_penalty;
  if (!Number.isFinite(penalty) || penalty < 0)
    throw new ShardRequestError(`${what}.repetition_penalty ${penalty} must be finite and ≥ 0 (0 or 1 = off)`);
  const penaltyOn = penalty !== 0 && penalty !== 1;
  const ids = side.penalised_ids ?? [];
  if (penaltyOn) {
    const bad = ids.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= stage.vocabSize);
    if (bad >= 0)
      throw new ShardRequestError(
        `${what}.penalised_ids[${bad}] = ${ids[bad]} is outside the vocabulary [0, ${stage.vocabSize})`,
      );
  }
  if (!side.full_row && (!Number.isInteger(side.top_k) || side.top_k < 1 || side.top_k > stage.maxTopK))
    throw new ShardRequestError(`${what}.top_k ${side.top_k} must be in [1, ${stage.maxTopK}] (max_top_k)`);
  const topK = side.full_row ? 1 : side.top_k;
  return {
    topK,
    fullRow: side.full_row,
    row: {
      maskBegin: text ? stage.visualBegin : 0,
      maskEnd: text ? stage.visualEnd : 0,
      repetitionPenalty: penaltyOn ? penalty : 1,
      penalisedIds: [],
      temperature: side.temperature === 0 ? 1 : side.temperature,
      topK,
      fullRow: side.full_row,
      ...(layout ? { keepBegin: allowBegin, keepEnd: allowEnd } : {}),
    },
    guidance: partnerSequenceId !== 0 ? { partnerSequenceId, scale } : null,
    penaltyOn,
    penaltyReset: side.penalty_reset === true,
    penaltyDelta: penaltyOn ? ids : [],
  };
}

export type KvOp = { copy: { from: number; to: number; length: number } } | { free: number };

/**
 * A KvCommand's valid entries, in the order they apply (copies in order, then frees), each checked against the
 * ledger as the entries before it leave it; the invalid ones are listed, not applied. The ledger is not changed.
 */
export function planKvCommand(
  cmd: { copies?: readonly { from_slot: number; to_slot: number; length: number }[]; free_slots?: readonly number[] },
  ledger: KvLedger,
): { ops: KvOp[]; errors: ShardRequestError[] } {
  const sim = ledger.clone();
  const ops: KvOp[] = [];
  const errors: ShardRequestError[] = [];
  const attempt = (apply: () => KvOp) => {
    try {
      ops.push(apply());
    } catch (err) {
      if (!(err instanceof ShardRequestError)) throw err;
      errors.push(err);
    }
  };
  (cmd.copies ?? []).forEach((c, i) => {
    attempt(() => {
      sim.copy(c.from_slot, c.to_slot, c.length, `kv.copies[${i}]`);
      return { copy: { from: c.from_slot, to: c.to_slot, length: c.length } };
    });
  });
  (cmd.free_slots ?? []).forEach((slot, i) => {
    attempt(() => {
      sim.free(slot, `kv.free_slots[${i}]`);
      return { free: slot };
    });
  });
  return { ops, errors };
}
