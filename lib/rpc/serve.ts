// Start a gRPC server the same way in every service: bind, health, server reflection, message limits, a parseable
// "listening" log line, and a graceful drain on SIGTERM/SIGINT (health → NOT_SERVING, stop accepting, finish in-flight calls, release
// resources, resolve `closed`). A second signal, or the drain timeout, cuts remaining calls off.
import { createServer } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import type { PackageDefinition } from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { type AuthPolicy, guardService } from './auth.js';
import { HealthService } from './health.js';
import type { Logger } from './log.js';
import { serverCredentials, type TlsFiles } from './tls.js';

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
  /**
   * Serve grpc.reflection.v1 and v1alpha ServerReflection for every service (health included). Default true. Skipped
   * when `services` already holds a grpc.reflection.* binding, so a caller that adds its own does not clash.
   */
  reflection?: boolean;
  /**
   * Who may call: every call of every service (health excepted, and what `auth.open` lets through) must carry a
   * bearer token of the policy, checked by a guard around every handler before it runs. Default: anyone.
   */
  auth?: AuthPolicy;
  /** Serve TLS with this certificate and key (default: plaintext). */
  tls?: TlsFiles;
  /** With `tls.ca`: every client must present a certificate signed by it (mTLS). Default false. */
  requireClientCert?: boolean;
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

const REFLECTION_PREFIX = 'grpc.reflection.';

/**
 * ServerReflection bindings describing `services`: @grpc/reflection reads the file descriptors that proto-loader
 * attaches to every method's request and response types, so each service's own .proto files are what it reports.
 */
export function reflectionBindings(services: ServiceBinding[]): ServiceBinding[] {
  const types: PackageDefinition = {};
  let n = 0;
  for (const s of services) {
    for (const method of Object.values(s.definition) as { requestType?: unknown; responseType?: unknown }[]) {
      for (const type of [method.requestType, method.responseType]) {
        const protos = (type as { fileDescriptorProtos?: unknown } | undefined)?.fileDescriptorProtos;
        if (Array.isArray(protos)) types[`t${n++}`] = { fileDescriptorProtos: protos } as never;
      }
    }
  }
  const out: ServiceBinding[] = [];
  new ReflectionService(types, { services: services.map((s) => s.name) }).addToServer({
    addService: (definition: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation) => {
      const first = Object.values(definition)[0] as { path: string };
      out.push({ name: first.path.split('/')[1], definition, implementation });
    },
  });
  return out;
}

/** The reason a listen failed, in words, from the Node error code somewhere in `message`. */
export function listenFailureReason(message: string): string {
  const reasons: Record<string, string> = {
    EADDRINUSE: 'the address is already in use (EADDRINUSE): is another emu3 process running there?',
    EACCES: 'permission denied (EACCES): ports below 1024 need privileges',
    EADDRNOTAVAIL: 'this machine has no such address (EADDRNOTAVAIL)',
    ENOTFOUND: 'the host name does not resolve (ENOTFOUND)',
    EAI_AGAIN: 'the host name does not resolve (EAI_AGAIN)',
  };
  for (const [code, reason] of Object.entries(reasons)) if (message.includes(code)) return reason;
  return message;
}

/**
 * Fails fast when `address` cannot be listened on (bad form, port in use, foreign host): binds a plain TCP socket
 * there and closes it at once. Services call it before loading anything, so a taken port is reported in
 * milliseconds, not after the model has loaded. Port 0 is only checked for its host.
 */
export async function checkListenable(address: string): Promise<void> {
  const { host, port } = parseAddress(address);
  const bare = host.startsWith('[') ? host.slice(1, -1) : host;
  await new Promise<void>((resolve, reject) => {
    const probe = createServer();
    probe.once('error', (err: NodeJS.ErrnoException) =>
      reject(new Error(`cannot listen on ${address}: ${listenFailureReason(err.code ?? err.message)}`)),
    );
    probe.listen({ host: bare, port, exclusive: true }, () => probe.close(() => resolve()));
  });
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
  const authLog = log.child({ component: 'auth' });
  const guard = (definition: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation) =>
    opts.auth ? guardService(definition, implementation, opts.auth, authLog) : implementation;
  const health = new HealthService('NOT_SERVING');
  server.addService(
    health.definition(),
    guard(health.definition(), health.implementation(log.child({ component: 'health' }))),
  );
  for (const s of opts.services) server.addService(s.definition, guard(s.definition, s.implementation));
  const hasReflection = opts.services.some((s) => s.name.startsWith(REFLECTION_PREFIX));
  if (opts.reflection !== false && !hasReflection) {
    const described: ServiceBinding[] = [
      ...opts.services,
      { name: 'grpc.health.v1.Health', definition: health.definition(), implementation: {} },
    ];
    for (const r of reflectionBindings(described))
      server.addService(r.definition, guard(r.definition, r.implementation));
  }

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(opts.address, serverCredentials(opts.tls, opts.requireClientCert ?? false), (err, bound) => {
      if (!err) return resolve(bound);
      server.forceShutdown(); // nothing bound: release what the server holds, so a failed service can exit
      reject(new Error(`cannot listen on ${opts.address}: ${listenFailureReason(err.message)}`));
    });
  });
  const address = `${host}:${port}`;
  for (const s of opts.services) health.set(s.name, 'SERVING');
  health.set('', 'SERVING');
  log.info('listening', {
    address,
    port,
    services: opts.services.map((s) => s.name),
    maxReceiveBytes: maxReceive,
    auth: opts.auth ? opts.auth.source : 'none',
    tls: opts.tls?.cert ? (opts.requireClientCert && opts.tls.ca ? 'mtls' : 'tls') : 'off',
  });

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
