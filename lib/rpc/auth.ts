// Who may call a service: bearer tokens read from a file (one a line, re-read when the file changes) checked in
// constant time by a guard wrapped around every method of a server, and the client side that sends them. A token
// never appears in a log line or an error message. docs/security.md has the whole picture.
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from './log.js';

/** Tokens of a file: one a line; blank lines and lines starting with # are skipped; surrounding spaces trimmed. */
export function parseTokens(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
}

/** How often a token file's stat is looked at (changes take effect within this long). */
export const TOKEN_FILE_CHECK_MS = 200;

/**
 * The tokens of a file, re-read when its inode, size or mtime changes (checked at most every TOKEN_FILE_CHECK_MS).
 * Missing or unreadable at start: the constructor throws, naming the file. Gone later (a rotation in progress):
 * the last tokens stay in force.
 */
export class TokenFile {
  private list: string[];
  private stamp: string;
  private checkedAt = 0;

  constructor(
    readonly path: string,
    private readonly log?: Logger,
  ) {
    try {
      this.stamp = this.stat();
      this.list = parseTokens(readFileSync(path, 'utf8'));
    } catch (err) {
      throw new Error(`cannot read the token file ${path}: ${(err as NodeJS.ErrnoException).code ?? err}`);
    }
    this.checkedAt = Date.now();
  }

  private stat(): string {
    const s = statSync(this.path);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  }

  tokens(): string[] {
    const now = Date.now();
    if (now - this.checkedAt < TOKEN_FILE_CHECK_MS) return this.list;
    this.checkedAt = now;
    try {
      const stamp = this.stat();
      if (stamp !== this.stamp) {
        this.list = parseTokens(readFileSync(this.path, 'utf8'));
        this.stamp = stamp;
        this.log?.info('token file re-read', { file: this.path, tokens: this.list.length });
      }
    } catch {
      // Keep the last tokens while the file is replaced.
    }
    return this.list;
  }

  /** The first token: what a client sends. */
  first(): string | undefined {
    return this.tokens()[0];
  }
}

const digest = (s: string) => createHash('sha256').update(s, 'utf8').digest();

/** Whether `presented` is one of `tokens`, comparing SHA-256 digests in constant time and always every token. */
export function tokenMatches(presented: string, tokens: readonly string[]): boolean {
  const p = digest(presented);
  let ok = false;
  for (const t of tokens) ok = timingSafeEqual(p, digest(t)) || ok;
  return ok;
}

export interface AuthPolicy {
  /** What the tokens are, for refusals: e.g. "--auth-token-file" or "the pipeline's --internal-token-file". */
  source: string;
  tokens: () => readonly string[];
  /** Methods ('/pkg.Service/Method') answered without a token. Default: grpc.health.v1 only. */
  open?: (path: string) => boolean;
}

export const HEALTH_PREFIX = '/grpc.health.v1.Health/';
export const isHealth = (path: string) => path.startsWith(HEALTH_PREFIX);
/** Health and server reflection (which describes only the service's schema) are open. */
export const isHealthOrReflection = (path: string) => isHealth(path) || path.startsWith('/grpc.reflection.');

/** The token of an `authorization: Bearer <token>` header, or null when there is none or it has another form. */
export function bearerToken(value: unknown): string | null {
  if (typeof value !== 'string') return null;
  const m = /^Bearer +(\S+) *$/i.exec(value);
  return m ? m[1] : null;
}

export interface Refusal {
  code: grpc.status;
  details: string;
}

