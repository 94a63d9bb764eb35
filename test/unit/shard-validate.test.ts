// The shard's pure parts: KV capacity from the budget flags, the KV ledger, the per-item checks that turn a micro-batch
// into runtime work plus refusals (each naming the stage, the field and the limit) without changing the ledger, the
// penalised sets kept per slot, and KvCommands applied entry by entry.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BatchItem, MicroBatch, SamplingSide } from '../../lib/rpc/shard-wire.js';
import { kvCapacity } from '../../services/shard/capacity.js';
import { KvLedger, ShardRequestError } from '../../services/shard/kv-ledger.js';
import { PenaltySets } from '../../services/shard/penalty-sets.js';
import {
  type BatchPlan,
  planBatch,
  planKvCommand,
  type StageLimits,
  samplingRows,
} from '../../services/shard/validate.js';

const first: StageLimits = {
  where: 'stage [0, 2)',
  isFirst: true,
  isLast: false,
  vocabSize: 1000,
  hiddenSize: 4,
  maxTopK: 50,
  visualBegin: 0,
  visualEnd: 0,
};
const last: StageLimits = {
  ...first,
  where: 'stage [2, 4)',
  isFirst: false,
  isLast: true,
  visualBegin: 800,
  visualEnd: 1000,
};

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
    penalty_reset: false,
    ...over,
  };
}

/** Hidden rows whose every value is its row number (so a test can tell which rows were kept). */
function hidden(tokens: number, width = 4) {
  const data = Buffer.alloc(tokens * width * 4);
  for (let i = 0; i < tokens * width; i++) data.writeFloatLE(Math.floor(i / width), i * 4);
  return { data, dtype: 'DTYPE_FLOAT32' as const, shape: [tokens, width] };
}

