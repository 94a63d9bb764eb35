// Checks a ForwardRequest against this stage and its KV ledger and turns it into what the runtime runs. Pure: it
// works on a copy of the ledger, so a refused request changes nothing, and every message names the field and limit.
import { NEUTRAL_ROW, type SamplingRow } from '../../lib/onnx/sampling-head.js';
import { float32Of, type KvCommand, type MicroBatch, type SamplingSide } from '../../lib/rpc/shard-wire.js';
import type { ForwardInput, ForwardItem } from '../../lib/runtime/stage-runtime.js';
import { type KvLedger, ShardRequestError } from './kv-ledger.js';

export interface StageLimits {
  isFirst: boolean;
  isLast: boolean;
  vocabSize: number;
  hiddenSize: number;
  maxTopK: number;
  /** Visual ids [begin, end): what MASK_KIND_TEXT removes. */
  visualBegin: number;
  visualEnd: number;
}

export interface BatchPlan {
  /** Prefix copies to make before running, in item order. */
  copies: { from: number; to: number; length: number }[];
  items: ForwardItem[];
  input: ForwardInput;
  /** Last stage: one row per item (neutral for items that do not sample). */
  sampling?: SamplingRow[];
  /** Last stage: the items that sample, in item order, with their sequence and how to answer. */
  sampled: { index: number; sequenceId: number; topK: number; fullRow: boolean }[];
}

/** Checks `batch`; the ledger is not changed. */
export function planBatch(batch: MicroBatch, stage: StageLimits, ledger: KvLedger): BatchPlan {
  const items = batch.items ?? [];
  if (items.length === 0) throw new ShardRequestError('items is empty (a micro-batch needs at least one item)');
  if (items.length > ledger.slots)
    throw new ShardRequestError(`${items.length} items exceed the ${ledger.slots} KV slots (kv_slots)`);
  const sim = ledger.clone();
  const sequences = new Set<number>();
  const slots = new Set<number>();
  const copies: BatchPlan['copies'] = [];
  const planned: ForwardItem[] = [];
  let tokens = 0;
  items.forEach((item, i) => {
    const what = `items[${i}] (sequence ${item.sequence_id})`;
    if (sequences.has(item.sequence_id))
      throw new ShardRequestError(`${what}: sequence ${item.sequence_id} appears twice in one micro-batch`);
    sequences.add(item.sequence_id);
    sim.checkSlot(item.slot, `${what}.slot`);
    if (slots.has(item.slot))
      throw new ShardRequestError(`${what}: slot ${item.slot} appears twice in one micro-batch`);
    slots.add(item.slot);
    if (!Number.isInteger(item.token_count) || item.token_count < 1)
      throw new ShardRequestError(`${what}.token_count must be ≥ 1, got ${item.token_count}`);
    const start = item.start_position;
    if (start + item.token_count > sim.slotTokens)
      throw new ShardRequestError(
        `${what}: start_position ${start} + token_count ${item.token_count} exceeds the slot capacity ${sim.slotTokens} (kv_slot_tokens)`,
      );
    const copy = item.copy_prefix;
    if (copy) {
      if (copy.length !== start)
        throw new ShardRequestError(`${what}.copy_prefix.length ${copy.length} must equal start_position ${start}`);
      sim.copy(copy.from_slot, item.slot, copy.length, `${what}.copy_prefix`);
      copies.push({ from: copy.from_slot, to: item.slot, length: copy.length });
    } else if (start > sim.held(item.slot)) {
      throw new ShardRequestError(
        `${what}.start_position ${start} is beyond the ${sim.held(item.slot)} positions slot ${item.slot} holds`,
      );
    }
    planned.push({ slot: item.slot, start, length: item.token_count });
    tokens += item.token_count;
  });
  const input = stage.isFirst ? tokenInput(batch, tokens, stage) : hiddenInput(batch, tokens, stage);
  if (!stage.isLast) return { copies, items: planned, input, sampled: [] };
  return { copies, items: planned, input, ...samplingPlan(batch, stage) };
}

