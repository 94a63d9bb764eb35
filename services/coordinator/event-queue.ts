// An unbounded async queue of one call's engine events. A wait listens for the call's abort with one listener,
// removed when the wait ends, so a long answer (one wait per event) never accumulates listeners on the signal.
import type { EngineEvent } from './engine.js';

export class EventQueue<E = EngineEvent> {
  private readonly items: E[] = [];
  private wake: (() => void) | null = null;

  push(e: E): void {
    this.items.push(e);
    this.wake?.();
  }

  /** The next event, waiting for one; throws the signal's reason once it is aborted and nothing is queued. */
  async next(signal: AbortSignal): Promise<E> {
    while (this.items.length === 0) {
      if (signal.aborted) throw signal.reason;
      let onAbort!: () => void;
      try {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
          onAbort = resolve;
          signal.addEventListener('abort', onAbort, { once: true });
        });
      } finally {
        this.wake = null;
        signal.removeEventListener('abort', onAbort);
      }
    }
    return this.items.shift() as E;
  }
}
