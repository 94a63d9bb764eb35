// A real OTLP trace receiver for tests: an HTTP server taking POST /v1/traces as http/json (parsed as JSON) or
// http/protobuf (decoded with protobufjs and test/otlp/trace-subset.proto), and a gRPC TraceService/Export server
// over the same proto. Every span received is kept, flattened, with its resource's service.name.
import { createServer, type Server } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

export interface ReceivedSpan {
  service: string;
  resource: Record<string, unknown>;
  traceId: string;
  spanId: string;
  /** '' for a root span. */
  parentSpanId: string;
  name: string;
  kind: number;
  startNs: bigint;
  endNs: bigint;
  attributes: Record<string, unknown>;
  links: { traceId: string; spanId: string }[];
  statusCode: number;
}

export interface Receiver {
  /** http://127.0.0.1:PORT (HTTP) or 127.0.0.1:PORT (gRPC). */
  endpoint: string;
  spans: ReceivedSpan[];
  /** Content types (HTTP) or 'grpc' of the export requests received. */
  requests: string[];
  /** Resolves once `pred` holds for the spans received (polls), or rejects after `timeoutMs`. */
  waitFor(pred: (spans: ReceivedSpan[]) => boolean, timeoutMs: number): Promise<void>;
  close(): Promise<void>;
}

// Find the proto in the source tree (tests run from dist/).
function protoPath(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const p = join(dir, 'test', 'otlp', 'trace-subset.proto');
    try {
      protobuf.loadSync(p);
      return p;
    } catch {
      const up = dirname(dir);
      if (up === dir) throw new Error('test/otlp/trace-subset.proto not found');
      dir = up;
    }
  }
}

type Json = Record<string, unknown>;

function anyValue(v: Json | undefined): unknown {
  if (!v) return undefined;
  const key = Object.keys(v).find((k) => v[k] !== undefined && v[k] !== null && k !== 'value');
  const raw = key ? v[key] : undefined;
  if (key === 'arrayValue' || key === 'array_value')
    return ((raw as Json).values as Json[] | undefined)?.map(anyValue) ?? [];
  if (key === 'intValue' || key === 'int_value') return Number(raw);
  return raw;
}

function attributes(list: Json[] | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const kv of list ?? []) out[kv.key as string] = anyValue(kv.value as Json);
  return out;
}

/** Ids as hex: JSON carries hex strings, protobuf carries bytes (Buffer). */
function hex(id: unknown): string {
  if (id === undefined || id === null) return '';
  if (typeof id === 'string') return id.toLowerCase();
  return Buffer.from(id as Uint8Array).toString('hex');
}

function flatten(request: Json, into: ReceivedSpan[]): void {
  const rs = (request.resourceSpans ?? request.resource_spans ?? []) as Json[];
  for (const r of rs) {
    const resource = attributes(((r.resource as Json | undefined)?.attributes ?? []) as Json[]);
    for (const ss of (r.scopeSpans ?? r.scope_spans ?? []) as Json[]) {
      for (const s of (ss.spans ?? []) as Json[]) {
        into.push({
          service: String(resource['service.name'] ?? ''),
          resource,
          traceId: hex(s.traceId),
          spanId: hex(s.spanId),
          parentSpanId: hex(s.parentSpanId),
          name: String(s.name),
          kind: Number(s.kind ?? 0),
          startNs: BigInt(String(s.startTimeUnixNano ?? 0)),
          endNs: BigInt(String(s.endTimeUnixNano ?? 0)),
          attributes: attributes(s.attributes as Json[]),
          links: ((s.links ?? []) as Json[]).map((l) => ({ traceId: hex(l.traceId), spanId: hex(l.spanId) })),
          statusCode: Number((s.status as Json | undefined)?.code ?? 0),
        });
      }
    }
  }
}

function receiverOf(endpoint: string, spans: ReceivedSpan[], requests: string[], close: () => Promise<void>): Receiver {
  return {
    endpoint,
    spans,
    requests,
    async waitFor(pred, timeoutMs) {
      const until = Date.now() + timeoutMs;
      while (!pred(spans)) {
        if (Date.now() > until) throw new Error(`spans not received within ${timeoutMs} ms (have ${spans.length})`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    close,
  };
}

export async function startHttpReceiver(): Promise<Receiver> {
  const root = protobuf.loadSync(protoPath());
  const Request = root.lookupType('opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest');
  const Response = root.lookupType('opentelemetry.proto.collector.trace.v1.ExportTraceServiceResponse');
  const spans: ReceivedSpan[] = [];
  const requests: string[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const type = String(req.headers['content-type'] ?? '');
      requests.push(type);
      if (req.method !== 'POST' || req.url !== '/v1/traces') {
        res.writeHead(404).end();
        return;
      }
      try {
        if (type.startsWith('application/json')) {
          flatten(JSON.parse(body.toString('utf8')), spans);
          res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
        } else if (type.startsWith('application/x-protobuf')) {
          const decoded = Request.toObject(Request.decode(body), { longs: String, bytes: Buffer }) as Json;
          flatten(decoded, spans);
          res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end(Response.encode({}).finish());
        } else res.writeHead(415).end();
      } catch (err) {
        res.writeHead(400).end(String(err));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const { port } = server.address() as { port: number };
  return receiverOf(`http://127.0.0.1:${port}`, spans, requests, async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
}

export async function startGrpcReceiver(): Promise<Receiver> {
  const pkg = protoLoader.loadSync(protoPath(), { keepCase: false, longs: String, bytes: Buffer, defaults: false });
  let node: unknown = grpc.loadPackageDefinition(pkg);
  for (const part of 'opentelemetry.proto.collector.trace.v1.TraceService'.split('.'))
    node = (node as Record<string, unknown>)[part];
  const svc = node as grpc.ServiceClientConstructor;
  const spans: ReceivedSpan[] = [];
  const requests: string[] = [];
  const server = new grpc.Server();
  server.addService(svc.service, {
    Export: (call: grpc.ServerUnaryCall<Json, Json>, cb: grpc.sendUnaryData<Json>) => {
      requests.push('grpc');
      flatten(call.request, spans);
      cb(null, {});
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  return receiverOf(`127.0.0.1:${port}`, spans, requests, async () => {
    server.forceShutdown();
  });
}
