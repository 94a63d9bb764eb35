// The shard's pure parts: KV capacity from the budget flags, the KV ledger, and the checks that turn a ForwardRequest
// into runtime work (or an error naming the field and the limit) without changing the ledger.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BatchItem, MicroBatch, SamplingSide } from '../../lib/rpc/shard-wire.js';
import { kvCapacity } from '../../services/shard/capacity.js';
import { KvLedger, ShardRequestError } from '../../services/shard/kv-ledger.js';
import { checkKvCommand, planBatch, type StageLimits } from '../../services/shard/validate.js';

const first: StageLimits = {
  isFirst: true,
  isLast: false,
  vocabSize: 1000,
  hiddenSize: 4,
  maxTopK: 50,
  visualBegin: 0,
  visualEnd: 0,
};
const last: StageLimits = { ...first, isFirst: false, isLast: true, visualBegin: 800, visualEnd: 1000 };

function item(over: Partial<BatchItem>): BatchItem {
  return { sequence_id: 1, slot: 0, start_position: 0, token_count: 1, sample: false, copy_prefix: null, ...over };
}

function batch(items: BatchItem[], over: Partial<MicroBatch> = {}): MicroBatch {
  const tokens = items.reduce((n, it) => n + it.token_count, 0);
  return {
    micro_batch_id: 7,
    items,
    token_ids: Array.from({ length: tokens }, (_, i) => i + 1),
    sampling: [],
    reply_to: '127.0.0.1:1',
    traceparent: '',
    ...over,
  };
}

function side(over: Partial<SamplingSide> = {}): SamplingSide {
  return {
    sequence_id: 1,
    mask: 'MASK_KIND_UNSPECIFIED',
    temperature: 0,
    repetition_penalty: 0,
    penalised_ids: [],
    top_k: 5,
    full_row: false,
    ...over,
  };
}

function hidden(tokens: number, width = 4) {
  return { data: Buffer.alloc(tokens * width * 4), dtype: 'DTYPE_FLOAT32' as const, shape: [tokens, width] };
}

describe('kvCapacity', () => {
  test('slots = min(max slots, budget ÷ slot bytes); bytes per token = 2 · layers · kv heads · head dim · 4', () => {
    const c = kvCapacity({
      layers: 2,
      kvHeads: 2,
      headDim: 16,
      maxPositions: 2048,
      budgetBytes: 10 * 2048 * 512 + 100,
      maxSlots: 64,
    });
    assert.deepEqual(c, {
      slots: 10,
      slotTokens: 2048,
      capacityTokens: 20480,
      bytesPerToken: 512,
      bytes: 10 * 2048 * 512,
    });
    const capped = kvCapacity({
      layers: 2,
      kvHeads: 2,
      headDim: 16,
      maxPositions: 2048,
      budgetBytes: 2 ** 40,
      maxSlots: 8,
      slotTokens: 100,
    });
    assert.deepEqual([capped.slots, capped.slotTokens, capped.capacityTokens], [8, 100, 800]);
  });

  test('a budget below one slot, or slots longer than the model context, are refused naming the flag', () => {
    const base = { layers: 2, kvHeads: 2, headDim: 16, maxPositions: 2048, maxSlots: 4 };
    assert.throws(
      () => kvCapacity({ ...base, budgetBytes: 1000 }),
      /--kv-budget 1000 bytes cannot hold one slot of 2048 tokens × 512/,
    );
    assert.throws(
      () => kvCapacity({ ...base, budgetBytes: 2 ** 30, slotTokens: 4096 }),
      /--slot-tokens 4096 must be .* \[1, 2048\]/,
    );
  });
});

describe('KvLedger', () => {
  test('writes, copies and frees are accounted per slot', () => {
    const l = new KvLedger(4, 100);
    l.write(0, 0, 10);
    l.write(0, 10, 1);
    l.copy(0, 2, 6, 'copy');
    assert.deepEqual([l.held(0), l.held(2), l.tokensInUse, l.slotsInUse], [11, 6, 17, 2]);
    l.write(0, 4, 2); // a rewrite from position 4 drops what came after
    assert.equal(l.held(0), 6);
    l.free(2, 'slot');
    assert.deepEqual([l.tokensInUse, l.slotsInUse], [6, 1]);
    assert.throws(
      () => l.copy(0, 1, 7, 'kv.copies[0]'),
      /kv\.copies\[0\]\.length 7 exceeds the 6 positions slot 0 holds/,
    );
    assert.throws(() => l.free(4, 'kv.free_slots[1]'), /kv\.free_slots\[1\] 4 is out of range \[0, 4\)/);
    l.reset();
    assert.equal(l.tokensInUse, 0);
  });
});

