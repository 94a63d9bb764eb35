// Stop strings over a streamed answer. Text arrives in pieces (one detokenized delta per token); a stop string may
// span pieces. We hold back the longest tail that could still be the start of a stop string, never emit the stop
// string itself, and emit every other character exactly once, in order.

export interface StopResult {
  /** Text that is now safe to send to the client. */
  emit: string;
  /** A stop string was found: the answer ends here (the stop string and anything after it are dropped). */
  stopped: boolean;
  /** Which stop string ended the answer (the one that starts first; on a tie the longest). */
  matched?: string;
}

export class StopMatcher {
  private held = '';
  private done = false;
  private readonly stops: string[];

  constructor(stops: readonly string[]) {
    this.stops = stops.filter((s) => s.length > 0);
  }

  /** Feeds the next piece of text. After a stop, further pushes emit nothing. */
  push(piece: string): StopResult {
    if (this.done) return { emit: '', stopped: true };
    const text = this.held + piece;
    let at = -1;
    let matched: string | undefined;
    for (const s of this.stops) {
      const i = text.indexOf(s);
      if (i >= 0 && (at < 0 || i < at || (i === at && s.length > matched!.length))) {
        at = i;
        matched = s;
      }
    }
    if (matched !== undefined) {
      this.done = true;
      this.held = '';
      return { emit: text.slice(0, at), stopped: true, matched };
    }
    const keep = this.partialTail(text);
    this.held = text.slice(text.length - keep);
    return { emit: text.slice(0, text.length - keep), stopped: false };
  }

  /** The answer ended for another reason (eos, length): release what was held back. */
  flush(): string {
    const rest = this.done ? '' : this.held;
    this.held = '';
    return rest;
  }

  /** Length of the longest suffix of text that is a proper prefix of some stop string. */
  private partialTail(text: string): number {
    let best = 0;
    for (const s of this.stops) {
      for (let len = Math.min(s.length - 1, text.length); len > best; len--) {
        if (text.endsWith(s.slice(0, len))) {
          best = len;
          break;
        }
      }
    }
    return best;
  }
}
