// The Prometheus endpoint of a service: a small node:http server of its own (apart from the gRPC port) answering
// GET /metrics with the registry's text exposition; anything else is 404.
import { createServer, type Server } from 'node:http';
import type { Registry } from 'prom-client';

export interface MetricsServer {
  /** http://HOST:PORT/metrics with the bound port. */
  url: string;
  close(): Promise<void>;
}

/** Splits 'host:port' / '[v6]:port'; the error names the flag. */
export function parseListen(listen: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(listen);
  const port = m ? Number(m[2]) : Number.NaN;
  if (!m || port > 65535) throw new Error(`--metrics-listen "${listen}" must be host:port with a port in [0, 65535]`);
  return { host: m[1], port };
}

export async function startMetricsServer(listen: string, registry: Registry): Promise<MetricsServer> {
  const { host, port } = parseListen(listen);
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '').split('?')[0];
    if (path !== '/metrics' || (req.method !== 'GET' && req.method !== 'HEAD')) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at GET /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? '' : text),
      (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${err.message}\n`),
    );
  });
  const bareHost = host.startsWith('[') ? host.slice(1, -1) : host;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new Error(`cannot listen on ${listen} for metrics: ${err.message}`)));
    server.listen(port, bareHost, () => resolve());
  });
  server.unref();
  const bound = (server.address() as { port: number }).port;
  return {
    url: `http://${host}:${bound}/metrics`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
