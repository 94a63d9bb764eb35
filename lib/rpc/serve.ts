// Start a gRPC server the same way in every service: bind, health, message limits, a parseable "listening" log line,
// and a graceful drain on SIGTERM/SIGINT (health → NOT_SERVING, stop accepting, finish in-flight calls, release
// resources, resolve `closed`). A second signal, or the drain timeout, cuts remaining calls off.
import * as grpc from '@grpc/grpc-js';
import { HealthService } from './health.js';
import type { Logger } from './log.js';

export interface ServiceBinding {
  /** Fully qualified name, e.g. 'emu3.internal.v1.VqService'; also its name in grpc.health.v1. */
  name: string;
  definition: grpc.ServiceDefinition;
  implementation: grpc.UntypedServiceImplementation;
}

export interface ServeOptions {
  /** host:port; port 0 picks a free one (the log line and RunningServer.address tell which). */
  address: string;
  services: ServiceBinding[];
  log: Logger;
  /** grpc.max_receive_message_length; larger requests get RESOURCE_EXHAUSTED from grpc-js. Default 64 MiB. */
  maxReceiveMessageBytes?: number;
  /** grpc.max_send_message_length. Default 64 MiB. */
  maxSendMessageBytes?: number;
  /** Extra grpc-js server options. */
  serverOptions?: grpc.ServerOptions;
  /** How long in-flight calls may take to finish once draining starts. Default 30 s. */
  drainTimeoutMs?: number;
  /** Runs when the drain starts (e.g. stop admitting work), before the server stops taking calls. */
  onDrainStart?: () => void;
  /**
   * Runs when the drain timeout passes with calls still open (e.g. end them with a final message); they then get 2 s
   * more to finish before they are cut off. Without it they are cut off at once.
   */
  onDrainTimeout?: () => Promise<void> | void;
  /** Runs after the server has stopped (terminate workers, close files). */
  onClose?: () => Promise<void> | void;
  /** Drain on SIGTERM and SIGINT. Default true. */
  handleSignals?: boolean;
}

export interface RunningServer {
  server: grpc.Server;
  /** The bound address, host:port, with the real port. */
  address: string;
  port: number;
  health: HealthService;
  /** Starts the drain (idempotent); resolves when everything is closed. */
  shutdown(reason: string): Promise<void>;
  /** Resolves once the server has drained and onClose has run. */
  closed: Promise<void>;
}

export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** Splits 'host:port' / '[v6]:port'; the error names the address. */
export function parseAddress(address: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(address);
  const port = m ? Number(m[2]) : Number.NaN;
  if (!m || port > 65535) throw new Error(`listen address "${address}" must be host:port with a port in [0, 65535]`);
  return { host: m[1], port };
}

export async function serve(opts: ServeOptions): Promise<RunningServer> {
  const { host } = parseAddress(opts.address);
  const log = opts.log;
  const maxReceive = opts.maxReceiveMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const server = new grpc.Server({
    'grpc.max_receive_message_length': maxReceive,
    'grpc.max_send_message_length': opts.maxSendMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
    ...opts.serverOptions,
  });
  const health = new HealthService('NOT_SERVING');
  server.addService(health.definition(), health.implementation(log.child({ component: 'health' })));
  for (const s of opts.services) server.addService(s.definition, s.implementation);

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(opts.address, grpc.ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(new Error(`cannot listen on ${opts.address}: ${err.message}`)) : resolve(bound),
    );
  });
  const address = `${host}:${port}`;
  for (const s of opts.services) health.set(s.name, 'SERVING');
  health.set('', 'SERVING');
  log.info('listening', { address, port, services: opts.services.map((s) => s.name), maxReceiveBytes: maxReceive });

  let resolveClosed!: () => void;
  const closed = new Promise<void>((resolve) => {
    resolveClosed = resolve;
  });
  let draining: Promise<void> | undefined;

  const onSignal = (signal: NodeJS.Signals) => {
    if (draining) {
      log.warn('second signal during drain: cancelling the remaining calls', { signal });
      server.forceShutdown();
      return;
    }
    void shutdown(signal);
  };

  const shutdown = (reason: string): Promise<void> => {
    draining ??= (async () => {
      const timeoutMs = opts.drainTimeoutMs ?? 30_000;
      log.info('draining', { reason, timeoutMs });
      health.close();
      opts.onDrainStart?.();
      const started = performance.now();
      await new Promise<void>((resolve) => {
        let force: NodeJS.Timeout | undefined;
        const timer = setTimeout(async () => {
          if (opts.onDrainTimeout) {
            log.warn('drain timeout: ending the remaining calls', { timeoutMs });
            await opts.onDrainTimeout();
            force = setTimeout(cut, 2000);
          } else cut();
        }, timeoutMs);
        const cut = () => {
          log.warn('drain timeout: cancelling the remaining calls', { timeoutMs });
          server.forceShutdown();
          resolve();
        };
        server.tryShutdown(() => {
          clearTimeout(timer);
          clearTimeout(force);
          resolve();
        });
      });
      try {
        await opts.onClose?.();
      } catch (err) {
        log.error('error while closing', { error: err });
      }
      if (opts.handleSignals !== false) {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
      }
      log.info('stopped', { reason, drainMs: Math.round(performance.now() - started) });
      resolveClosed();
    })();
    return draining;
  };

  if (opts.handleSignals !== false) {
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  }
  return { server, address, port, health, shutdown, closed };
}
