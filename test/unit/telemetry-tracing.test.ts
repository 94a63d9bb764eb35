// lib/telemetry tracing against real OTLP receivers in this process (test/otlp/receiver.ts): each of the three
// protocols the OTEL_EXPORTER_OTLP_PROTOCOL variable names delivers the spans with their parents, links, times,
// status and the resource's service.name; the sampler variable is obeyed; with no endpoint tracing is off.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import { formatTraceparent, parseTraceparent } from '../../lib/telemetry/traceparent.js';
import {
  createTracing,
  DISABLED_TRACING,
  initTracing,
  NOOP_SPAN,
  PROTOCOLS,
  tracingConfigFromEnv,
} from '../../lib/telemetry/tracing.js';
import { type ReceivedSpan, type Receiver, startGrpcReceiver, startHttpReceiver } from '../otlp/receiver.js';

const OTEL_VARS = [
  'OTEL_EXPORTER_OTLP_ENDPOINT',
  'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT',
  'OTEL_EXPORTER_OTLP_PROTOCOL',
  'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL',
  'OTEL_SERVICE_NAME',
  'OTEL_TRACES_SAMPLER',
  'OTEL_BSP_SCHEDULE_DELAY',
];

/** Runs `fn` with exactly `env` for the OTEL_* variables above (the SDK reads process.env when objects are made). */
async function withEnv<T>(env: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const saved = OTEL_VARS.map((k) => [k, process.env[k]] as const);
  for (const k of OTEL_VARS) delete process.env[k];
  Object.assign(process.env, env);
  try {
    return await fn();
  } finally {
    for (const [k, v] of saved) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

test('traceparent: parsed and formatted per W3C Trace Context; malformed, all-zero and version ff headers are ignored', () => {
  const h = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  assert.deepEqual(parseTraceparent(h), {
    traceId: '4bf92f3577b34da6a3ce929d0e0e4736',
    spanId: '00f067aa0ba902b7',
    sampled: true,
  });
  assert.equal(formatTraceparent(parseTraceparent(h)!), h);
  assert.equal(parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00')?.sampled, false);
  for (const bad of [
    '',
    'garbage',
    '00-00000000000000000000000000000000-00f067aa0ba902b7-01',
    '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01',
    'ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra',
    '00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01',
  ])
    assert.equal(parseTraceparent(bad), null, bad);
});

test('tracing is off unless an OTLP endpoint is set; OTEL_SDK_DISABLED and OTEL_TRACES_EXPORTER=none turn it off; a bad protocol is an error naming the variable', async () => {
  assert.equal(tracingConfigFromEnv({}, 'emu3-x'), null);
  assert.deepEqual(tracingConfigFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://h:4318' }, 'emu3-x'), {
    protocol: 'http/protobuf',
    serviceName: 'emu3-x',
  });
  assert.equal(
    tracingConfigFromEnv(
      {
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://h:4318/v1/traces',
        OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json',
      },
      'a',
    )?.protocol,
    'http/json',
  );
  assert.equal(tracingConfigFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: 'x', OTEL_SDK_DISABLED: 'true' }, 'a'), null);
  assert.equal(tracingConfigFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: 'x', OTEL_TRACES_EXPORTER: 'none' }, 'a'), null);
  assert.throws(
    () => tracingConfigFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: 'x', OTEL_EXPORTER_OTLP_PROTOCOL: 'http' }, 'a'),
    /OTEL_EXPORTER_OTLP_PROTOCOL="http" is not an OTLP protocol/,
  );
  const off = await initTracing('x', {});
  assert.equal(off, DISABLED_TRACING);
  const span = off.start('anything', { parent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' });
  assert.equal(span, NOOP_SPAN, 'one shared no-op span when off');
  assert.equal(span.traceparent, '');
});

async function receiverFor(protocol: string): Promise<{ rx: Receiver; endpoint: string }> {
  const rx = protocol === 'grpc' ? await startGrpcReceiver() : await startHttpReceiver();
  return { rx, endpoint: protocol === 'grpc' ? `http://${rx.endpoint}` : rx.endpoint };
}

