// lib/telemetry's pure parts and metric families, against stated values: the HDR histogram against exact
// nearest-rank percentiles of the same data, emu3 load's summary of given stream timings, the idle window, the
// metrics a Generate / a micro-batch / a vq call leave behind (and promtool's verdict on them), the text log format.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createLogger, formatText } from '../../lib/rpc/log.js';
import { CoordinatorTelemetry, finishLabel, statusName } from '../../lib/telemetry/coordinator.js';
import { HDR_RELATIVE_PRECISION, HdrHistogram } from '../../lib/telemetry/hdr-histogram.js';
import { IdleWindow } from '../../lib/telemetry/idle-window.js';
import { LoadStats } from '../../lib/telemetry/load-stats.js';
import { startMetricsServer } from '../../lib/telemetry/metrics-server.js';
import { ShardTelemetry } from '../../lib/telemetry/shard.js';
import { VqTelemetry } from '../../lib/telemetry/vq.js';
import { parseSamples, promtoolCheck, sample } from '../prom-text.js';

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test('HDR histogram percentiles are the exact nearest-rank percentiles within 1/1024, over six decades', () => {
  const rand = lcg(7);
  const values: number[] = [];
  const h = new HdrHistogram();
  for (let i = 0; i < 20_000; i++) {
    const v = Math.round(10 ** (rand() * 6)); // 1 µs … 1 s
    values.push(v);
    h.record(v);
  }
  values.sort((a, b) => a - b);
  for (const p of [0, 1, 10, 50, 90, 99, 99.9, 100]) {
    const exact = values[Math.max(0, Math.ceil((p / 100) * values.length) - 1)];
    const got = h.percentile(p);
    assert.ok(got >= exact && got <= exact * (1 + HDR_RELATIVE_PRECISION) + 1, `p${p}: ${got} vs exact ${exact}`);
  }
  assert.equal(h.count, 20_000);
  assert.equal(h.max, values.at(-1));
  assert.equal(h.min, values[0]);
  assert.ok(Math.abs(h.mean - values.reduce((a, b) => a + b, 0) / values.length) < 1e-6);
  // Below 2048 every integer has its own bucket: exact.
  const small = new HdrHistogram();
  for (const v of [5, 1, 3, 2, 4]) small.record(v);
  assert.deepEqual(
    [small.percentile(20), small.percentile(50), small.percentile(80), small.percentile(100)],
    [1, 3, 4, 5],
  );
  assert.throws(() => small.record(-1), RangeError);
});

test('emu3 load summary: tokens, TTFT, inter-token (a k-token delta is k equal gaps) and end-to-end from given timings', () => {
  const s = new LoadStats();
  s.add({
    startedAt: 0,
    deltas: [
      { at: 10, tokens: 1 },
      { at: 12, tokens: 1 },
      { at: 18, tokens: 2 },
    ],
    endedAt: 20,
    status: 'OK',
    completionTokens: 4,
  });
  s.add({ startedAt: 100, deltas: [{ at: 105, tokens: 1 }], endedAt: 106, status: 'OK', completionTokens: 1 });
  s.add({ startedAt: 0, deltas: [{ at: 1, tokens: 1 }], endedAt: 2, status: 'UNAVAILABLE' });
  const r = s.summary(2000);
  assert.equal(r.requests, 3);
  assert.equal(r.ok, 2);
  assert.deepEqual(r.failed, { UNAVAILABLE: 1 });
  assert.equal(r.tokens, 6, 'every streamed token id counts, failed streams too');
  assert.equal(r.reportedTokens, 5);
  assert.equal(r.tokensPerSecond, 3);
  // Values above 2.048 ms are known within 1/1024 (HDR): compare with that tolerance.
  const near = (got: number, want: number) => assert.ok(Math.abs(got - want) <= want / 1024, `${got} vs ${want}`);
  assert.equal(r.ttft.count, 2);
  near(r.ttft.p50, 5);
  near(r.ttft.max, 10);
  // Gaps: 2 ms, then 6 ms over 2 tokens = 3 ms twice.
  assert.equal(r.itl.count, 3);
  near(r.itl.p50, 3);
  near(r.itl.max, 3);
  assert.equal(r.itl.mean, (2 + 3 + 3) / 3, 'the mean is exact');
  assert.equal(r.e2e.count, 2);
  near(r.e2e.p50, 6);
  near(r.e2e.max, 20);
});

