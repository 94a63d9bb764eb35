// grpc.health.v1 (proto/grpc/health/v1/health.proto): Check and Watch over a small status table. '' is the whole
// server. serve() registers it and flips everything to NOT_SERVING when draining, so probes fail before the port closes.
import type * as grpc from '@grpc/grpc-js';
import { NotFound } from './errors.js';
import { implement, serverStream, unary } from './handlers.js';
import type { Logger } from './log.js';
import { serviceDefinition } from './proto.js';

export type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

export const HEALTH_PROTO = 'grpc/health/v1/health.proto';
export const HEALTH_SERVICE = 'grpc.health.v1.Health';
const CLOSING = '\u0000closing';

interface HealthCheckRequest {
  service: string;
}
interface HealthCheckResponse {
  status: ServingStatus;
}

export class HealthService {
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly watchers = new Set<(service: string) => void>();
  private closed = false;

  constructor(initial: ServingStatus = 'NOT_SERVING') {
    this.statuses.set('', initial);
  }

  /** Sets one service's status ('' = the whole server) and tells its watchers. */
  set(service: string, status: ServingStatus): void {
    if (this.statuses.get(service) === status) return;
    this.statuses.set(service, status);
    for (const w of this.watchers) w(service);
  }

  /** Draining: everything NOT_SERVING, and open Watch streams end after telling their client so. */
  close(): void {
    this.setAll('NOT_SERVING');
    this.closed = true;
    for (const w of this.watchers) w(CLOSING);
  }

  /** Sets every known service, the server included. */
  setAll(status: ServingStatus): void {
    for (const service of [...this.statuses.keys()]) this.set(service, status);
  }

  get(service: string): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  definition(): grpc.ServiceDefinition {
    return serviceDefinition(HEALTH_PROTO, HEALTH_SERVICE);
  }

  implementation(log: Logger): grpc.UntypedServiceImplementation {
    return implement(
      { service: 'Health', log },
      {
        Check: unary(async (req: HealthCheckRequest): Promise<HealthCheckResponse> => {
          const status = this.statuses.get(req.service);
          if (status === undefined) throw new NotFound(`health: unknown service "${req.service}"`);
          return { status };
        }),
        Watch: serverStream(async (req: HealthCheckRequest, send: (m: HealthCheckResponse) => Promise<void>, ctx) => {
          let last: ServingStatus | undefined;
          let wake = () => {};
          const listener = (service: string) => {
            if (service === req.service || service === CLOSING) wake();
          };
          const onAbort = () => wake();
          this.watchers.add(listener);
          ctx.signal.addEventListener('abort', onAbort);
          try {
            while (!ctx.signal.aborted) {
              const changed = new Promise<void>((resolve) => {
                wake = resolve;
              });
              const status = this.statuses.get(req.service) ?? 'SERVICE_UNKNOWN';
              if (status !== last) {
                last = status;
                await send({ status });
              }
              if (this.closed) return; // the server is draining: end the stream so the drain does not wait on it
              await changed;
            }
          } finally {
            this.watchers.delete(listener);
            ctx.signal.removeEventListener('abort', onAbort);
          }
        }),
      },
    );
  }
}
