// Traces through a small API of our own over the OpenTelemetry SDK: spans are started and ended explicitly by the
// code that knows where a stage of work begins and ends (no require hooks, which ES modules would bypass, and no
// async context manager: a span's parent is always passed in, as a span of this process or a W3C traceparent from
// another). Configured only by the standard OTEL_* variables; with no OTLP endpoint set, tracing is off, the SDK is
// never loaded, and every span is one shared no-op object.
import type { Attributes, Link, Span, SpanContext, Tracer } from '@opentelemetry/api';
import { formatTraceparent, parseTraceparent } from './traceparent.js';

export type SpanKindName = 'internal' | 'server' | 'client' | 'producer' | 'consumer';

export interface StartOptions {
  /** A span of this process, or a traceparent header from another; none: a new trace. */
  parent?: SpanHandle | string | null;
  /** Spans this one relates to without being their child (a micro-batch and the requests it carries). */
  links?: (SpanHandle | string)[];
  attributes?: Attributes;
  kind?: SpanKindName;
  /** performance.now() milliseconds (default: now). */
  startTime?: number;
}

export interface SpanHandle {
  /** False for the no-op span (tracing off, or this trace not sampled). */
  readonly recording: boolean;
  /** 32 hex digits; '' when not recording. */
  readonly traceId: string;
  /** The W3C traceparent naming this span as parent; '' when not recording. */
  readonly traceparent: string;
  setAttributes(attributes: Attributes): void;
  addEvent(name: string, attributes?: Attributes, time?: number): void;
  /** Marks the span failed: status ERROR with the message, rpc.grpc.status_code when the error has a code. */
  fail(err: unknown): void;
  /** `time`: performance.now() milliseconds (default: now). */
  end(time?: number): void;
}

export interface Tracing {
  readonly enabled: boolean;
  start(name: string, opts?: StartOptions): SpanHandle;
  /** Exports what is buffered. */
  flush(): Promise<void>;
  /** Exports what is buffered and stops. */
  shutdown(): Promise<void>;
}

export const NOOP_SPAN: SpanHandle = Object.freeze({
  recording: false,
  traceId: '',
  traceparent: '',
  setAttributes() {},
  addEvent() {},
  fail() {},
  end() {},
});

export const DISABLED_TRACING: Tracing = Object.freeze({
  enabled: false,
  start: () => NOOP_SPAN,
  flush: async () => {},
  shutdown: async () => {},
});

export const PROTOCOLS = ['http/protobuf', 'http/json', 'grpc'] as const;
export type OtlpProtocol = (typeof PROTOCOLS)[number];

export interface TracingConfig {
  protocol: OtlpProtocol;
  /** service.name unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise. */
  serviceName: string;
}

type Env = Record<string, string | undefined>;

/**
 * What the environment asks for: null (tracing off) unless an OTLP endpoint is set, OTEL_SDK_DISABLED is not "true"
 * and OTEL_TRACES_EXPORTER is not "none". Throws for a protocol other than the three OTLP ones, naming the variable.
 */
export function tracingConfigFromEnv(env: Env, defaultServiceName: string): TracingConfig | null {
  if ((env.OTEL_SDK_DISABLED ?? '').trim().toLowerCase() === 'true') return null;
  const exporter = (env.OTEL_TRACES_EXPORTER ?? 'otlp').trim().toLowerCase();
  if (exporter === 'none') return null;
  if (exporter !== 'otlp') throw new Error(`OTEL_TRACES_EXPORTER="${exporter}": only "otlp" (or "none") is supported`);
  if (!env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT && !env.OTEL_EXPORTER_OTLP_ENDPOINT) return null;
  const variable = env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
    ? 'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL'
    : env.OTEL_EXPORTER_OTLP_PROTOCOL
      ? 'OTEL_EXPORTER_OTLP_PROTOCOL'
      : null;
  const protocol = (variable ? env[variable]!.trim() : 'http/protobuf') as OtlpProtocol;
  if (!PROTOCOLS.includes(protocol))
    throw new Error(`${variable}="${protocol}" is not an OTLP protocol: use one of ${PROTOCOLS.join(', ')}`);
  return { protocol, serviceName: defaultServiceName };
}

