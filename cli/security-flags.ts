// The security flags the services share: the pipeline's secret, mTLS files, the public API's token file, and the
// ResultSink addresses a shard may send to. Each parser checks its flags before anything starts.
import { clientToken, TokenFile } from '../lib/rpc/auth.js';
import type { ClientCredentials } from '../lib/rpc/client.js';
import { type InternalSecurity, loadInternalSecurity } from '../lib/rpc/internal-security.js';
import type { Logger } from '../lib/rpc/log.js';
import { parseAddress } from '../lib/rpc/serve.js';
import { type TlsFiles, tlsFromFlags } from '../lib/rpc/tls.js';
import { type FlagSpec, type Flags, UsageError } from './args.js';

export const TLS_FLAGS: Record<string, FlagSpec> = {
  'tls-cert': {
    help: 'PEM certificate of this service (serve TLS; also its client certificate for mTLS) (default: none, plaintext)',
  },
  'tls-key': { help: 'PEM private key of --tls-cert (default: none)' },
  'tls-ca': {
    help: 'PEM CA bundle: internal peers must present a certificate signed by it (mTLS), and servers dialled are checked against it (default: none)',
  },
};

export const INTERNAL_SECURITY_FLAGS: Record<string, FlagSpec> = {
  'internal-token-file': {
    help: "file holding the pipeline's secret (one token a line, re-read on change): every internal call must carry one, and this service presents the first (default: none, anyone is obeyed; `emu3 up` makes one per run)",
  },
  ...TLS_FLAGS,
};

export const AUTH_TOKEN_FLAG: Record<string, FlagSpec> = {
  'auth-token-file': {
    help: 'file of public API tokens (one a line, re-read on change): every call but health needs "authorization: Bearer <token>" (default: none, no public auth)',
  },
};

function tlsOf(flags: Flags, command: string, serves: boolean): TlsFiles | undefined {
  try {
    return tlsFromFlags(
      { cert: flags.string('tls-cert'), key: flags.string('tls-key'), ca: flags.string('tls-ca') },
      command,
      { serves },
    );
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

/** --internal-token-file and --tls-*, loaded (files read now, so a missing one fails at start). */
export function internalSecurityFlags(flags: Flags, command: string, log?: Logger): InternalSecurity {
  const tls = tlsOf(flags, command, true);
  try {
    return loadInternalSecurity(flags.string('internal-token-file'), tls, log);
  } catch (err) {
    throw new UsageError(`${command}: ${(err as Error).message}`);
  }
}

/** --tls-* of a client (--tls-ca alone is enough to check the server). */
export function clientTlsFlags(flags: Flags, command: string): TlsFiles | undefined {
  return tlsOf(flags, command, false);
}

/** --auth-token-file of a server, loaded; undefined when not given. */
export function authTokenFlag(flags: Flags, command: string, log?: Logger): TokenFile | undefined {
  const file = flags.string('auth-token-file');
  if (file === undefined) return undefined;
  try {
    const tokens = new TokenFile(file, log);
    if (tokens.tokens().length === 0) log?.warn('--auth-token-file holds no token: every call but health is refused');
    return tokens;
  } catch (err) {
    throw new UsageError(`${command}: --auth-token-file: ${(err as Error).message}`);
  }
}

/** Comma-separated host:port list (--allow-reply-to). */
export function addressList(value: string | undefined, flag: string, command: string): string[] {
  if (value === undefined) return [];
  const list = value
    .split(',')
    .map((a) => a.trim())
    .filter((a) => a !== '');
  for (const a of list)
    try {
      parseAddress(a);
    } catch {
      throw new UsageError(`${command}: --${flag} "${a}" must be host:port`);
    }
  return list;
}

/** The flags of a public API client (emu3 chat, emu3 load). */
export const CLIENT_AUTH_FLAGS: Record<string, FlagSpec> = {
  'auth-token-file': {
    help: 'file whose first line is the public API token to send (default: $EMU3_AUTH_TOKEN, else none)',
  },
  'tls-ca': {
    help: "PEM CA to check the coordinator's TLS certificate against (connect with TLS; default: plaintext)",
  },
};

/** A public client's credentials from EMU3_AUTH_TOKEN / --auth-token-file and --tls-ca. */
export function clientAuthFlags(flags: Flags, command: string): ClientCredentials | undefined {
  let token: (() => string | undefined) | undefined;
  try {
    token = clientToken(flags.string('auth-token-file'));
  } catch (err) {
    throw new UsageError(`${command}: --auth-token-file: ${(err as Error).message}`);
  }
  const ca = flags.string('tls-ca');
  if (!token && ca === undefined) return undefined;
  return { token, tls: ca === undefined ? undefined : { ca } };
}
