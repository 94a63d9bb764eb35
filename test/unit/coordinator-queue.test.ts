import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GrpcCode, ResourceExhaustedError } from '../../services/coordinator/errors.js';
import { AdmissionQueue } from '../../services/coordinator/queue.js';

test('FIFO order', () => {
  const q = new AdmissionQueue<number>(3);
  q.push('a', 1, 0);
  q.push('b', 2, 1);
  q.push('c', 3, 2);
  assert.deepEqual([q.shift()?.id, q.shift()?.id, q.shift()?.id, q.shift()], ['a', 'b', 'c', undefined]);
});

test('beyond the bound: ResourceExhausted naming the limit; room again after one leaves', () => {
  const q = new AdmissionQueue<string>(2, '--max-queue');
  q.push('a', 'x', 0);
  q.push('b', 'y', 0);
  assert.throws(
    () => q.push('c', 'z', 0),
    (e: unknown) =>
      e instanceof ResourceExhaustedError &&
      e.code === GrpcCode.RESOURCE_EXHAUSTED &&
      /--max-queue = 2/.test(e.message) &&
      /2 requests waiting/.test(e.message),
  );
  q.shift();
  assert.equal(q.push('c', 'z', 0).id, 'c');
  assert.throws(() => q.push('c', 'z', 0), /already queued/);
});

test('cancelled entries are removed; the rest keep their order', () => {
  const q = new AdmissionQueue<number>(5);
  for (const id of ['a', 'b', 'c', 'd']) q.push(id, 0, 0);
  assert.equal(q.remove('b')?.id, 'b');
  assert.equal(q.remove('b'), undefined);
  assert.deepEqual(
    q.list().map((x) => x.id),
    ['a', 'c', 'd'],
  );
});

test('expired entries leave at their deadline, in order; others stay', () => {
  const q = new AdmissionQueue<number>(5);
  q.push('a', 0, 0, 100);
  q.push('b', 0, 0);
  q.push('c', 0, 10, 50);
  q.push('d', 0, 20, 200);
  assert.deepEqual(q.expire(49), []);
  assert.deepEqual(
    q.expire(100).map((x) => x.id),
    ['a', 'c'],
  );
  assert.deepEqual(
    q.list().map((x) => x.id),
    ['b', 'd'],
  );
  assert.equal(q.peek()?.enqueuedAt, 0);
});
