// TLS for the gRPC links: a service's certificate and key, and the CA its peers' certificates must chain to. With a
// CA, an internal server demands a client certificate signed by it (mTLS), and a client checks the server's.
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';

export interface TlsFiles {
  /** PEM certificate (chain) of this process. */
  cert?: string;
  /** PEM private key of `cert`. */
  key?: string;
  /** PEM CA bundle peers must chain to. */
  ca?: string;
}

function read(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? err}`);
  }
}

/** Checks the combination of --tls-cert/--tls-key/--tls-ca; returns undefined when none is given. */
export function tlsFromFlags(files: TlsFiles, command: string, opts: { serves: boolean }): TlsFiles | undefined {
  const { cert, key, ca } = files;
  if (cert === undefined && key === undefined && ca === undefined) return undefined;
  if ((cert === undefined) !== (key === undefined)) throw new Error(`${command}: --tls-cert and --tls-key go together`);
  if (opts.serves && cert === undefined) throw new Error(`${command}: --tls-ca needs --tls-cert and --tls-key too`);
  return files;
}

/**
 * Server credentials: TLS with `tls.cert`/`tls.key`; with `requireClientCert` (internal services) every client must
 * present a certificate signed by `tls.ca`. Without `tls`, plaintext.
 */
export function serverCredentials(tls: TlsFiles | undefined, requireClientCert: boolean): grpc.ServerCredentials {
  if (!tls?.cert || !tls.key) return grpc.ServerCredentials.createInsecure();
  const ca = requireClientCert && tls.ca ? read(tls.ca, '--tls-ca') : null;
  return grpc.ServerCredentials.createSsl(
    ca,
    [{ cert_chain: read(tls.cert, '--tls-cert'), private_key: read(tls.key, '--tls-key') }],
    ca !== null,
  );
}

/** Channel credentials: TLS checking the server against `tls.ca` (and presenting `cert`/`key` if given). */
export function channelCredentials(tls: TlsFiles | undefined): grpc.ChannelCredentials {
  if (!tls) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(
    tls.ca ? read(tls.ca, '--tls-ca') : null,
    tls.key ? read(tls.key, '--tls-key') : null,
    tls.cert ? read(tls.cert, '--tls-cert') : null,
  );
}