const KINDS: Record<SpanKindName, number> = { internal: 0, server: 1, client: 2, producer: 3, consumer: 4 };

class OtelSpan implements SpanHandle {
  readonly recording = true;
  private parentHeader = '';
  constructor(readonly span: Span) {}
  get traceId(): string {
    return this.span.spanContext().traceId;
  }
  get traceparent(): string {
    if (!this.parentHeader) {
      const c = this.span.spanContext();
      this.parentHeader = formatTraceparent({
        traceId: c.traceId,
        spanId: c.spanId,
        sampled: (c.traceFlags & 1) === 1,
      });
    }
    return this.parentHeader;
  }
  setAttributes(attributes: Attributes): void {
    this.span.setAttributes(attributes);
  }
  addEvent(name: string, attributes?: Attributes, time?: number): void {
    this.span.addEvent(name, attributes, time);
  }
  fail(err: unknown): void {
    const message = err instanceof Error ? err.message : String(err);
    const code = (err as { code?: unknown } | null)?.code;
    if (typeof code === 'number') this.span.setAttribute('rpc.grpc.status_code', code);
    if (err instanceof Error) this.span.setAttribute('error.type', err.name);
    this.span.setStatus({ code: 2, message });
  }
  end(time?: number): void {
    this.span.end(time);
  }
}

function spanContextOf(ref: SpanHandle | string): SpanContext | null {
  if (typeof ref !== 'string') return ref instanceof OtelSpan ? ref.span.spanContext() : null;
  const p = parseTraceparent(ref);
  return p ? { traceId: p.traceId, spanId: p.spanId, traceFlags: p.sampled ? 1 : 0, isRemote: true } : null;
}

/** Loads the SDK and the exporter the protocol names (each read the rest of the OTEL_* variables themselves). */
export async function createTracing(config: TracingConfig): Promise<Tracing> {
  const api = await import('@opentelemetry/api');
  const { BasicTracerProvider, BatchSpanProcessor } = await import('@opentelemetry/sdk-trace-base');
  const { resourceFromAttributes, detectResources, envDetector } = await import('@opentelemetry/resources');
  const exporter =
    config.protocol === 'grpc'
      ? new (await import('@opentelemetry/exporter-trace-otlp-grpc')).OTLPTraceExporter()
      : config.protocol === 'http/json'
        ? new (await import('@opentelemetry/exporter-trace-otlp-http')).OTLPTraceExporter()
        : new (await import('@opentelemetry/exporter-trace-otlp-proto')).OTLPTraceExporter();
  // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the env detector) win over the default name.
  const resource = resourceFromAttributes({ 'service.name': config.serviceName }).merge(
    detectResources({ detectors: [envDetector] }),
  );
  // The sampler (OTEL_TRACES_SAMPLER, _ARG) and the batch processor's OTEL_BSP_* come from the environment.
  const provider = new BasicTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(exporter)] });
  const tracer: Tracer = provider.getTracer('emu3-serve');
  const root = api.ROOT_CONTEXT;
  return {
    enabled: true,
    start(name, opts = {}) {
      let ctx = root;
      if (opts.parent) {
        const parent = spanContextOf(opts.parent);
        if (parent) ctx = api.trace.setSpanContext(root, parent);
      }
      const links: Link[] = [];
      for (const l of opts.links ?? []) {
        const context = spanContextOf(l);
        if (context) links.push({ context });
      }
      const span = tracer.startSpan(
        name,
        { kind: KINDS[opts.kind ?? 'internal'], attributes: opts.attributes, links, startTime: opts.startTime },
        ctx,
      );
      return span.isRecording() ? new OtelSpan(span) : NOOP_SPAN;
    },
    flush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
}

let current: Tracing = DISABLED_TRACING;

/** This process's tracing (DISABLED_TRACING until initTracing found an endpoint). */
export function tracing(): Tracing {
  return current;
}

/** Sets up this process's tracing from the environment; `service` gives the default service.name (emu3-<service>). */
export async function initTracing(service: string, env: Env = process.env): Promise<Tracing> {
  const config = tracingConfigFromEnv(env, `emu3-${service}`);
  current = config ? await createTracing(config) : DISABLED_TRACING;
  return current;
}
