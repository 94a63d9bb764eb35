// The vq service process: load the VQ directory, start `workers` codecs (one ORT worker thread each), put them behind
// a bounded queue, serve VqService + grpc.health.v1 until SIGTERM/SIGINT, then drain and stop the workers.
import { availableParallelism } from 'node:os';
import type { Device } from '../../lib/onnx/stage-graph.js';
import { type InternalSecurity, internalServe, warnIfOpen } from '../../lib/rpc/internal-security.js';
import type { Logger } from '../../lib/rpc/log.js';
import { serviceDefinition } from '../../lib/rpc/proto.js';
import { DEFAULT_MAX_MESSAGE_BYTES, type RunningServer, serve } from '../../lib/rpc/serve.js';
import { VQ_PROTO, VQ_SERVICE } from '../../lib/rpc/vq-wire.js';
import { vqTelemetry } from '../../lib/telemetry/vq.js';
import { VqCodec } from '../../lib/vq/codec.js';
import { DEFAULT_MAX_INPUT_PIXELS } from '../../lib/vq/image-decode.js';
import { loadVqModelInfo } from './pipeline.js';
import { WorkerPool } from './pool.js';
import { vqServiceImplementation } from './service.js';

export interface VqServerOptions {
  vqDir: string;
  /** host:port; port 0 picks a free one. */
  address: string;
  log: Logger;
  /** Largest input image (width × height from its header). Default 40,000,000. */
  pixelLimit?: number;
  /** Requests that may wait for a busy worker. Default 16. */
  queueLimit?: number;
  /** Codecs (ORT worker threads), each running one request at a time. Default 1. */
  workers?: number;
  /** ORT intra-op threads per codec. Default: the machine's cores shared among the workers. */
  threads?: number;
  /** Where ORT runs the encoder and decoder. Default cpu. */
  device?: Device;
  /** Where built graphs are cached. Default: lib/vq/graph-cache.ts defaultCacheDir. */
  cacheDir?: string;
  /** Largest request message, bytes. Default 64 MiB. */
  maxMessageBytes?: number;
  /** How long in-flight requests may take once draining starts. Default 30 s. */
  drainTimeoutMs?: number;
  handleSignals?: boolean;
  /** The pipeline's secret and mTLS, demanded of every caller but health probes. */
  security?: InternalSecurity;
}

export const DEFAULT_QUEUE_LIMIT = 16;

export async function startVqServer(opts: VqServerOptions): Promise<RunningServer> {
  const log = opts.log;
  const workers = opts.workers ?? 1;
  const info = loadVqModelInfo(opts.vqDir, opts.pixelLimit ?? DEFAULT_MAX_INPUT_PIXELS);
  const threads = opts.threads ?? Math.max(1, Math.floor(availableParallelism() / workers));
  const maxMessageBytes = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const device = opts.device ?? 'cpu';
  log.info('loading VQ', { dir: opts.vqDir, fingerprint: info.fingerprint.slice(0, 16), workers, threads, device });
  const started = performance.now();
  const codecs: VqCodec[] = [];
  try {
    // One after the other: the first builds the cached graphs, the rest load them.
    for (let i = 0; i < workers; i++) {
      codecs.push(
        await VqCodec.open(opts.vqDir, {
          cacheDir: opts.cacheDir,
          threads,
          device,
          log: (msg) => log.info('codec', { worker: i, detail: msg }),
        }),
      );
    }
  } catch (err) {
    await Promise.all(codecs.map((c) => c.close()));
    throw err;
  }
  log.info('VQ ready', { ms: Math.round(performance.now() - started), codebookSize: info.codebookSize, device });
  const pool = new WorkerPool(codecs, opts.queueLimit ?? DEFAULT_QUEUE_LIMIT, 'vq');
  vqTelemetry().watchPool(pool);
  warnIfOpen(opts.security, log);
  try {
    return await serve({
      ...internalServe(opts.security),
      address: opts.address,
      log,
      maxReceiveMessageBytes: maxMessageBytes,
      drainTimeoutMs: opts.drainTimeoutMs,
      handleSignals: opts.handleSignals,
      services: [
        {
          name: VQ_SERVICE,
          definition: serviceDefinition(VQ_PROTO, VQ_SERVICE),
          implementation: vqServiceImplementation({ info, pool, maxMessageBytes, device, log }),
        },
      ],
      onClose: async () => {
        await Promise.all(codecs.map((c) => c.close()));
      },
    });
  } catch (err) {
    await Promise.all(codecs.map((c) => c.close()));
    throw err;
  }
}