/** planBatch with exactly one refusal: returns it. */
function oneRefusal(plan: BatchPlan) {
  assert.equal(plan.refusals.length, 1, JSON.stringify(plan.refusals));
  const [r] = plan.refusals;
  assert.equal(r.kind, 'STAGE_ERROR_KIND_REFUSED');
  return r;
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
    // A half device arena (fp16 on webgpu): 2 bytes an element, so the same budget holds twice the slots.
    const half = kvCapacity({
      layers: 2,
      kvHeads: 2,
      headDim: 16,
      maxPositions: 2048,
      budgetBytes: 10 * 2048 * 512 + 100,
      maxSlots: 64,
      elementBytes: 2,
    });
    assert.deepEqual([half.slots, half.bytesPerToken, half.bytes], [20, 256, 20 * 2048 * 256]);
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
    assert.deepEqual(plan.refusals, []);
    assert.deepEqual(plan.copies, [{ from: 3, to: 1, length: 8 }]);
    assert.deepEqual(plan.items, [
      { slot: 0, start: 0, length: 3 },
      { slot: 1, start: 8, length: 2 },
    ]);
    assert.ok(plan.input && 'tokens' in plan.input);
    assert.deepEqual(Array.from(plan.input.tokens), [1, 2, 3, 4, 5]);
    assert.deepEqual([ledger.held(1), ledger.tokensInUse], [0, 10], 'the ledger is not changed by a plan');
  });

  test('an item this stage cannot run is refused alone, with its tokens, naming the stage, field and limit', () => {
    const ledger = new KvLedger(4, 64);
    ledger.write(2, 0, 5);
    // Each case: a bad item 1 (sequence 9) between two good ones; [item, token ids of item 1, message, status code].
    const cases: [Partial<BatchItem>, number[] | null, RegExp, number][] = [
      [
        { slot: 4 },
        null,
        /^stage \[0, 2\): items\[1\] \(sequence 9\)\.slot 4 is out of range \[0, 4\) \(kv_slots\)$/,
        3,
      ],
      [{ slot: 1, token_count: 0 }, null, /items\[1\] \(sequence 9\)\.token_count must be ≥ 1, got 0/, 3],
      [
        { slot: 2, start_position: 5, token_count: 60 },
        null,
        /items\[1\] \(sequence 9\): start_position 5 \+ token_count 60 exceeds the slot capacity 64 \(kv_slot_tokens\)/,
        8,
      ],
      [
        { slot: 2, start_position: 6 },
        null,
        /items\[1\] \(sequence 9\)\.start_position 6 but slot 2 holds 5 positions/,
        9,
      ],
      [{ slot: 2, start_position: 0 }, null, /start_position 0 but slot 2 holds 5 positions/, 9],
      [{ slot: 1, start_position: 3 }, null, /start_position 3 but slot 1 holds 0 positions/, 9],
      [
        { slot: 1, start_position: 3, copy_prefix: { from_slot: 2, length: 2 } },
        null,
        /items\[1\] \(sequence 9\)\.copy_prefix\.length 2 must equal start_position 3/,
        3,
      ],
      [
        { slot: 1, start_position: 6, copy_prefix: { from_slot: 2, length: 6 } },
        null,
        /items\[1\] \(sequence 9\)\.copy_prefix\.length 6 exceeds the 5 positions slot 2 holds/,
        9,
      ],
      [
        { slot: 1, start_position: 2, copy_prefix: { from_slot: 1, length: 2 } },
        null,
        /copy_prefix: from_slot and to_slot are both 1/,
        3,
      ],
      [
        { slot: 1, start_position: 2, copy_prefix: { from_slot: 7, length: 2 } },
        null,
        /copy_prefix\.from_slot 7 is out of range \[0, 4\)/,
        3,
      ],
      [
        { slot: 1, token_count: 2 },
        [500, 1000],
        /items\[1\] \(sequence 9\): token_ids\[3\] = 1000 is outside the vocabulary \[0, 1000\)/,
        3,
      ],
    ];
    for (const [bad, badTokens, message, code] of cases) {
      const b = batch([
        item({ sequence_id: 8, slot: 0, token_count: 2 }),
        item({ sequence_id: 9, ...bad }),
        item({ sequence_id: 10, slot: 3, token_count: 1 }),
      ]);
      const badCount = Math.max(0, b.items[1].token_count);
      const mid = badTokens ?? Array.from({ length: badCount }, () => 77);
      b.token_ids = [11, 12, ...mid, 13];
      const plan = planBatch(b, first, ledger);
      const r = oneRefusal(plan);
      assert.match(r.message, message);
      assert.deepEqual([r.sequence_id, r.status_code], [9, code], String(message));
      assert.deepEqual(
        plan.kept.map((k) => k.sequence_id),
        [8, 10],
      );
      assert.ok(plan.input && 'tokens' in plan.input);
      assert.deepEqual(Array.from(plan.input.tokens), [11, 12, 13], 'the refused item takes its tokens with it');
      assert.deepEqual(plan.copies, []);
    }
    assert.deepEqual([ledger.held(1), ledger.held(2), ledger.tokensInUse], [0, 5, 5], 'unchanged');
  });

  test('a refused item’s prefix copy is not made and does not count for the items after it', () => {
    const ledger = new KvLedger(4, 64);
    ledger.write(0, 0, 6);
    // Both accepted: item 2 copies from slot 1 what item 1's copy put there.
    const plan = planBatch(
      batch([
        item({ sequence_id: 1, slot: 1, start_position: 4, copy_prefix: { from_slot: 0, length: 4 } }),
        item({ sequence_id: 2, slot: 2, start_position: 3, copy_prefix: { from_slot: 1, length: 3 } }),
      ]),
      first,
      ledger,
    );
    assert.equal(plan.refusals.length, 0);
    // Item 1 refused (its token is outside the vocabulary): its copy is not made, so slot 1 is still empty for item 2.
    const refused = planBatch(
      batch(
        [
          item({ sequence_id: 1, slot: 1, start_position: 4, copy_prefix: { from_slot: 0, length: 4 } }),
          item({ sequence_id: 2, slot: 2, start_position: 3, copy_prefix: { from_slot: 1, length: 3 } }),
        ],
        { token_ids: [5000, 2] },
      ),
      first,
      ledger,
    );
    assert.deepEqual(
      refused.refusals.map((r) => [r.sequence_id, r.status_code]),
      [
        [1, 3],
        [2, 9],
      ],
    );
    assert.match(refused.refusals[1].message, /copy_prefix\.length 3 exceeds the 0 positions slot 1 holds/);
    assert.equal(refused.input, null, 'nothing to run');
    assert.deepEqual(plan.copies, [
      { from: 0, to: 1, length: 4 },
      { from: 1, to: 2, length: 3 },
    ]);
  });

  test('whole-batch problems throw: duplicates, token or hidden counts, sampling entries that do not line up', () => {
    const ledger = new KvLedger(4, 64);
    const mid = { ...first, isFirst: false };
    const cases: [MicroBatch, StageLimits, RegExp][] = [
      [
        batch(Array.from({ length: 5 }, (_, i) => item({ sequence_id: i, slot: i % 4 }))),
        first,
        /5 items exceed the 4 KV slots/,
      ],
      [
        batch([item({ slot: 0 }), item({ slot: 1 })]),
        first,
        /items\[0\] and items\[1\]: sequence 1 appears twice in one micro-batch/,
      ],
      [batch([item({ slot: 1 }), item({ sequence_id: 2, slot: 1 })]), first, /slot 1 appears twice/],
      [
        batch([item({ token_count: 2 })], { token_ids: [1] }),
        first,
        /token_ids has 1 ids but the items' token_count add up to 2/,
      ],
      [batch([item({})], { reply_to: '' }), first, /reply_to is empty/],
      [batch([item({ token_count: 2 })], { token_ids: [], hidden_states: null }), mid, /hidden_states is missing/],
      [
        batch([item({ token_count: 2 })], { token_ids: [], hidden_states: { ...hidden(2), dtype: 'DTYPE_FLOAT16' } }),
        mid,
        /hidden_states\.dtype DTYPE_FLOAT16 is not DTYPE_FLOAT32/,
      ],
      [
        batch([item({ token_count: 2 })], { token_ids: [], hidden_states: hidden(2, 3) }),
        mid,
        /hidden_states\.shape \[2, 3\] must be \[2, 4\]/,
      ],
      [
        batch([item({ token_count: 2 })], {
          token_ids: [],
          hidden_states: { ...hidden(2), shape: [], data: Buffer.alloc(12) },
        }),
        mid,
        /hidden_states\.data has 12 bytes; 2 tokens × hidden_size 4 × 4 = 32/,
      ],
      [
        batch([item({ sample: true })], { sampling: [] }),
        first,
        /sampling has 0 entries but more items have sample = true \(items\[0\] is one\)/,
      ],
      [
        batch([item({ sample: true })], { sampling: [side(), side()] }),
        first,
        /sampling has 2 entries but only 1 items have sample = true/,
      ],
      [
        batch([item({ sample: true })], { sampling: [side({ sequence_id: 4 })] }),
        last,
        /sampling\[0\]\.sequence_id 4 does not match items\[0\]\.sequence_id 1/,
      ],
    ];
    for (const [b, stage, message] of cases) {
      if (!stage.isFirst && b.hidden_states === undefined) b.hidden_states = hidden(1);
      assert.throws(
        () => planBatch(b, stage, ledger),
        (err: Error) => err instanceof ShardRequestError && message.test(err.message),
        String(message),
      );
    }
  });

  test('later stages take float32 hidden states [tokens, hidden] and drop the rows of refused items', () => {
    const ledger = new KvLedger(4, 64);
    const mid = { ...first, isFirst: false };
    const ok = planBatch(batch([item({ token_count: 2 })], { token_ids: [], hidden_states: hidden(2) }), mid, ledger);
    assert.ok(ok.input && 'hidden' in ok.input && ok.input.hidden.length === 8);
    // Items of 2, 3 and 1 tokens; the middle one is refused (KV not present): rows 2..4 go with it.
    const plan = planBatch(
      batch(
        [
          item({ sequence_id: 1, slot: 0, token_count: 2 }),
          item({ sequence_id: 2, slot: 1, start_position: 7, token_count: 3 }),
          item({ sequence_id: 3, slot: 2, token_count: 1 }),
        ],
        { token_ids: [], hidden_states: hidden(6) },
      ),
      mid,
      ledger,
    );
    assert.equal(oneRefusal(plan).sequence_id, 2);
    assert.ok(plan.input && 'hidden' in plan.input);
    assert.deepEqual(Array.from(plan.input.hidden), [0, 0, 0, 0, 1, 1, 1, 1, 5, 5, 5, 5]);
    assert.equal(plan.input.hidden.byteOffset, 0, 'an aligned array of its own');
    // Everything refused upstream: an empty batch with no rows runs nothing.
    const empty = planBatch(batch([], { token_ids: [], hidden_states: hidden(0) }), mid, ledger);
    assert.deepEqual([empty.kept.length, empty.input, empty.refusals.length], [0, null, 0]);
  });

  test('last stage: sampled items with their rows; greedy and penalty off map to 1; non-sampling items neutral', () => {
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
            penalty_reset: true,
          }),
          side({ sequence_id: 3, full_row: true, top_k: 0, penalised_ids: [5000] }),
        ],
      },
    );
    const plan = planBatch(b, last, ledger);
    assert.deepEqual(
      plan.sampled.map((s) => [s.index, s.sequenceId, s.slot, s.topK, s.fullRow]),
      [
        [1, 2, 1, 5, false],
        [2, 3, 2, 1, true],
      ],
    );
    const { rows } = samplingRows(plan, new PenaltySets());
    assert.equal(rows[0].topK, 1);
    assert.deepEqual(rows[1], {
      maskBegin: 800,
      maskEnd: 1000,
      repetitionPenalty: 1.2,
      penalisedIds: [4, 9],
      temperature: 0.7,
      topK: 5,
      fullRow: false,
    });
    // penalty 0 = off: its ids are not used (nor checked); temperature 0 = greedy = unscaled.
    assert.deepEqual([rows[2].repetitionPenalty, rows[2].penalisedIds, rows[2].temperature], [1, [], 1]);
  });

  test('a bad sampling entry refuses its item on every stage (before any stage wrote its KV)', () => {
    const ledger = new KvLedger(4, 64);
    const cases: [SamplingSide, RegExp][] = [
      [side({ top_k: 51 }), /sampling\[0\] \(sequence 1\)\.top_k 51 must be in \[1, 50\] \(max_top_k\)/],
      [side({ top_k: 0 }), /top_k 0 must be in \[1, 50\]/],
      [side({ temperature: Number.NaN }), /temperature NaN must be finite and ≥ 0/],
      [side({ repetition_penalty: -1 }), /repetition_penalty -1 must be finite and ≥ 0/],
      [
        side({ repetition_penalty: 1.1, penalised_ids: [3, 1000] }),
        /sampling\[0\] \(sequence 1\)\.penalised_ids\[1\] = 1000 is outside the vocabulary/,
      ],
      [side({ mask: 'MASK_KIND_IMAGE_LAYOUT' }), /MASK_KIND_IMAGE_LAYOUT needs allow_begin < allow_end ≤ 1000/],
      [side({ mask: 'MASK_KIND_IMAGE_LAYOUT', allow_begin: 10, allow_end: 1001 }), /got \[10, 1001\)/],
      [side({ mask: 'MASK_KIND_TEXT', allow_begin: 1, allow_end: 2 }), /only for MASK_KIND_IMAGE_LAYOUT/],
      [side({ cfg_uncond_sequence_id: 1, guidance_scale: 3 }), /cfg_uncond_sequence_id must name another/],
      [side({ cfg_uncond_sequence_id: 2, guidance_scale: -1 }), /guidance_scale -1 must be finite and ≥ 0/],
      [side({ cfg_uncond_sequence_id: 2, guidance_scale: Number.NaN }), /guidance_scale NaN/],
    ];
    for (const stage of [first, last])
      for (const [s, message] of cases) {
        const b = batch([item({ sample: true }), item({ sequence_id: 2, slot: 1 })], {
          sampling: [s],
          ...(stage.isFirst ? {} : { token_ids: [], hidden_states: hidden(2) }),
        });
        const plan = planBatch(b, stage, ledger);
        const r = oneRefusal(plan);
        assert.match(r.message, message);
        assert.ok(r.message.startsWith(`${stage.where}: `), r.message);
        assert.deepEqual([r.sequence_id, r.status_code], [1, 3]);
        assert.deepEqual(
          [plan.kept.map((k) => k.sequence_id), plan.keptSampling, plan.sampled],
          [[2], [], []],
          'the entry leaves with its item',
        );
      }
  });
});

