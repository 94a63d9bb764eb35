// Bringing the pipeline back after a stage is lost (docs/architecture.md, "Failure model"). While any stage is
// missing the engine is down: health says NOT_SERVING and new requests are refused at once, naming the stage. The
// stages are polled every 250 ms (internal links reconnect at most 1 s apart), so recovery starts within about a
// second of the stage listening again: a new epoch, Reset on every stage, the Forward stream reopened, and the
// engine re-prefills its sequences from their token history. A stage still missing after --stage-timeout fails
// the requests the engine holds with UNAVAILABLE naming the stage and its address; polling goes on, so the service
// heals when the stage returns. Between failures a watch probes every stage once a second, so a stage that dies
// while the pipeline is idle is noticed too.
import type { Logger } from '../../lib/rpc/log.js';
import type { Engine } from './engine.js';
import { UnavailableError } from './errors.js';
import type { PipelineClient } from './pipeline-client.js';

export interface RecoveryOptions {
  pipeline: PipelineClient;
  engine: Engine;
  /** "stage [0, 2) at 127.0.0.1:50061" for stage i. */
  describeStage(index: number): string;
  /** Same checkpoint and layer split as at start; throws naming what changed. */
  verify(): Promise<void>;
  /** Reopens the Forward stream (after stage 0 came back). */
  reopen(): void;
  setServing(serving: boolean): void;
  stageTimeoutMs: number;
  log: Logger;
  /** Probe interval of the watch; 0 turns it off. Default 1000. */
  watchMs?: number;
  pollMs?: number;
}

export class Recovery {
  private recovering = false;
  private closed = false;
  private watchTimer: NodeJS.Timeout | null = null;
  private failedProbes = 0;

  constructor(private readonly opts: RecoveryOptions) {}

  /** Starts bringing the pipeline back (idempotent while one recovery runs). */
  start(reason: string): void {
    if (this.recovering || this.closed) return;
    this.recovering = true;
    void this.bringBack(reason).finally(() => {
      this.recovering = false;
    });
  }

  get active(): boolean {
    return this.recovering;
  }

  /** Probes every stage on a timer; two missed probes in a row count as a lost stage. */
  watch(): void {
    const every = this.opts.watchMs ?? 1000;
    if (every <= 0) return;
    let probing = false;
    this.watchTimer = setInterval(async () => {
      if (probing || this.recovering || this.closed || this.opts.engine.isDown) return;
      probing = true;
      try {
        // A busy stage still answers Info at once (ORT runs in its worker thread); 2 s leaves room for a loaded machine.
        const missing = await this.opts.pipeline.missing(2000);
        this.failedProbes = missing.length === 0 ? 0 : this.failedProbes + 1;
        if (this.failedProbes >= 2 && !this.closed && !this.opts.engine.isDown)
          this.opts.engine.pipelineLost(this.describeMissing(missing));
      } finally {
        probing = false;
      }
    }, every);
    this.watchTimer.unref();
  }

  close(): void {
    this.closed = true;
    if (this.watchTimer) clearInterval(this.watchTimer);
  }

  private describeMissing(missing: { index: number; error: string }[]): string {
    return missing.map((m) => `${this.opts.describeStage(m.index)} is not answering (${m.error})`).join('; ');
  }

  private async bringBack(first: string): Promise<void> {
    const { pipeline, engine, log } = this.opts;
    const poll = this.opts.pollMs ?? 250;
    this.opts.setServing(false);
    const since = performance.now();
    let reason = first;
    let gaveUp = false;
    log.error('pipeline lost: keeping the sequences, waiting for every stage to answer again', { reason });
    for (let attempt = 1; !this.closed; attempt++) {
      const missing = await pipeline.missing(1000);
      if (missing.length === 0) {
        try {
          await this.opts.verify();
          pipeline.epoch++;
          await pipeline.resetAll();
          if (!pipeline.isOpen) this.opts.reopen();
          engine.resume();
          this.opts.setServing(true);
          this.failedProbes = 0;
          log.info('pipeline back', { attempt, downMs: Math.round(performance.now() - since), epoch: pipeline.epoch });
          return;
        } catch (err) {
          reason = `the pipeline answers but could not be reset: ${(err as Error).message}`;
        }
      } else {
        reason = this.describeMissing(missing);
        engine.suspend(`the pipeline is recovering: ${reason}`);
      }
      const downMs = performance.now() - since;
      if (!gaveUp && downMs >= this.opts.stageTimeoutMs) {
        gaveUp = true;
        log.error('stage not back within --stage-timeout: failing the requests it held', {
          reason,
          stageTimeoutMs: this.opts.stageTimeoutMs,
        });
        engine.failEveryone(
          new UnavailableError(`${reason}; not back within --stage-timeout-ms ${this.opts.stageTimeoutMs}`),
        );
      }
      if (attempt % 20 === 1) log.warn('pipeline still down', { attempt, downMs: Math.round(downMs), reason });
      await new Promise((r) => setTimeout(r, poll));
    }
  }
}
