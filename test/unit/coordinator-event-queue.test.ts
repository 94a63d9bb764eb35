import assert from 'node:assert/strict';
import { getEventListeners } from 'node:events';
import { test } from 'node:test';
import { EventQueue } from '../../services/coordinator/event-queue.js';

test('1,000 waits leave no abort listener on the signal', { timeout: 10_000 }, async () => {
  const q = new EventQueue<number>();
  const controller = new AbortController();
  const got: number[] = [];
  for (let i = 0; i < 1000; i++) {
    const waiting = q.next(controller.signal);
    setImmediate(() => q.push(i));
    got.push(await waiting);
  }
  assert.deepEqual(
    got,
    Array.from({ length: 1000 }, (_, i) => i),
  );
  assert.equal(getEventListeners(controller.signal, 'abort').length, 0);
});

test(
  'queued events come out in order without waiting; a wait ends with the abort reason',
  { timeout: 10_000 },
  async () => {
    const q = new EventQueue<string>();
    const controller = new AbortController();
    q.push('a');
    q.push('b');
    assert.equal(await q.next(controller.signal), 'a');
    assert.equal(await q.next(controller.signal), 'b');
    const waiting = q.next(controller.signal);
    assert.equal(getEventListeners(controller.signal, 'abort').length, 1);
    const reason = new Error('gone');
    controller.abort(reason);
    await assert.rejects(waiting, (e) => e === reason);
    assert.equal(getEventListeners(controller.signal, 'abort').length, 0);
    await assert.rejects(q.next(controller.signal), (e) => e === reason);
  },
);

test('an event pushed before the abort is still delivered', { timeout: 10_000 }, async () => {
  const q = new EventQueue<number>();
  const controller = new AbortController();
  q.push(7);
  controller.abort(new Error('late'));
  assert.equal(await q.next(controller.signal), 7);
});