describe('guidance pairs', () => {
  const layout = { mask: 'MASK_KIND_IMAGE_LAYOUT' as const, allow_begin: 800, allow_end: 1000, top_k: 20 };
  const pair = (condOver: Partial<BatchItem> = {}) =>
    batch(
      [
        item({ sequence_id: 9, slot: 3, sample: true }),
        item({ sample: true, ...condOver }),
        item({ sequence_id: 2, slot: 1, sample: true }),
      ],
      {
        token_ids: [],
        hidden_states: hidden(3),
        sampling: [
          side({ sequence_id: 9 }),
          side({ ...layout, temperature: 1, cfg_uncond_sequence_id: 2, guidance_scale: 3 }),
          side({ ...layout, sequence_id: 2 }),
        ],
      },
    );

  test('the guided row names its partner’s row in the run, with the keep range and the scale', () => {
    const plan = planBatch(pair(), last, new KvLedger(4, 64));
    assert.deepEqual(plan.refusals, []);
    const { rows } = samplingRows(plan, new PenaltySets());
    assert.deepEqual(rows[1].cfg, { partnerRow: 2, scale: 3 });
    assert.deepEqual([rows[1].keepBegin, rows[1].keepEnd, rows[1].maskEnd], [800, 1000, 0]);
    assert.equal(rows[2].cfg, undefined);
    assert.deepEqual([rows[2].keepBegin, rows[2].keepEnd], [800, 1000]);
    assert.equal(rows[0].cfg, undefined);
  });

  test('either item of a pair refused refuses the other; the unrelated item runs', () => {
    for (const stage of [first, last]) {
      // the conditional item asks for positions its slot does not hold
      const b = pair({ start_position: 5 });
      if (stage.isFirst) {
        b.token_ids = [1, 2, 3];
        b.hidden_states = null;
      }
      const plan = planBatch(b, stage, new KvLedger(4, 64));
      assert.deepEqual(
        plan.kept.map((k) => k.sequence_id),
        [9],
      );
      assert.deepEqual(plan.refusals.map((r) => r.sequence_id).sort(), [1, 2]);
      const partner = plan.refusals.find((r) => r.sequence_id === 2)!;
      assert.match(partner.message, /the sequence it guides \(sequence 1\) does not run here/);
    }
    // the unconditional item missing from the batch: the guided one is refused (FAILED_PRECONDITION)
    const b = pair();
    b.items = b.items.slice(0, 2);
    b.sampling = b.sampling.slice(0, 2);
    b.hidden_states = hidden(2);
    const plan = planBatch(b, last, new KvLedger(4, 64));
    const r = oneRefusal(plan);
    assert.deepEqual([r.sequence_id, r.status_code], [1, 9]);
    assert.match(r.message, /its guidance partner \(sequence 2\) is not a sampled item that runs here/);
  });
});

