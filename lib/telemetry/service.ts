// What every service's CLI entry does for observability: the --metrics-listen and --log-format flags, tracing from
// the OTEL_* variables, and the /metrics server (a node:http server of its own) when --metrics-listen is given.
import type { Registry } from 'prom-client';
import { createLogger, LOG_FORMATS, type LogFormat, type Logger } from '../rpc/log.js';
import { type MetricsServer, startMetricsServer } from './metrics-server.js';
import { initTracing } from './tracing.js';

/** Flag specs for cli/args.ts CommandSpec.flags (structurally its FlagSpec). */
export const TELEMETRY_FLAGS = {
  'metrics-listen': {
    help: 'serve Prometheus metrics on http://HOST:PORT/metrics (port 0 picks a free one; default: no metrics server)',
  },
  'log-format': { help: 'log lines as json (one object per line) or text (default: $EMU3_LOG_FORMAT, else json)' },
} as const;

export interface ServiceTelemetry {
  log: Logger;
  /** The /metrics URL, when serving one. */
  metricsUrl?: string;
  /** Flushes spans and closes the metrics server. */
  shutdown(): Promise<void>;
}

/**
 * Logger, tracing and metrics for `service` ('coordinator', 'shard', 'vq'): `registry` is what /metrics serves.
 * Throws with a message naming the flag or variable for a bad --log-format, --metrics-listen or OTEL_* value.
 */
export async function startServiceTelemetry(
  service: string,
  opts: { metricsListen?: string; logFormat?: string; registry: () => Registry },
): Promise<ServiceTelemetry> {
  const format = opts.logFormat;
  if (format !== undefined && !LOG_FORMATS.includes(format as LogFormat))
    throw new Error(`--log-format must be one of ${LOG_FORMATS.join('|')}, got "${format}"`);
  const log = createLogger(service, { format: format as LogFormat | undefined });
  const tracing = await initTracing(service);
  if (tracing.enabled)
    log.info('tracing on', {
      endpoint: process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? process.env.OTEL_EXPORTER_OTLP_ENDPOINT,
      protocol:
        process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? process.env.OTEL_EXPORTER_OTLP_PROTOCOL ?? 'http/protobuf',
      sampler: process.env.OTEL_TRACES_SAMPLER ?? 'parentbased_always_on',
    });
  let metrics: MetricsServer | undefined;
  if (opts.metricsListen) {
    metrics = await startMetricsServer(opts.metricsListen, opts.registry());
    log.info('metrics listening', { url: metrics.url });
  }
  return {
    log,
    metricsUrl: metrics?.url,
    async shutdown() {
      await metrics?.close();
      await tracing.shutdown().catch(() => {});
    },
  };
}
