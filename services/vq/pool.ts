// A bounded pool: each request takes a worker (one request in flight per worker); when all are busy it waits in a
// FIFO queue of at most `queueLimit`; one more is refused at once with RESOURCE_EXHAUSTED, so overload never becomes
// unbounded memory. A request whose client goes away while it waits leaves the queue (skipped); one that is running
// is abandoned: its caller is answered at once and its result dropped, and the task gets the signal so it can stop
// at its next step. The worker is handed to the next request when the task settles (a task that cannot be
// interrupted, such as an ORT run, keeps its worker until it ends).
import { Cancelled, ResourceExhausted } from '../../lib/rpc/errors.js';

interface Waiter<W> {
  grant: (worker: W) => void;
  reject: (err: unknown) => void;
}

export class WorkerPool<W> {
  private readonly idle: W[];
  private readonly waiting: Waiter<W>[] = [];

  constructor(
    workers: W[],
    /** Requests that may wait for a worker; 0 = refuse whenever every worker is busy. */
    readonly queueLimit: number,
    /** Names the pool in messages, e.g. 'vq'. */
    private readonly name: string,
  ) {
    if (workers.length === 0) throw new RangeError(`${name} pool needs at least one worker`);
    if (!Number.isInteger(queueLimit) || queueLimit < 0)
      throw new RangeError(`${name} queue limit must be an integer >= 0, got ${queueLimit}`);
    this.idle = [...workers];
    this.size = workers.length;
  }

  readonly size: number;

  get queued(): number {
    return this.waiting.length;
  }

  get busy(): number {
    return this.size - this.idle.length;
  }

  /** Requests whose caller went away: `skipped` before they started, `abandoned` while they ran. */
  readonly cancelled = { skipped: 0, abandoned: 0 };

  /**
   * Runs `task` on a free worker, waiting in the queue if needed. Once `signal` aborts, this rejects with Cancelled
   * at once, whether the task is queued (it never starts) or running (its result is dropped).
   */
  async run<T>(task: (worker: W, signal?: AbortSignal) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const worker = await this.acquire(signal);
    const running = Promise.resolve()
      .then(() => task(worker, signal))
      .finally(() => this.release(worker));
    if (!signal) return running;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => {
        this.cancelled.abandoned++;
        reject(new Cancelled(`${this.name}: request cancelled while running; its result is dropped`));
      };
      running.then(
        (value) => {
          signal.removeEventListener('abort', onAbort);
          resolve(value);
        },
        (err: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(err);
        },
      );
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private acquire(signal?: AbortSignal): Promise<W> {
    if (signal?.aborted) {
      this.cancelled.skipped++;
      return Promise.reject(new Cancelled(`${this.name}: request cancelled before it started`));
    }
    const free = this.idle.pop();
    if (free !== undefined) return Promise.resolve(free);
    if (this.waiting.length >= this.queueLimit) {
      return Promise.reject(
        new ResourceExhausted(
          `${this.name}: server busy: all ${this.size} worker(s) are running and the queue is full ` +
            `(queue limit ${this.queueLimit}); retry later`,
        ),
      );
    }
    return new Promise<W>((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiting.indexOf(waiter);
        if (i >= 0) this.waiting.splice(i, 1);
        this.cancelled.skipped++;
        reject(new Cancelled(`${this.name}: request cancelled while queued`));
      };
      const waiter: Waiter<W> = {
        grant: (w) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(w);
        },
        reject,
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiting.push(waiter);
    });
  }

  private release(worker: W): void {
    const next = this.waiting.shift();
    if (next) next.grant(worker);
    else this.idle.push(worker);
  }
}
