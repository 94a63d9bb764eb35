// Observability of the real system (vq + 2 shards + coordinator as processes, test/integration/pipeline-harness.ts),
// each with --metrics-listen and the OTEL_* variables pointing at an OTLP/HTTP receiver inside this test
// (test/otlp/receiver.ts, http/json): one image Generate gives one trace with spans from the coordinator, the vq and
// both shards; every /metrics passes `promtool check metrics` and its counters move as requests run; `emu3 load`
// counts exactly the tokens streamed; the ghz recipes' requests are accepted.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { binPath } from '../../cli/system.js';
import { type ReceivedSpan, type Receiver, startHttpReceiver } from '../otlp/receiver.js';
import { parseSamples, promtoolCheck, type Samples, sample, scrape } from '../prom-text.js';
import { generate, type Harness, picture, startHarness, unary } from './pipeline-harness.js';

let h: Harness;
let rx: Receiver;
const metricsOf = (name: string) => h.system.children.find((c) => c.name === name)!.metricsUrl!;
const samplesOf = async (name: string): Promise<Samples> => parseSamples(await scrape(metricsOf(name)));

before(async () => {
  rx = await startHttpReceiver();
  h = await startHarness([], [], {
    metrics: true,
    env: {
      OTEL_EXPORTER_OTLP_ENDPOINT: rx.endpoint,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
      OTEL_TRACES_SAMPLER: 'always_on',
      OTEL_BSP_SCHEDULE_DELAY: '100',
    },
  });
});
after(async () => {
  await h?.close();
  await rx?.close();
});

test(
  'one image Generate is one trace: coordinator phases, the vq call, a step span per micro-batch and every shard stage under it',
  {
    timeout: 120_000,
  },
  async () => {
    const traceId = randomBytes(16).toString('hex');
    const callerSpan = randomBytes(8).toString('hex');
    const metadata = new grpc.Metadata();
    metadata.set('traceparent', `00-${traceId}-${callerSpan}-01`);
    const image = await picture(96, 80, 3);
    const before = await samplesOf('coordinator');
    const answer = await new Promise<number>((resolve, reject) => {
      const call = (
        h.client as unknown as {
          Generate(r: object, m: grpc.Metadata): grpc.ClientReadableStream<{ delta?: { tokenIds: number[] } }>;
        }
      ).Generate(
        {
          parts: [{ image: { data: image, mimeType: 'image/png' } }, { text: 'Describe the image.' }],
          sampling: { maxNewTokens: 4, ignoreEos: true },
          returnTokenIds: true,
        },
        metadata,
      );
      let tokens = 0;
      call.on('data', (m) => {
        tokens += m.delta?.tokenIds.length ?? 0;
      });
      call.on('error', reject);
      call.on('end', () => resolve(tokens));
    });
    assert.equal(answer, 4);
    // The prompt's prefill chunks and three decode steps: what the coordinator counted as micro-batches.
    const batches =
      sample(await samplesOf('coordinator'), 'emu3_micro_batches_total') - sample(before, 'emu3_micro_batches_total');
    assert.ok(batches >= 4, `${batches} micro-batches`);
    const inTrace = (spans: ReceivedSpan[]) => spans.filter((s) => s.traceId === traceId);
    await rx.waitFor(
      (spans) =>
        inTrace(spans).some((s) => s.name === 'emu3.v1.Emu3/Generate') &&
        inTrace(spans).filter((s) => s.name === 'emu3.stage.forward').length >= 2 * batches &&
        inTrace(spans).some((s) => s.service === 'emu3-vq'),
      30_000,
    );
    const spans = inTrace(rx.spans);
    const one = (name: string) => {
      const found = spans.filter((s) => s.name === name);
      assert.equal(found.length, 1, `one ${name} span (got ${found.length})`);
      return found[0];
    };
    const gen = one('emu3.v1.Emu3/Generate');
    assert.equal(gen.service, 'emu3-coordinator');
    assert.equal(gen.parentSpanId, callerSpan, "the caller's traceparent is the Generate span's parent");
    assert.equal(gen.attributes['gen_ai.operation.name'], 'chat');
    assert.equal(gen.attributes['gen_ai.usage.output_tokens'], 4);
    assert.deepEqual(gen.attributes['gen_ai.response.finish_reasons'], ['length']);
    for (const phase of ['emu3.validate', 'emu3.prompt', 'emu3.queue', 'emu3.prefill', 'emu3.decode', 'emu3.stream'])
      assert.equal(one(phase).parentSpanId, gen.spanId, `${phase} is a child of Generate`);
    const vqClient = spans.find((s) => s.name === 'emu3.internal.v1.VqService/Encode' && s.kind === 3)!;
    assert.ok(vqClient, "the coordinator's client span of the vq call");
    const vqSpans = spans.filter((s) => s.service === 'emu3-vq');
    const vqServer = vqSpans.find((s) => s.kind === 2)!;
    assert.equal(vqClient.service, 'emu3-coordinator');
    assert.equal(vqClient.parentSpanId, gen.spanId);
    assert.ok(vqServer, 'the vq server span');
    assert.equal(vqServer.parentSpanId, vqClient.spanId, 'context crossed in gRPC metadata');
    assert.deepEqual(
      vqSpans
        .filter((s) => s.parentSpanId === vqServer.spanId)
        .map((s) => s.name)
        .sort(),
      ['vq.encode', 'vq.queue'],
    );
    const steps = spans.filter((s) => s.name === 'emu3.step');
    assert.equal(steps.length, batches, 'a step span per micro-batch');
    for (const step of steps) {
      assert.equal(step.parentSpanId, gen.spanId);
      assert.ok(
        step.links.some((l) => l.spanId === gen.spanId && l.traceId === traceId),
        'linked to its request',
      );
    }
    const stages = spans.filter((s) => s.name === 'emu3.stage.forward');
    assert.ok(stages.every((s) => s.service === 'emu3-shard'));
    const layers = [...new Set(stages.map((s) => s.attributes['emu3.stage.layers']))].sort();
    assert.equal(layers.length, 2, `both shards (${layers.join(', ')})`);
    for (const step of steps)
      assert.deepEqual(
        stages
          .filter((s) => s.parentSpanId === step.spanId)
          .map((s) => s.attributes['emu3.stage.layers'])
          .sort(),
        layers,
        'every stage ran every step',
      );
  },
);