describe('planBatch', () => {
  test('stage 0: items become runtime items and token ids; prefix copies come first and count for the item', () => {
    const ledger = new KvLedger(4, 64);
    ledger.write(3, 0, 10);
    const plan = planBatch(
      batch([
        item({ sequence_id: 1, slot: 0, token_count: 3 }),
        item({ sequence_id: 2, slot: 1, start_position: 8, token_count: 2, copy_prefix: { from_slot: 3, length: 8 } }),
      ]),
      first,
      ledger,
    );
    assert.deepEqual(plan.copies, [{ from: 3, to: 1, length: 8 }]);
    assert.deepEqual(plan.items, [
      { slot: 0, start: 0, length: 3 },
      { slot: 1, start: 8, length: 2 },
    ]);
    assert.ok('tokens' in plan.input);
    assert.deepEqual(Array.from(plan.input.tokens), [1, 2, 3, 4, 5]);
    assert.equal(plan.sampling, undefined);
    assert.deepEqual([ledger.held(1), ledger.tokensInUse], [0, 10], 'the ledger is not changed by a plan');
  });

  test('every refusal names the field and the limit', () => {
    const ledger = new KvLedger(4, 64);
    ledger.write(2, 0, 5);
    const cases: [MicroBatch, RegExp][] = [
      [batch([]), /items is empty/],
      [
        batch(Array.from({ length: 5 }, (_, i) => item({ sequence_id: i, slot: i % 4 }))),
        /5 items exceed the 4 KV slots/,
      ],
      [batch([item({ slot: 4 })]), /items\[0\] \(sequence 1\)\.slot 4 is out of range \[0, 4\) \(kv_slots\)/],
      [batch([item({ slot: 1, token_count: 0 })]), /token_count must be ≥ 1, got 0/],
      [
        batch([item({ slot: 2, start_position: 5, token_count: 60 })]),
        /start_position 5 \+ token_count 60 exceeds the slot capacity 64/,
      ],
      [batch([item({ slot: 2, start_position: 6 })]), /start_position 6 is beyond the 5 positions slot 2 holds/],
      [batch([item({ slot: 0 }), item({ slot: 1 })]), /sequence 1 appears twice in one micro-batch/],
      [batch([item({ slot: 1 }), item({ sequence_id: 2, slot: 1 })]), /slot 1 appears twice/],
      [
        batch([item({ slot: 0, start_position: 3, copy_prefix: { from_slot: 2, length: 2 } })]),
        /copy_prefix\.length 2 must equal start_position 3/,
      ],
      [
        batch([item({ slot: 0, start_position: 6, copy_prefix: { from_slot: 2, length: 6 } })]),
        /copy_prefix\.length 6 exceeds the 5 positions slot 2 holds/,
      ],
      [
        batch([item({ slot: 0, start_position: 2, copy_prefix: { from_slot: 0, length: 2 } })]),
        /from_slot and to_slot are both 0/,
      ],
      [
        batch([item({ token_count: 2 })], { token_ids: [1, 1000] }),
        /token_ids\[1\] = 1000 is outside the vocabulary \[0, 1000\)/,
      ],
      [
        batch([item({ token_count: 2 })], { token_ids: [1] }),
        /token_ids has 1 ids but the items' token_count add up to 2/,
      ],
    ];
    for (const [b, message] of cases) {
      assert.throws(
        () => planBatch(b, first, ledger),
        (err: Error) => err instanceof ShardRequestError && message.test(err.message),
        String(message),
      );
    }
  });

  test('later stages take float32 hidden states [tokens, hidden]', () => {
    const ledger = new KvLedger(2, 64);
    const mid = { ...first, isFirst: false };
    const ok = planBatch(batch([item({ token_count: 2 })], { token_ids: [], hidden_states: hidden(2) }), mid, ledger);
    assert.ok('hidden' in ok.input && ok.input.hidden.length === 8);
    const bad: [Partial<MicroBatch>, RegExp][] = [
      [{ hidden_states: null }, /hidden_states is missing/],
      [
        { hidden_states: { ...hidden(2), dtype: 'DTYPE_FLOAT16' } },
        /hidden_states\.dtype DTYPE_FLOAT16 is not DTYPE_FLOAT32/,
      ],
      [{ hidden_states: hidden(2, 3) }, /hidden_states\.shape \[2, 3\] must be \[2, 4\]/],
      [
        { hidden_states: { ...hidden(2), shape: [], data: Buffer.alloc(12) } },
        /hidden_states\.data has 12 bytes; 2 tokens × hidden_size 4 × 4 = 32/,
      ],
    ];
    for (const [over, message] of bad)
      assert.throws(
        () => planBatch(batch([item({ token_count: 2 })], { token_ids: [], ...over }), mid, ledger),
        message,
      );
  });

  test('last stage: one sampling row per item, neutral for items that do not sample; greedy and penalty off map to 1', () => {
    const ledger = new KvLedger(4, 64);
    const b = batch(
      [
        item({ sequence_id: 1, slot: 0, token_count: 3, sample: false }),
        item({ sequence_id: 2, slot: 1, sample: true }),
        item({ sequence_id: 3, slot: 2, sample: true }),
      ],
      {
        token_ids: [],
        hidden_states: hidden(5),
        sampling: [
          side({
            sequence_id: 2,
            mask: 'MASK_KIND_TEXT',
            temperature: 0.7,
            repetition_penalty: 1.2,
            penalised_ids: [4, 9],
          }),
          side({ sequence_id: 3, full_row: true, top_k: 0, penalised_ids: [5000] }),
        ],
      },
    );
    const plan = planBatch(b, last, ledger);
    assert.deepEqual(plan.sampled, [
      { index: 1, sequenceId: 2, topK: 5, fullRow: false },
      { index: 2, sequenceId: 3, topK: 1, fullRow: true },
    ]);
    assert.equal(plan.sampling?.[0].topK, 1);
    assert.deepEqual(plan.sampling?.[1], {
      maskBegin: 800,
      maskEnd: 1000,
      repetitionPenalty: 1.2,
      penalisedIds: [4, 9],
      temperature: 0.7,
      topK: 5,
      fullRow: false,
    });
    // penalty 0 = off: its ids are not used (nor checked); temperature 0 = greedy = unscaled.
    assert.deepEqual(
      [plan.sampling?.[2].repetitionPenalty, plan.sampling?.[2].penalisedIds, plan.sampling?.[2].temperature],
      [1, [], 1],
    );
  });

  test('last stage refusals: sampling entries that do not line up, bad values, no reply_to', () => {
    const ledger = new KvLedger(4, 64);
    const one = (s: SamplingSide[], over: Partial<MicroBatch> = {}) =>
      batch([item({ sample: true })], { token_ids: [], hidden_states: hidden(1), sampling: s, ...over });
    const cases: [MicroBatch, RegExp][] = [
      [one([]), /sampling has 0 entries but more items have sample = true \(items\[0\] is one\)/],
      [one([side(), side()]), /sampling has 2 entries but only 1 items have sample = true/],
      [one([side({ sequence_id: 4 })]), /sampling\[0\]\.sequence_id 4 does not match items\[0\]\.sequence_id 1/],
      [one([side({ top_k: 51 })]), /top_k 51 must be in \[1, 50\] \(max_top_k\)/],
      [one([side({ temperature: Number.NaN })]), /temperature NaN must be finite and ≥ 0/],
      [one([side({ repetition_penalty: -1 })]), /repetition_penalty -1 must be finite and ≥ 0/],
      [
        one([side({ repetition_penalty: 1.1, penalised_ids: [3, 1000] })]),
        /penalised_ids\[1\] = 1000 is outside the vocabulary/,
      ],
      [one([side({ mask: 'MASK_KIND_IMAGE_LAYOUT' })]), /MASK_KIND_IMAGE_LAYOUT is not supported yet/],
      [one([side()], { reply_to: '' }), /reply_to is empty/],
    ];
    for (const [b, message] of cases) assert.throws(() => planBatch(b, last, ledger), message);
  });
});

test('checkKvCommand: copies in order then frees, checked on a copy of the ledger', () => {
  const ledger = new KvLedger(4, 64);
  ledger.write(0, 0, 9);
  checkKvCommand(
    {
      copies: [
        { from_slot: 0, to_slot: 1, length: 9 },
        { from_slot: 1, to_slot: 2, length: 4 },
      ],
      free_slots: [0, 3],
    },
    ledger,
  );
  assert.deepEqual([ledger.held(0), ledger.held(1), ledger.held(2)], [9, 0, 0], 'unchanged');
  assert.throws(
    () => checkKvCommand({ copies: [{ from_slot: 1, to_slot: 2, length: 1 }], free_slots: [] }, ledger),
    /kv\.copies\[0\]\.length 1 exceeds the 0 positions slot 1 holds/,
  );
  assert.throws(
    () => checkKvCommand({ copies: [], free_slots: [1, 9] }, ledger),
    /kv\.free_slots\[1\] 9 is out of range \[0, 4\)/,
  );
});