test('idle window: 1 − Δbusy / Δwall over the trailing window', () => {
  const w = new IdleWindow(10_000);
  assert.equal(w.idleRatio(), 1);
  w.sample(0, 0);
  w.sample(5000, 1000);
  assert.equal(w.idleRatio(), 0.8);
  w.sample(20_000, 1000 + 7500);
  w.sample(25_000, 8500 + 5000);
  // Window [15 s, 25 s]: the ratio starts from the last sample at or before 15 s (5 s): 12.5 s busy in 20 s.
  assert.equal(w.idleRatio(), 0.375);
  w.sample(30_000, 13_500);
  assert.equal(w.idleRatio(), 0.5, '5 s busy out of the 10 s from 20 s to 30 s');
});

test('a Generate observed from start to end leaves exactly its counts in the coordinator metrics; promtool accepts them', async () => {
  const t = new CoordinatorTelemetry();
  const obs = t.observeGenerate(undefined, 'm');
  obs.validated('r1', { temperature: 0, topK: 0, topP: 1, maxNewTokens: 3, seed: null });
  obs.promptBuilt(10, performance.now(), 4);
  obs.event({ type: 'admitted', queueMs: 2 });
  for (let i = 0; i < 3; i++) obs.event({ type: 'delta', tokenIds: [i] });
  const first = performance.now() - 1;
  obs.event({
    type: 'final',
    finishReason: 'FINISH_REASON_LENGTH',
    usage: { promptTokens: 10, cachedTokens: 4, completionTokens: 3 },
    firstTokenAt: first,
  });
  obs.finish();
  obs.finish(new Error('twice'));
  const refused = t.observeGenerate();
  refused.finish(Object.assign(new Error('queue full'), { code: 8 }));
  t.observeGenerate().finish(new Error('client gone'), true);
  t.prefixLookup(4);
  t.prefixLookup(0);
  t.prefixEvicted(2);
  assert.equal(t.batchStarted(1, [undefined], 2, 17), '', 'no traced request: no step span');
  t.watchEngine(
    () => ({
      queued: 1,
      running: 2,
      inFlightBatches: 1,
      kvSlotsInUse: 3,
      kvTokensReserved: 40,
      cacheEntries: 1,
      cacheTokens: 9,
      stageComputeMs: [1500, 250],
      microBatches: 7,
      refusals: 1,
      recoveries: 0,
    }),
    { slots: 8, tokens: 1024 },
  );
  const text = await t.registry.metrics();
  const verdict = promtoolCheck(text);
  assert.equal(verdict.status, 0, verdict.output);
  const s = parseSamples(text);
  assert.equal(sample(s, 'emu3_requests_total{finish_reason="length",status="OK"}'), 1);
  assert.equal(sample(s, 'emu3_requests_total{finish_reason="none",status="RESOURCE_EXHAUSTED"}'), 1);
  assert.equal(sample(s, 'emu3_requests_total{finish_reason="none",status="CANCELLED"}'), 1);
  assert.equal(sample(s, 'emu3_generated_tokens_total'), 3);
  assert.equal(sample(s, 'emu3_prompt_tokens_total'), 10);
  assert.equal(sample(s, 'emu3_prompt_cached_tokens_total'), 4);
  assert.equal(sample(s, 'emu3_inter_token_latency_seconds_count'), 2);
  assert.equal(sample(s, 'emu3_time_to_first_token_seconds_count'), 1);
  assert.equal(sample(s, 'emu3_request_duration_seconds_count'), 3);
  assert.equal(sample(s, 'emu3_request_queue_seconds_sum'), 0.002);
  assert.equal(sample(s, 'emu3_request_queue_seconds_bucket{le="0.0025"}'), 1);
  assert.equal(sample(s, 'emu3_request_queue_seconds_bucket{le="0.001"}'), 0);
  assert.equal(sample(s, 'emu3_prefix_cache_hits_total'), 1);
  assert.equal(sample(s, 'emu3_prefix_cache_hit_tokens_total'), 4);
  assert.equal(sample(s, 'emu3_prefix_cache_misses_total'), 1);
  assert.equal(sample(s, 'emu3_prefix_cache_evictions_total'), 2);
  assert.equal(sample(s, 'emu3_micro_batch_tokens_sum'), 17);
  assert.equal(sample(s, 'emu3_requests_waiting'), 1);
  assert.equal(sample(s, 'emu3_requests_running'), 2);
  assert.equal(sample(s, 'emu3_kv_tokens_in_use'), 40);
  assert.equal(sample(s, 'emu3_kv_slots_capacity'), 8);
  assert.equal(sample(s, 'emu3_micro_batches_total'), 7);
  assert.equal(sample(s, 'emu3_stage_compute_seconds_total{stage="0"}'), 1.5);
  assert.equal(sample(s, 'emu3_stage_compute_seconds_total{stage="1"}'), 0.25);
  assert.equal(sample(s, 'emu3_stage_refusals_total'), 1);
  // Scraped again, totals taken from stats() stay totals (not added up per scrape).
  assert.equal(sample(parseSamples(await t.registry.metrics()), 'emu3_micro_batches_total'), 7);
  assert.equal(statusName({ code: 14 }), 'UNAVAILABLE');
  assert.equal(statusName(new Error('x')), 'INTERNAL');
  assert.equal(finishLabel('FINISH_REASON_EOS'), 'eos');
});

