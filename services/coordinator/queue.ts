// The bounded admission queue (docs/architecture.md, "Failure model"): requests wait here, FIFO, until the scheduler
// admits them. Beyond the bound a request is refused at once with ResourceExhausted, never by running out of memory
// later. Entries leave when admitted, cancelled (client gone) or past their deadline. Time is passed in, so this stays
// pure.
import { ResourceExhaustedError } from './errors.js';

export interface Queued<T> {
  id: string;
  item: T;
  /** When it was queued (ms, the caller's clock). */
  enqueuedAt: number;
  /** Absolute deadline (ms, same clock); Infinity for none. */
  deadline: number;
}

export class AdmissionQueue<T> {
  private readonly items: Queued<T>[] = [];

  /** limitName names the setting in the error message, e.g. "--max-queue". */
  constructor(
    readonly maxSize: number,
    private readonly limitName = 'max queue size',
  ) {}

  get size(): number {
    return this.items.length;
  }

  /** Adds at the back. Throws ResourceExhaustedError when full, and Error on a duplicate id. */
  push(id: string, item: T, now: number, deadline = Number.POSITIVE_INFINITY): Queued<T> {
    if (this.items.some((q) => q.id === id)) throw new Error(`AdmissionQueue: request "${id}" is already queued`);
    if (this.items.length >= this.maxSize)
      throw new ResourceExhaustedError(
        `admission queue is full: ${this.items.length} requests waiting (limit ${this.limitName} = ${this.maxSize}); retry later`,
      );
    const q = { id, item, enqueuedAt: now, deadline };
    this.items.push(q);
    return q;
  }

  /** The oldest entry, not removed. */
  peek(): Queued<T> | undefined {
    return this.items[0];
  }

  /** Removes and returns the oldest entry. */
  shift(): Queued<T> | undefined {
    return this.items.shift();
  }

  /** Removes a request (cancelled or admitted out of the queue); returns it, or undefined if not queued. */
  remove(id: string): Queued<T> | undefined {
    const i = this.items.findIndex((q) => q.id === id);
    return i < 0 ? undefined : this.items.splice(i, 1)[0];
  }

  /** Removes and returns every entry whose deadline is ≤ now (the caller answers them DEADLINE_EXCEEDED). */
  expire(now: number): Queued<T>[] {
    const expired: Queued<T>[] = [];
    for (let i = 0; i < this.items.length; ) {
      if (this.items[i].deadline <= now) expired.push(this.items.splice(i, 1)[0]);
      else i++;
    }
    return expired;
  }

  /** Entries oldest first (a copy). */
  list(): Queued<T>[] {
    return [...this.items];
  }
}
