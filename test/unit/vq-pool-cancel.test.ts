import assert from 'node:assert/strict';
import { getEventListeners } from 'node:events';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { WorkerPool } from '../../services/vq/pool.js';

function deferred<T = void>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

const cancelled = (message: RegExp) => (e: unknown) =>
  (e as { code?: number }).code === status.CANCELLED && message.test((e as Error).message);

test(
  'a running task abandoned: its caller is answered at once, the worker goes on when the task settles',
  { timeout: 10_000 },
  async () => {
    const pool = new WorkerPool(['w'], 4, 'vq');
    const gate = deferred();
    const seen: (AbortSignal | undefined)[] = [];
    const controller = new AbortController();
    const first = pool.run(async (_w, signal) => {
      seen.push(signal);
      await gate.promise;
      return 'late result';
    }, controller.signal);
    await new Promise((r) => setImmediate(r));
    const next = pool.run(async () => 'next');
    assert.equal(pool.queued, 1);
    controller.abort();
    await assert.rejects(first, cancelled(/cancelled while running; its result is dropped/));
    assert.equal(seen[0], controller.signal, 'the task gets the signal to stop at its next step');
    assert.equal(pool.busy, 1, 'the uninterruptible task still holds its worker');
    assert.equal(pool.queued, 1);
    gate.resolve();
    assert.equal(await next, 'next');
    assert.equal(pool.busy, 0);
    assert.deepEqual(pool.cancelled, { skipped: 0, abandoned: 1 });
    assert.equal(getEventListeners(controller.signal, 'abort').length, 0);
  },
);

test(
  'queued tasks cancelled never start and are counted as skipped; finished runs leave no listener',
  { timeout: 10_000 },
  async () => {
    const pool = new WorkerPool(['w'], 16, 'vq');
    const gate = deferred();
    const holder = pool.run(() => gate.promise);
    const started: number[] = [];
    const controllers = Array.from({ length: 8 }, () => new AbortController());
    const queued = controllers.map((c, i) =>
      pool.run(async () => {
        started.push(i);
      }, c.signal),
    );
    for (const c of controllers) c.abort();
    for (const q of queued) await assert.rejects(q, cancelled(/cancelled while queued/));
    const already = new AbortController();
    already.abort();
    await assert.rejects(
      pool.run(async () => 0, already.signal),
      cancelled(/before it started/),
    );
    gate.resolve();
    await holder;
    assert.deepEqual(started, []);
    assert.deepEqual(pool.cancelled, { skipped: 9, abandoned: 0 });
    const kept = new AbortController();
    for (let i = 0; i < 100; i++) assert.equal(await pool.run(async () => i, kept.signal), i);
    assert.equal(getEventListeners(kept.signal, 'abort').length, 0);
  },
);
