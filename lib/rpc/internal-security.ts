// The pipeline's own credentials, shared by the shards, vq and the coordinator's internal side: a secret every
// internal call and stream carries (--internal-token-file), and optional mTLS (--tls-cert/--tls-key/--tls-ca). The
// same bundle sets up a service's server (what it demands) and its clients to the other internal services (what
// it presents).
import { type AuthPolicy, isHealthOrReflection, TokenFile } from './auth.js';
import type { ClientCredentials } from './client.js';
import type { Logger } from './log.js';
import type { ServeOptions } from './serve.js';
import type { TlsFiles } from './tls.js';

export interface InternalSecurity {
  /** The pipeline's secret; unset: internal calls carry none and are not checked (anyone reaching a port is obeyed). */
  token?: TokenFile;
  /** mTLS between the internal services. */
  tls?: TlsFiles;
}

export const INTERNAL_TOKEN_SOURCE = "the pipeline's --internal-token-file";

/** What an internal server demands: the secret on every call but health and reflection; mTLS when a CA is given. */
export function internalServe(
  sec: InternalSecurity | undefined,
): Pick<ServeOptions, 'auth' | 'tls' | 'requireClientCert'> {
  const token = sec?.token;
  const auth: AuthPolicy | undefined = token
    ? { source: INTERNAL_TOKEN_SOURCE, tokens: () => token.tokens(), open: isHealthOrReflection }
    : undefined;
  return { auth, tls: sec?.tls, requireClientCert: sec?.tls?.ca !== undefined };
}

/** What an internal client presents: the secret's first token, and this process's certificate for mTLS. */
export function internalClient(sec: InternalSecurity | undefined): ClientCredentials | undefined {
  if (!sec) return undefined;
  const token = sec.token;
  return { token: token ? () => token.first() : undefined, tls: sec.tls };
}

/** Loads --internal-token-file (throws naming the file when it is missing or empty). */
export function loadInternalSecurity(
  tokenFile: string | undefined,
  tls: TlsFiles | undefined,
  log?: Logger,
): InternalSecurity {
  let token: TokenFile | undefined;
  if (tokenFile !== undefined) {
    token = new TokenFile(tokenFile, log);
    if (token.first() === undefined) throw new Error(`--internal-token-file ${tokenFile} holds no token`);
  }
  return { token, tls };
}

/** Says, once at start, that this service obeys anyone when no secret is configured. */
export function warnIfOpen(sec: InternalSecurity | undefined, log: Logger): void {
  if (!sec?.token && !sec?.tls?.ca)
    log.warn(
      'no --internal-token-file and no --tls-ca: any process that reaches this port is obeyed (docs/security.md)',
    );
}
