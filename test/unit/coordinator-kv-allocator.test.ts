import assert from 'node:assert/strict';
import { test } from 'node:test';
import { commonCapacity, KvAllocator } from '../../services/coordinator/kv-allocator.js';

test('the common capacity is the smallest shard', () => {
  assert.deepEqual(
    commonCapacity([
      { slots: 8, tokens: 4096 },
      { slots: 6, tokens: 8192 },
    ]),
    { slots: 6, tokens: 4096 },
  );
  assert.throws(() => commonCapacity([]), /no shards/);
});

test('reservations are whole blocks and never exceed slots or the token budget', () => {
  const kv = new KvAllocator({ slots: 3, tokens: 100 }, 16); // 6 blocks of 16
  assert.equal(kv.blocksTotal, 6);
  const a = kv.reserve('a', 17)!;
  assert.equal(a.blocks.length, 2);
  assert.equal(kv.canReserve(65), false, '5 blocks needed, 4 free');
  assert.equal(kv.reserve('b', 65), null);
  assert.ok(kv.reserve('b', 64));
  assert.equal(kv.reserve('c', 1), null, 'no block left');
  assert.deepEqual(kv.stats(), {
    slotsTotal: 3,
    slotsInUse: 2,
    blocksTotal: 6,
    blocksInUse: 6,
    blockSize: 16,
    tokensReserved: 81,
  });
  assert.equal(kv.fitsAtAll(96), true);
  assert.equal(kv.fitsAtAll(97), false);
});

test('slots run out before blocks when sequences are short', () => {
  const kv = new KvAllocator({ slots: 2, tokens: 1024 }, 16);
  assert.ok(kv.reserve('a', 1));
  assert.ok(kv.reserve('b', 1));
  assert.equal(kv.reserve('c', 1), null);
  kv.release('a');
  assert.equal(kv.reserve('c', 1)?.slot, 0, 'the freed slot is reused');
});

test('free returns everything; double free is harmless; extend respects the budget', () => {
  const kv = new KvAllocator({ slots: 4, tokens: 64 }, 16);
  kv.reserve('a', 16);
  assert.equal(kv.extend('a', 48), true);
  assert.equal(kv.get('a').blocks.length, 3);
  kv.reserve('b', 16);
  assert.equal(kv.extend('a', 49), false, 'a fifth block does not exist');
  assert.equal(kv.get('a').blocks.length, 3, 'a failed extend changes nothing');
  assert.equal(kv.release('a'), true);
  assert.equal(kv.release('a'), false);
  assert.equal(kv.release('b'), true);
  assert.deepEqual(kv.stats(), {
    slotsTotal: 4,
    slotsInUse: 0,
    blocksTotal: 4,
    blocksInUse: 0,
    blockSize: 16,
    tokensReserved: 0,
  });
  assert.throws(() => kv.get('a'), /owner "a" holds no KV/);
});

test('random reserve/release never over-commits and no block is held twice', () => {
  const kv = new KvAllocator({ slots: 10, tokens: 1000 }, 8);
  let seed = 99;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  const live = new Set<string>();
  for (let i = 0; i < 3000; i++) {
    if (live.size > 0 && rand(2) === 0) {
      const owner = [...live][rand(live.size)];
      kv.release(owner);
      live.delete(owner);
    } else if (kv.reserve(`s${i}`, 1 + rand(300))) live.add(`s${i}`);
    const held = [...live].flatMap((o) => kv.get(o).blocks);
    assert.equal(new Set(held).size, held.length);
    assert.ok(held.length <= kv.blocksTotal && live.size <= 10);
    assert.equal(kv.stats().blocksInUse, held.length);
    const slots = [...live].map((o) => kv.get(o).slot);
    assert.equal(new Set(slots).size, slots.length);
  }
});