for (const protocol of PROTOCOLS) {
  test(
    `${protocol}: spans reach a real receiver with parents (local and remote), links, explicit times, status and service.name`,
    {
      timeout: 60_000,
    },
    async () => {
      const { rx, endpoint } = await receiverFor(protocol);
      try {
        await withEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: protocol }, async () => {
          const config = tracingConfigFromEnv(process.env, 'emu3-test');
          assert.ok(config);
          const t = await createTracing(config);
          const root = t.start('root', { kind: 'server', attributes: { 'gen_ai.request.model': 'm', n: 3 } });
          assert.ok(root.recording);
          assert.match(root.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
          const remote = t.start('remote-child', { parent: root.traceparent, kind: 'client' });
          const linked = t.start('linked', { links: [root, remote.traceparent] });
          const now = performance.now();
          t.start('timed', { parent: root, startTime: now - 50 }).end(now - 10);
          const failed = t.start('failed', { parent: root });
          failed.fail(Object.assign(new Error('queue full'), { code: 8 }));
          for (const s of [failed, linked, remote, root]) s.end();
          await t.shutdown();
          await rx.waitFor((spans) => spans.length >= 5, 10_000);
        });
        const by = (name: string) => rx.spans.find((s) => s.name === name) as ReceivedSpan;
        const root = by('root');
        const rootIds = parseTraceparent(`00-${root.traceId}-${root.spanId}-01`)!;
        assert.ok(rootIds);
        assert.equal(root.service, 'emu3-test');
        assert.equal(root.parentSpanId, '');
        assert.equal(root.kind, 2, 'SPAN_KIND_SERVER');
        assert.equal(root.attributes['gen_ai.request.model'], 'm');
        assert.equal(root.attributes.n, 3);
        assert.equal(by('remote-child').traceId, root.traceId);
        assert.equal(by('remote-child').parentSpanId, root.spanId);
        assert.equal(by('remote-child').kind, 3, 'SPAN_KIND_CLIENT');
        assert.notEqual(by('linked').traceId, root.traceId, 'a span with links only starts its own trace');
        assert.deepEqual(by('linked').links, [
          { traceId: root.traceId, spanId: root.spanId },
          { traceId: root.traceId, spanId: by('remote-child').spanId },
        ]);
        const timed = by('timed');
        assert.equal(timed.parentSpanId, root.spanId);
        const ms = Number(timed.endNs - timed.startNs) / 1e6;
        assert.ok(Math.abs(ms - 40) < 1, `explicit start/end times kept (${ms} ms)`);
        assert.equal(by('failed').statusCode, 2, 'STATUS_CODE_ERROR');
        assert.equal(by('failed').attributes['rpc.grpc.status_code'], 8);
        const expected =
          protocol === 'grpc' ? 'grpc' : protocol === 'http/json' ? 'application/json' : 'application/x-protobuf';
        assert.ok(rx.requests.length > 0 && rx.requests.every((r) => r.startsWith(expected)), rx.requests.join());
      } finally {
        await rx.close();
      }
    },
  );
}

test(
  'OTEL_TRACES_SAMPLER=always_off: nothing records and nothing is exported; OTEL_SERVICE_NAME names the service',
  {
    timeout: 60_000,
  },
  async () => {
    const rx = await startHttpReceiver();
    try {
      await withEnv(
        {
          OTEL_EXPORTER_OTLP_ENDPOINT: rx.endpoint,
          OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
          OTEL_TRACES_SAMPLER: 'always_off',
        },
        async () => {
          const t = await createTracing(tracingConfigFromEnv(process.env, 'emu3-test')!);
          const span = t.start('dropped');
          assert.equal(span.recording, false);
          assert.equal(span.traceparent, '');
          span.end();
          await t.shutdown();
        },
      );
      await withEnv(
        {
          OTEL_EXPORTER_OTLP_ENDPOINT: rx.endpoint,
          OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
          OTEL_SERVICE_NAME: 'my-name',
        },
        async () => {
          const t = await createTracing(tracingConfigFromEnv(process.env, 'emu3-test')!);
          t.start('kept').end();
          await t.shutdown();
        },
      );
      await rx.waitFor((s) => s.length >= 1, 10_000);
      assert.deepEqual(
        rx.spans.map((s) => [s.name, s.service]),
        [['kept', 'my-name']],
      );
    } finally {
      await rx.close();
    }
  },
);

test(
  'with tracing off the OpenTelemetry SDK and exporters are never loaded (the check loads them once tracing is on)',
  {
    timeout: 60_000,
  },
  () => {
    // A fresh process, so the module cache holds only what these imports pulled in.
    const url = (p: string) => new URL(p, import.meta.url).href;
    const script = `
    import { createRequire } from 'node:module';
    const { initTracing, createTracing } = await import(${JSON.stringify(url('../../lib/telemetry/tracing.js'))});
    for (const m of ['coordinator', 'shard', 'vq', 'service']) await import(${JSON.stringify(url('../../lib/telemetry/'))} + m + '.js');
    const cache = createRequire(import.meta.url).cache;
    const sdk = () => Object.keys(cache).filter((k) => /@opentelemetry[\\/](sdk-trace|exporter-|otlp-)/.test(k)).length;
    await initTracing('x', {});
    const off = sdk();
    await createTracing({ protocol: 'http/json', serviceName: 'x' });
    console.log(JSON.stringify({ off, on: sdk() }));`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    const { off, on } = JSON.parse(out);
    assert.equal(off, 0, 'no SDK module loaded with tracing off');
    assert.ok(on > 0, `the SDK's modules are seen once loaded (${on})`);
  },
);
