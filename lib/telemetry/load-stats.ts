// What `emu3 load` measures, as pure code: each finished stream's timings go in, a summary (counts, tokens/s,
// TTFT / inter-token / end-to-end percentiles from HDR histograms in microseconds) and a table come out.
import { HdrHistogram } from './hdr-histogram.js';

/** One Generate stream as the client saw it (times in performance.now() ms). */
export interface StreamTimings {
  startedAt: number;
  /** Each token-bearing delta: when it arrived and how many token ids it carried. */
  deltas: { at: number; tokens: number }[];
  endedAt: number;
  /** 'OK' or the gRPC status name it failed with. */
  status: string;
  /** Final.usage.completion_tokens (undefined when no Final arrived). */
  completionTokens?: number;
}

export interface Percentiles {
  count: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface LoadSummary {
  requests: number;
  ok: number;
  failed: Record<string, number>;
  /** Token ids streamed in deltas, summed over all streams. */
  tokens: number;
  /** Final.usage.completion_tokens summed over the streams that finished. */
  reportedTokens: number;
  wallSeconds: number;
  tokensPerSecond: number;
  requestsPerSecond: number;
  /** Milliseconds. */
  ttft: Percentiles;
  itl: Percentiles;
  e2e: Percentiles;
}

const us = (ms: number) => Math.max(0, ms * 1000);

function percentiles(h: HdrHistogram): Percentiles {
  const ms = (v: number) => v / 1000;
  return {
    count: h.count,
    mean: ms(h.mean),
    p50: ms(h.percentile(50)),
    p90: ms(h.percentile(90)),
    p99: ms(h.percentile(99)),
    max: ms(h.max),
  };
}

export class LoadStats {
  private readonly ttft = new HdrHistogram();
  private readonly itl = new HdrHistogram();
  private readonly e2e = new HdrHistogram();
  private requests = 0;
  private ok = 0;
  private readonly failed: Record<string, number> = {};
  private tokens = 0;
  private reported = 0;

  add(s: StreamTimings): void {
    this.requests++;
    for (const d of s.deltas) this.tokens += d.tokens;
    if (s.status !== 'OK') {
      this.failed[s.status] = (this.failed[s.status] ?? 0) + 1;
      return;
    }
    this.ok++;
    this.reported += s.completionTokens ?? 0;
    this.e2e.record(us(s.endedAt - s.startedAt));
    const first = s.deltas[0];
    if (first) this.ttft.record(us(first.at - s.startedAt));
    for (let i = 1; i < s.deltas.length; i++) {
      const d = s.deltas[i];
      // A delta carrying k tokens stands for k gaps of an equal share.
      const gap = (d.at - s.deltas[i - 1].at) / Math.max(1, d.tokens);
      this.itl.record(us(gap), Math.max(1, d.tokens));
    }
  }

  summary(wallMs: number): LoadSummary {
    const wallSeconds = wallMs / 1000;
    return {
      requests: this.requests,
      ok: this.ok,
      failed: { ...this.failed },
      tokens: this.tokens,
      reportedTokens: this.reported,
      wallSeconds,
      tokensPerSecond: wallSeconds > 0 ? this.tokens / wallSeconds : 0,
      requestsPerSecond: wallSeconds > 0 ? this.requests / wallSeconds : 0,
      ttft: percentiles(this.ttft),
      itl: percentiles(this.itl),
      e2e: percentiles(this.e2e),
    };
  }
}

export function formatSummary(s: LoadSummary): string {
  const f = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
  const row = (name: string, p: Percentiles) =>
    `| ${name} | ${p.count} | ${f(p.mean)} | ${f(p.p50)} | ${f(p.p90)} | ${f(p.p99)} | ${f(p.max)} |`;
  const failed = Object.entries(s.failed)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');
  return [
    `requests ${s.requests} (ok ${s.ok}${failed ? `; failed: ${failed}` : ''}) in ${s.wallSeconds.toFixed(2)} s: ` +
      `${f(s.requestsPerSecond)} requests/s, ${s.tokens} tokens streamed, ${f(s.tokensPerSecond)} tokens/s`,
    '',
    '| latency (ms) | samples | mean | p50 | p90 | p99 | max |',
    '|---|---|---|---|---|---|---|',
    row('time to first token', s.ttft),
    row('inter-token', s.itl),
    row('end-to-end', s.e2e),
  ].join('\n');
}