test('shard and vq metrics: a micro-batch and vq calls (one refused by a full queue) counted by outcome; served over HTTP', async () => {
  const shard = new ShardTelemetry();
  shard.watchStage([0, 2], () => ({ slotsInUse: 1, tokensInUse: 30 }), { slots: 4, capacityTokens: 4096 });
  shard.watchTransfers(() => ({ hostToDevice: 388, deviceToHost: 256 }));
  const batch = { micro_batch_id: 1, items: [{ token_count: 5 }, { token_count: 1 }], traceparent: '' };
  await shard.forward(batch, 1.5, async () => ({ error: null }));
  await shard.forward(batch, 0, async () => ({ error: { message: 'refused' } }));
  await assert.rejects(
    shard.forward(batch, 0, async () => Promise.reject(new Error('boom'))),
    /boom/,
  );
  const vq = new VqTelemetry();
  let full = false;
  const pool = {
    queued: 0,
    busy: 0,
    size: 1,
    queueLimit: 16,
    run<T>(task: (w: string) => Promise<T>): Promise<T> {
      if (full) return Promise.reject(Object.assign(new Error('busy'), { code: 8 }));
      return task('codec');
    },
  };
  vq.watchPool(pool);
  assert.equal(await vq.run('encode', undefined, pool, async (w) => `${w}!`), 'codec!');
  full = true;
  await assert.rejects(
    vq.run('encode', undefined, pool, async () => 1),
    /busy/,
  );
  const server = await startMetricsServer('127.0.0.1:0', shard.registry);
  try {
    const res = await fetch(server.url);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
    const text = await res.text();
    assert.equal(promtoolCheck(text).status, 0, promtoolCheck(text).output);
    const s = parseSamples(text);
    assert.equal(sample(s, 'emu3_stage_micro_batches_total{outcome="ok"}'), 1);
    assert.equal(sample(s, 'emu3_stage_micro_batches_total{outcome="error"}'), 2);
    assert.equal(sample(s, 'emu3_stage_micro_batch_tokens_sum'), 18);
    assert.equal(sample(s, 'emu3_stage_queue_seconds_sum'), 0.0015);
    assert.equal(sample(s, 'emu3_stage_kv_tokens_in_use'), 30);
    assert.equal(sample(s, 'emu3_stage_kv_slots_capacity'), 4);
    assert.equal(sample(s, 'emu3_stage_host_device_bytes_total{direction="host_to_device"}'), 388);
    assert.equal(sample(s, 'emu3_stage_host_device_bytes_total{direction="device_to_host"}'), 256);
    assert.equal((await fetch(server.url.replace('/metrics', '/other'))).status, 404);
  } finally {
    await server.close();
  }
  const v = parseSamples(await vq.registry.metrics());
  assert.equal(sample(v, 'emu3_vq_requests_total{method="encode",status="OK"}'), 1);
  assert.equal(sample(v, 'emu3_vq_requests_total{method="encode",status="RESOURCE_EXHAUSTED"}'), 1);
  assert.equal(sample(v, 'emu3_vq_refusals_total{method="encode"}'), 1);
  assert.equal(sample(v, 'emu3_vq_run_seconds_count{method="encode"}'), 1);
  assert.equal(sample(v, 'emu3_vq_queue_capacity'), 16);
  assert.equal(promtoolCheck(await vq.registry.metrics()).status, 0);
});