/** Why a call of `path` with `header` (the authorization value) is refused, or null when it may run. */
export function refusal(policy: AuthPolicy, path: string, header: unknown): Refusal | null {
  if ((policy.open ?? isHealth)(path)) return null;
  const method = path.replace(/^\//, '');
  if (header === undefined)
    return {
      code: grpc.status.UNAUTHENTICATED,
      details: `${method} needs "authorization: Bearer <token>" with a token of ${policy.source}`,
    };
  const token = bearerToken(header);
  if (token === null)
    return {
      code: grpc.status.UNAUTHENTICATED,
      details: `${method}: the authorization header must be "Bearer <token>"`,
    };
  if (!tokenMatches(token, policy.tokens()))
    return {
      code: grpc.status.UNAUTHENTICATED,
      details: `${method}: the bearer token is not one of ${policy.source}`,
    };
  return null;
}

/** At most one `call refused` line per this many ms; the ones left out are counted in the next. */
export const REFUSAL_LOG_INTERVAL_MS = 1000;

/**
 * Wraps every method of a service so that a call the policy does not let through is refused before its handler
 * runs: UNAUTHENTICATED, and nothing is executed. Done by wrapping the handlers rather than with a grpc-js server
 * interceptor: an interceptor sits on every message of every call, and on the pipeline's long-lived streams that
 * measured ~5% of tokens/s at concurrency 1 (two shards, small preset). Refusals are logged with the method and the
 * peer only, at most one line a second (a flood of strangers does not flood the log).
 */
export function guardService(
  definition: grpc.ServiceDefinition,
  implementation: grpc.UntypedServiceImplementation,
  policy: AuthPolicy,
  log: Logger,
): grpc.UntypedServiceImplementation {
  const logRefusal = refusalLogger(log);
  const guarded: grpc.UntypedServiceImplementation = {};
  for (const [name, handler] of Object.entries(implementation)) {
    const method = definition[name];
    if (!method) {
      guarded[name] = handler;
      continue;
    }
    const fn = handler as (call: AnyServerCall, callback?: grpc.sendUnaryData<unknown>) => void;
    guarded[name] = ((call: AnyServerCall, callback?: grpc.sendUnaryData<unknown>) => {
      const denied = refusal(policy, method.path, call.metadata.get('authorization')[0]);
      if (!denied) return fn(call, callback);
      logRefusal(method.path, call.getPeer(), denied.details);
      const error = Object.assign(new Error(denied.details), { code: denied.code, details: denied.details });
      if (!method.responseStream && callback) callback(error, null);
      else (call as grpc.ServerWritableStream<unknown, unknown>).emit('error', error);
    }) as grpc.UntypedHandleCall;
  }
  return guarded;
}

type AnyServerCall =
  | grpc.ServerUnaryCall<unknown, unknown>
  | grpc.ServerReadableStream<unknown, unknown>
  | grpc.ServerWritableStream<unknown, unknown>
  | grpc.ServerDuplexStream<unknown, unknown>;

function refusalLogger(log: Logger): (path: string, peer: string, why: string) => void {
  let loggedAt = Number.NEGATIVE_INFINITY;
  let unlogged = 0;
  return (path, peer, why) => {
    const now = performance.now();
    if (now - loggedAt < REFUSAL_LOG_INTERVAL_MS) {
      unlogged++;
      return;
    }
    log.warn('call refused', { method: path, peer, why, ...(unlogged > 0 ? { refusedSinceLastLine: unlogged } : {}) });
    loggedAt = now;
    unlogged = 0;
  };
}

/** A client interceptor that sends `authorization: Bearer <token()>` on every call (nothing when it is undefined). */
export function bearerInterceptor(token: () => string | undefined): grpc.Interceptor {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start: (metadata, listener, next) => {
        const t = token();
        if (t !== undefined) metadata.set('authorization', `Bearer ${t}`);
        next(metadata, listener);
      },
    });
}

/**
 * A client's public API token: EMU3_AUTH_TOKEN, else the first token of `file` (--auth-token-file), else none.
 * Returns a function, so a re-written file is picked up by later calls.
 */
export function clientToken(file: string | undefined, env = process.env): (() => string | undefined) | undefined {
  const fromEnv = env.EMU3_AUTH_TOKEN;
  if (fromEnv !== undefined && fromEnv !== '') return () => fromEnv;
  if (file === undefined) return undefined;
  const tokens = new TokenFile(file);
  if (tokens.first() === undefined) throw new Error(`the token file ${file} holds no token`);
  return () => tokens.first();
}
