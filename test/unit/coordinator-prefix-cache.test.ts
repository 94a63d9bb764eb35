import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PrefixCache } from '../../services/coordinator/prefix-cache.js';

const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);

test('lookup finds the longest common prefix with any entry, leaving the last prompt token to run', () => {
  const c = new PrefixCache<number>({ maxEntries: 8 });
  const system = range(0, 10);
  const image = range(100, 140);
  c.insert([...system, ...image, 7, 8, 9], 0);
  c.insert([...system, 55, 56], 1);
  const hit = c.lookup([...system, ...image, 1, 2])!;
  assert.equal(hit.entry.kv, 0);
  assert.equal(hit.length, 50);
  const sys = c.lookup([...system, 99])!;
  assert.equal(sys.length, 10);
  assert.equal(c.lookup([...system, 55, 56])!.length, 11, 'an exact repeat still runs its last token');
  assert.equal(c.lookup([...system, 55, 56], 12)!.length, 12);
  assert.equal(c.lookup([5, 6, 7]), null);
});

test('matches shorter than minMatch are misses', () => {
  const c = new PrefixCache<number>({ maxEntries: 8, minMatch: 16 });
  c.insert(range(0, 40), 0);
  assert.equal(c.lookup([...range(0, 15), 999, 1000]), null);
  assert.equal(c.lookup([...range(0, 16), 999])!.length, 16);
});

test('inserting something already covered adopts nothing; an extension replaces the shorter entry', () => {
  const c = new PrefixCache<string>({ maxEntries: 8 });
  const first = c.insert(range(0, 20), 'a');
  assert.equal(first.adopted, true);
  const covered = c.insert(range(0, 10), 'b');
  assert.equal(covered.adopted, false);
  assert.equal(covered.entry?.kv, 'a');
  const longer = c.insert(range(0, 30), 'c');
  assert.equal(longer.adopted, true);
  assert.deepEqual(
    longer.evicted.map((e) => e.kv),
    ['a'],
  );
  assert.equal(c.size, 1);
  assert.equal(c.lookup(range(0, 25))!.entry.kv, 'c');
});

test('LRU eviction of unpinned entries when capacity is needed; pinned entries stay', () => {
  const c = new PrefixCache<string>({ maxEntries: 2 });
  const a = c.insert([1, 2, 3], 'a').entry!;
  c.insert([4, 5, 6], 'b');
  c.lookup([1, 2, 3, 0]); // a is now more recent than b
  const r = c.insert([7, 8, 9], 'c');
  assert.deepEqual(
    r.evicted.map((e) => e.kv),
    ['b'],
  );
  assert.equal(c.lookup([4, 5, 6, 0]), null);
  c.pin(a);
  const d = c.insert([10, 11], 'd');
  assert.deepEqual(
    d.evicted.map((e) => e.kv),
    ['c'],
    'a is pinned although it is older',
  );
  c.pin(d.entry!);
  const e = c.insert([12, 13], 'e');
  assert.equal(e.adopted, false, 'everything pinned: the caller keeps its KV');
  assert.equal(e.entry, null);
  assert.throws(() => c.remove(a), /pinned/);
  c.unpin(a);
  assert.equal(c.evictLru()?.kv, 'a');
  assert.throws(() => c.unpin(a), /not pinned/);
});

test('radix splits and removals keep lookups equal to a brute-force longest common prefix', () => {
  const c = new PrefixCache<number>({ maxEntries: 12 });
  let seed = 5;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  const randomSeq = () => Array.from({ length: 1 + rand(12) }, () => rand(3));
  for (let i = 0; i < 2000; i++) {
    const op = rand(4);
    if (op === 0 && c.size > 0) {
      const all = c.all();
      c.remove(all[rand(all.length)]);
    } else if (op === 1) {
      c.insert(randomSeq(), i);
    } else {
      const q = randomSeq();
      let best = 0;
      for (const e of c.all()) {
        let n = 0;
        while (n < e.tokens.length && n < q.length - 1 && e.tokens[n] === q[n]) n++;
        best = Math.max(best, n);
      }
      const hit = c.lookup(q);
      assert.equal(hit?.length ?? 0, best, `query ${q}`);
      if (hit) assert.deepEqual([...hit.entry.tokens.slice(0, hit.length)], q.slice(0, hit.length));
    }
  }
});