test(
  'every /metrics passes promtool check metrics; the counters move by exactly what a request did',
  {
    timeout: 120_000,
  },
  async () => {
    for (const c of h.system.children) {
      const text = await scrape(c.metricsUrl!);
      const verdict = promtoolCheck(text);
      assert.equal(verdict.status, 0, `${c.name}: promtool check metrics:\n${verdict.output}`);
      assert.ok(text.includes('# TYPE '), c.name);
    }
    const before = await samplesOf('coordinator');
    const shardsBefore = await Promise.all([samplesOf('shard-0'), samplesOf('shard-1')]);
    const vqBefore = await samplesOf('vq');
    const a = await generate(h.client, {
      parts: [{ image: { data: await picture(112, 96, 9) } }, { text: 'And this one?' }],
      sampling: { maxNewTokens: 5, ignoreEos: true },
    }).done;
    await assert.rejects(generate(h.client, { parts: [] }).done, { code: grpc.status.INVALID_ARGUMENT });
    const after = await samplesOf('coordinator');
    const d = (key: string) => sample(after, key) - sample(before, key);
    assert.equal(d('emu3_requests_total{finish_reason="length",status="OK"}'), 1);
    assert.equal(d('emu3_requests_total{finish_reason="none",status="INVALID_ARGUMENT"}'), 1);
    assert.equal(d('emu3_generated_tokens_total'), 5);
    assert.equal(d('emu3_prompt_tokens_total'), a.final.usage.promptTokens);
    assert.equal(d('emu3_prompt_cached_tokens_total'), a.final.usage.cachedTokens);
    assert.equal(d('emu3_time_to_first_token_seconds_count'), 1);
    assert.equal(d('emu3_inter_token_latency_seconds_count'), 4);
    assert.equal(d('emu3_request_duration_seconds_count'), 2, 'the refused request counts too');
    assert.equal(d('emu3_request_queue_seconds_count'), 1);
    assert.equal(d('emu3_request_vq_seconds_count'), 1);
    assert.equal(d('emu3_prefix_cache_hits_total') + d('emu3_prefix_cache_misses_total'), 1);
    const batches = d('emu3_micro_batches_total');
    assert.ok(batches >= 5, `${batches} micro-batches for a prefill and 4 decodes`);
    assert.equal(d('emu3_micro_batch_sequences_count'), batches);
    assert.equal(sample(after, 'emu3_requests_running'), 0);
    assert.ok(sample(after, 'emu3_kv_slots_capacity') > 0);
    assert.ok(sample(after, 'emu3_kv_tokens_capacity') > 0);
    assert.ok(d('emu3_stage_compute_seconds_total{stage="0"}') > 0);
    assert.ok(d('emu3_stage_compute_seconds_total{stage="1"}') > 0);
    for (const stage of ['0', '1']) {
      const idle = sample(after, `emu3_stage_idle_ratio{stage="${stage}"}`);
      assert.ok(idle >= 0 && idle < 1, `stage ${stage} computed within the last 10 s: idle ratio ${idle}`);
    }
    const shardsAfter = await Promise.all([samplesOf('shard-0'), samplesOf('shard-1')]);
    shardsAfter.forEach((s, i) => {
      const ran =
        sample(s, 'emu3_stage_micro_batches_total{outcome="ok"}') -
        sample(shardsBefore[i], 'emu3_stage_micro_batches_total{outcome="ok"}');
      assert.equal(ran, batches, `shard-${i} ran every micro-batch`);
      assert.ok(sample(s, 'emu3_stage_kv_slots_capacity') > 0);
      const idle = sample(s, 'emu3_stage_idle_ratio');
      assert.ok(idle >= 0 && idle < 1, `shard-${i} idle ratio ${idle}`);
      assert.ok(sample(s, 'emu3_stage_busy_seconds_total') > 0);
    });
    const vqAfter = await samplesOf('vq');
    const encodes = (s: Samples) => sample(s, 'emu3_vq_requests_total{method="encode",status="OK"}');
    assert.equal(encodes(vqAfter) - encodes(vqBefore), 1);
    assert.equal(
      sample(vqAfter, 'emu3_vq_run_seconds_count{method="encode"}') -
        sample(vqBefore, 'emu3_vq_run_seconds_count{method="encode"}'),
      1,
    );
    assert.equal(sample(vqAfter, 'emu3_vq_workers'), 1);
  },
);