test('log lines: json by default, text on request, both with the caller fields (request and trace ids)', () => {
  const lines: string[] = [];
  const json = createLogger('coordinator', { write: (l) => lines.push(l), format: 'json' });
  json.info('generated', { requestId: 'req-1', traceId: 'abc' });
  const rec = JSON.parse(lines[0]);
  assert.deepEqual(
    [rec.level, rec.service, rec.msg, rec.requestId, rec.traceId],
    ['info', 'coordinator', 'generated', 'req-1', 'abc'],
  );
  const text = createLogger('vq', { write: (l) => lines.push(l), format: 'text' }).child({ component: 'pool' });
  text.warn('queue full', { requestId: 'r 2', n: 3, detail: { a: 1 } });
  assert.match(
    lines[1],
    /^\d{4}-\d\d-\d\dT[\d:.]+Z WARN {2}vq queue full component=pool requestId="r 2" n=3 detail=\{"a":1\}\n$/,
  );
  assert.equal(formatText({ ts: 't', level: 'error', service: 's', msg: 'm' }), 't ERROR s m');
});

test("the coordinator's per-stage idle ratio counts from when the engine was watched, before the first micro-batch", async () => {
  const t = new CoordinatorTelemetry();
  let stageMs: number[] = [];
  const stats = () => ({
    queued: 0,
    running: 0,
    inFlightBatches: 0,
    kvSlotsInUse: 0,
    kvTokensReserved: 0,
    cacheEntries: 0,
    cacheTokens: 0,
    stageComputeMs: stageMs,
    microBatches: 0,
    refusals: 0,
    recoveries: 0,
  });
  t.watchEngine(stats, { slots: 1, tokens: 1 });
  const watched = performance.now();
  await new Promise((r) => setTimeout(r, 300));
  stageMs = [150, 0];
  const s = parseSamples(await t.registry.metrics());
  const wall = performance.now() - watched;
  const idle0 = sample(s, 'emu3_stage_idle_ratio{stage="0"}');
  // 150 ms busy in `wall` ms (a little more than measured here, as the window began just before `watched`).
  assert.ok(Math.abs(idle0 - (1 - 150 / wall)) < 0.05, `idle ${idle0} vs ${1 - 150 / wall}`);
  assert.equal(sample(s, 'emu3_stage_idle_ratio{stage="1"}'), 1);
});