function tokenInput(batch: MicroBatch, tokens: number, stage: StageLimits): ForwardInput {
  const ids = batch.token_ids ?? [];
  if (ids.length !== tokens)
    throw new ShardRequestError(`token_ids has ${ids.length} ids but the items' token_count add up to ${tokens}`);
  const out = new Int32Array(tokens);
  for (let i = 0; i < tokens; i++) {
    const id = ids[i];
    if (!Number.isInteger(id) || id < 0 || id >= stage.vocabSize)
      throw new ShardRequestError(`token_ids[${i}] = ${id} is outside the vocabulary [0, ${stage.vocabSize})`);
    out[i] = id;
  }
  return { tokens: out };
}

function hiddenInput(batch: MicroBatch, tokens: number, stage: StageLimits): ForwardInput {
  const t = batch.hidden_states;
  const D = stage.hiddenSize;
  if (!t || !t.data || t.data.length === 0)
    throw new ShardRequestError(`hidden_states is missing (a stage after the first takes [tokens, ${D}] float32)`);
  if (t.dtype !== 'DTYPE_FLOAT32') throw new ShardRequestError(`hidden_states.dtype ${t.dtype} is not DTYPE_FLOAT32`);
  const shape = t.shape ?? [];
  if (shape.length > 0 && (shape.length !== 2 || shape[0] !== tokens || shape[1] !== D))
    throw new ShardRequestError(
      `hidden_states.shape [${shape.join(', ')}] must be [${tokens}, ${D}] (tokens, hidden_size)`,
    );
  if (t.data.length !== tokens * D * 4)
    throw new ShardRequestError(
      `hidden_states.data has ${t.data.length} bytes; ${tokens} tokens × hidden_size ${D} × 4 = ${tokens * D * 4}`,
    );
  return { hidden: float32Of(t.data) };
}

function samplingPlan(batch: MicroBatch, stage: StageLimits): Pick<BatchPlan, 'sampling' | 'sampled'> {
  if (!batch.reply_to) throw new ShardRequestError('reply_to is empty (the last stage needs a ResultSink address)');
  const sides = batch.sampling ?? [];
  const sampling: SamplingRow[] = [];
  const sampled: BatchPlan['sampled'] = [];
  let next = 0;
  batch.items.forEach((item, index) => {
    if (!item.sample) {
      sampling.push(NEUTRAL_ROW);
      return;
    }
    const side = sides[next];
    if (!side)
      throw new ShardRequestError(
        `sampling has ${sides.length} entries but more items have sample = true (items[${index}] is one)`,
      );
    if (side.sequence_id !== item.sequence_id)
      throw new ShardRequestError(
        `sampling[${next}].sequence_id ${side.sequence_id} does not match items[${index}].sequence_id ${item.sequence_id}`,
      );
    const row = samplingRow(side, `sampling[${next}] (sequence ${side.sequence_id})`, stage);
    sampling.push(row);
    sampled.push({ index, sequenceId: item.sequence_id, topK: row.topK, fullRow: row.fullRow });
    next++;
  });
  if (next !== sides.length)
    throw new ShardRequestError(`sampling has ${sides.length} entries but only ${next} items have sample = true`);
  return { sampling, sampled };
}

function samplingRow(side: SamplingSide, what: string, stage: StageLimits): SamplingRow {
  if (side.mask === 'MASK_KIND_IMAGE_LAYOUT')
    throw new ShardRequestError(`${what}.mask MASK_KIND_IMAGE_LAYOUT is not supported yet`);
  const text = side.mask === 'MASK_KIND_TEXT';
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
  return {
    maskBegin: text ? stage.visualBegin : 0,
    maskEnd: text ? stage.visualEnd : 0,
    repetitionPenalty: penaltyOn ? penalty : 1,
    penalisedIds: penaltyOn ? ids : [],
    temperature: side.temperature === 0 ? 1 : side.temperature,
    topK: side.full_row ? 1 : side.top_k,
    fullRow: side.full_row,
  };
}

/** Checks a KvCommand (copies in order, then frees); the ledger is not changed. */
export function checkKvCommand(cmd: KvCommand, ledger: KvLedger): void {
  const sim = ledger.clone();
  (cmd.copies ?? []).forEach((c, i) => {
    sim.copy(c.from_slot, c.to_slot, c.length, `kv.copies[${i}]`);
  });
  (cmd.free_slots ?? []).forEach((slot, i) => {
    sim.free(slot, `kv.free_slots[${i}]`);
  });
}