test(
  'emu3 load counts exactly the tokens streamed (and the coordinator agrees), at a fixed concurrency and at a fixed rate',
  {
    timeout: 180_000,
  },
  async () => {
    const run = async (args: string[]) => {
      const { stdout } = await promisify(execFile)(
        process.execPath,
        [
          binPath(),
          'load',
          '--addr',
          h.system.address,
          '--format',
          'json',
          '--max-new-tokens',
          '5',
          '--ignore-eos',
          '--unique',
          ...args,
        ],
        { timeout: 120_000 },
      );
      return JSON.parse(stdout);
    };
    const before = await samplesOf('coordinator');
    const closed = await run(['--concurrency', '3', '--requests', '6']);
    assert.equal(closed.concurrency, 3);
    assert.equal(closed.requests, 6);
    assert.equal(closed.ok, 6);
    assert.equal(closed.tokens, 30);
    assert.equal(closed.reportedTokens, 30);
    assert.equal(closed.ttft.count, 6);
    assert.equal(closed.itl.count, 24);
    assert.equal(closed.e2e.count, 6);
    assert.ok(closed.ttft.p50 > 0 && closed.ttft.p50 <= closed.ttft.p99 && closed.ttft.p99 <= closed.ttft.max);
    assert.ok(closed.tokensPerSecond > 0);
    const open = await run(['--rate', '20', '--requests', '4']);
    assert.equal(open.rate, 20);
    assert.equal(open.ok, 4);
    assert.equal(open.tokens, 20);
    const after = await samplesOf('coordinator');
    assert.equal(
      sample(after, 'emu3_generated_tokens_total') - sample(before, 'emu3_generated_tokens_total'),
      closed.tokens + open.tokens,
    );
  },
);

test(
  'the ghz recipes in bench/ghz name real methods and their data is accepted by the running system',
  {
    timeout: 120_000,
  },
  async () => {
    const dir = join(dirname(binPath()), '..', 'bench', 'ghz');
    const recipes = readdirSync(dir).filter((f) => f.endsWith('.json'));
    assert.ok(recipes.length >= 4, recipes.join());
    for (const file of recipes) {
      const r = JSON.parse(readFileSync(join(dir, file), 'utf8'));
      assert.equal(r.insecure, true, file);
      assert.match(r.host, /^127\.0\.0\.1:\d+$/, file);
      const [service, method] = String(r.call).split('/');
      assert.equal(service, 'emu3.v1.Emu3', file);
      // ghz fills {{.RequestNumber}} in; bytes are base64 in proto JSON, which proto-loader's objects take too.
      const data = JSON.parse(JSON.stringify(r.data).replaceAll('{{.RequestNumber}}', '7'));
      if (method === 'Generate') {
        const a = await generate(h.client, { ...data, returnTokenIds: true }).done;
        assert.equal(a.final.finishReason, 'FINISH_REASON_LENGTH', file);
        assert.equal(a.ids.length, data.sampling.maxNewTokens, file);
      } else {
        const res = await unary<object>(h.client, method, data);
        assert.ok(res, file);
      }
    }
  },
);