describe('samplingRows + PenaltySets', () => {
  const plan1 = (over: Partial<SamplingSide>, slot = 0) =>
    planBatch(
      batch([item({ slot, sample: true })], {
        token_ids: [],
        hidden_states: hidden(1),
        sampling: [side({ repetition_penalty: 1.3, ...over })],
      }),
      last,
      new KvLedger(4, 64),
    );

  test('deltas add to the slot’s set; penalty_reset clears it first; nothing is kept before commit', () => {
    const sets = new PenaltySets();
    const step = (over: Partial<SamplingSide>, slot = 0) => {
      const { rows, commit } = samplingRows(plan1(over, slot), sets);
      commit();
      return Array.from(rows[0].penalisedIds).sort((a, b) => a - b);
    };
    assert.deepEqual(step({ penalised_ids: [5, 3, 5], penalty_reset: true }), [3, 5]);
    assert.deepEqual(step({ penalised_ids: [7] }), [3, 5, 7]);
    assert.deepEqual(step({ penalised_ids: [3] }), [3, 5, 7], 'each id counted once');
    assert.deepEqual(step({ penalised_ids: [9], penalty_reset: true }), [9]);
    assert.deepEqual(step({ penalised_ids: [1] }, 1), [1], 'another slot has its own set');
    // Not committed (the batch failed): the set stays as it was.
    samplingRows(plan1({ penalised_ids: [42] }), sets);
    assert.deepEqual(sets.held(0), [9]);
    sets.drop(0);
    assert.deepEqual(step({ penalised_ids: [2] }), [2], 'a freed slot starts empty');
  });

  test('penalty off: no ids in the row and none kept; a reset still clears the set', () => {
    const sets = new PenaltySets();
    samplingRows(plan1({ penalised_ids: [4], penalty_reset: true }), sets).commit();
    const off = samplingRows(plan1({ repetition_penalty: 1, penalised_ids: [8] }), sets);
    off.commit();
    assert.deepEqual([off.rows[0].penalisedIds, off.rows[0].repetitionPenalty, sets.held(0)], [[], 1, [4]]);
    samplingRows(plan1({ repetition_penalty: 0, penalty_reset: true }), sets).commit();
    assert.deepEqual([sets.held(0), sets.size], [[], 0]);
  });
});

