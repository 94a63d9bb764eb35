// services/vq building blocks without gRPC or ORT: the bounded worker pool and the code-grid wire format.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { RpcError } from '../../lib/rpc/errors.js';
import { codesFromBytes, codesToBytes, gridFromJson, gridToJson } from '../../services/vq/codes.js';
import { WorkerPool } from '../../services/vq/pool.js';

function deferred() {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

function isStatus(code: status, pattern: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof RpcError, String(err));
    assert.equal(status[err.code], status[code]);
    assert.match(err.message, pattern);
    return true;
  };
}

test('pool: one task per worker, FIFO queue up to the limit, then RESOURCE_EXHAUSTED naming the limit', async () => {
  const pool = new WorkerPool(['w0', 'w1'], 3, 'vq');
  const gates = Array.from({ length: 5 }, deferred);
  const order: string[] = [];
  const runs = gates.map((g, i) =>
    pool.run(async (w) => {
      order.push(`start ${i} on ${w}`);
      await g.promise;
      return i;
    }),
  );
  await new Promise((r) => setImmediate(r));
  assert.equal(pool.busy, 2);
  assert.equal(pool.queued, 3);
  assert.deepEqual(order, ['start 0 on w1', 'start 1 on w0']);
  await assert.rejects(
    pool.run(async () => 0),
    isStatus(status.RESOURCE_EXHAUSTED, /queue is full \(queue limit 3\)/),
  );
  gates[1].resolve();
  await runs[1];
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(order.at(-1), 'start 2 on w0', 'the freed worker takes the oldest waiter');
  for (const g of gates) g.resolve();
  assert.deepEqual(await Promise.all(runs), [0, 1, 2, 3, 4]);
  assert.equal(pool.busy, 0);
  assert.equal(pool.queued, 0);
});

test('pool: a failing task frees its worker; a cancelled waiter leaves the queue', async () => {
  const pool = new WorkerPool([1], 1, 'vq');
  await assert.rejects(
    pool.run(async () => {
      throw new Error('boom');
    }),
    /boom/,
  );
  const gate = deferred();
  const first = pool.run(() => gate.promise);
  const controller = new AbortController();
  const second = pool.run(async () => 'ran', controller.signal);
  assert.equal(pool.queued, 1);
  controller.abort();
  await assert.rejects(second, isStatus(status.CANCELLED, /cancelled while queued/));
  assert.equal(pool.queued, 0);
  const third = pool.run(async () => 'third');
  gate.resolve();
  await first;
  assert.equal(await third, 'third');
});

test('codes: int32 little-endian row-major on the wire, round trip through bytes and JSON', () => {
  const limits = { codebookSize: 32768, maxCodes: 16384 };
  const codes = Int32Array.from([0, 1, 32767, 256, 65, 7]);
  const bytes = codesToBytes(codes);
  assert.deepEqual([...bytes.subarray(0, 12)], [0, 0, 0, 0, 1, 0, 0, 0, 0xff, 0x7f, 0, 0]);
  assert.deepEqual(codesFromBytes(2, 3, bytes, limits), codes);
  const json = gridToJson(2, 3, codes);
  assert.deepEqual(json, {
    h: 2,
    w: 3,
    codes: [
      [0, 1, 32767],
      [256, 65, 7],
    ],
  });
  assert.deepEqual(gridFromJson(JSON.parse(JSON.stringify(json)), 'codes.json', limits).codes, codes);
});

test('codes: every malformed grid is INVALID_ARGUMENT naming the problem and the limit', () => {
  const limits = { codebookSize: 100, maxCodes: 12 };
  const bad = (fn: () => unknown, pattern: RegExp) => assert.throws(fn, isStatus(status.INVALID_ARGUMENT, pattern));
  bad(() => codesFromBytes(0, 3, Buffer.alloc(0), limits), /h must be an integer >= 1, got 0/);
  bad(() => codesFromBytes(2, 0, Buffer.alloc(0), limits), /w must be an integer >= 1, got 0/);
  bad(() => codesFromBytes(4, 4, Buffer.alloc(64), limits), /4×4 = 16 codes exceeds the limit of 12/);
  bad(() => codesFromBytes(2, 3, Buffer.alloc(20), limits), /20 bytes but h×w = 2×3 needs 24/);
  bad(
    () => codesFromBytes(2, 3, codesToBytes(Int32Array.from([0, 1, 2, 3, 100, 5])), limits),
    /code 100 at row 1, column 1 is outside the codebook \[0, 100\)/,
  );
  bad(() => codesFromBytes(1, 2, codesToBytes(Int32Array.from([-1, 0])), limits), /code -1 at row 0, column 0/);
  bad(
    () => gridFromJson({ h: 2, w: 2, codes: [[1, 2], [3]] }, 'c.json', limits),
    /c\.json: row 1 has 1 codes, expected w = 2/,
  );
  bad(() => gridFromJson({ h: 3, w: 1, codes: [[1], [2]] }, 'c.json', limits), /h is 3 but codes has 2 rows/);
  bad(() => gridFromJson({ codes: [[1.5]] }, 'c.json', limits), /codes\[0\]\[0\] = 1.5 is not an int32/);
  bad(() => gridFromJson([1, 2], 'c.json', limits), /c\.json: expected/);
});
