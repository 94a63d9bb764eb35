// The idle fraction of a worker over a trailing window, from a monotonic "busy milliseconds so far" total sampled now
// and then: 1 − Δbusy ÷ Δwall between the oldest sample still inside the window and now. Pure; the callers sample
// it on a timer and at every scrape.

export class IdleWindow {
  private readonly samples: { at: number; busy: number }[] = [];

  constructor(
    /** How far back the ratio looks (ms). */
    readonly windowMs = 10_000,
  ) {}

  /** Records the busy total at time `at` (ms, non-decreasing). */
  sample(at: number, busyMs: number): void {
    this.samples.push({ at, busy: busyMs });
    // Keep one sample at or before the window's start so the ratio always covers the whole window once it can.
    while (this.samples.length > 2 && this.samples[1].at <= at - this.windowMs) this.samples.shift();
  }

  /** Idle fraction in [0, 1] over the window ending at the latest sample; 1 before two samples exist. */
  idleRatio(): number {
    if (this.samples.length < 2) return 1;
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    const wall = last.at - first.at;
    if (wall <= 0) return 1;
    return Math.min(1, Math.max(0, 1 - (last.busy - first.busy) / wall));
  }
}