test('planKvCommand: valid entries apply in order (copies, then frees); invalid ones are listed, not applied', () => {
  const ledger = new KvLedger(4, 64);
  ledger.write(0, 0, 9);
  const { ops, errors } = planKvCommand(
    {
      copies: [
        { from_slot: 0, to_slot: 1, length: 9 },
        { from_slot: 2, to_slot: 3, length: 1 },
        { from_slot: 1, to_slot: 2, length: 4 },
      ],
      free_slots: [0, 9, 3],
    },
    ledger,
  );
  assert.deepEqual(ops, [
    { copy: { from: 0, to: 1, length: 9 } },
    { copy: { from: 1, to: 2, length: 4 } },
    { free: 0 },
    { free: 3 },
  ]);
  assert.equal(errors.length, 2);
  assert.match(errors[0].message, /kv\.copies\[1\]\.length 1 exceeds the 0 positions slot 2 holds/);
  assert.match(errors[1].message, /kv\.free_slots\[1\] 9 is out of range \[0, 4\)/);
  assert.deepEqual(
    errors.map((e) => e.code),
    [9, 3],
    'KV not present: FAILED_PRECONDITION; a bad slot: INVALID_ARGUMENT',
  );
  assert.deepEqual([ledger.held(0), ledger.held(1), ledger.held(2)], [9, 0, 0], 'unchanged');
});
