// `emu3 up --tls`: a throwaway certificate authority and one certificate (server and client use, for the loopback
// addresses and the given host names) made with the openssl command line; node:crypto can read certificates but
// not issue them. Everything is written into a new 0700 directory that the caller removes.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TlsFiles } from '../lib/rpc/tls.js';

export interface ThrowawayPki {
  dir: string;
  /** cert, key (one pair for every process) and ca. */
  tls: Required<TlsFiles>;
  remove(): void;
}

function openssl(args: string[], cwd: string): void {
  try {
    execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === 'ENOENT') throw new Error('--tls needs the openssl command (not found on PATH)');
    throw new Error(`openssl ${args[0]} failed: ${e.stderr?.toString().trim() ?? e.message}`);
  }
}

/** A CA named `name` and one leaf certificate for 127.0.0.1, ::1, localhost and `hosts`, valid for `days`. */
export function makeThrowawayPki(hosts: string[] = [], days = 7, name = 'emu3 up throwaway CA'): ThrowawayPki {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-tls-'));
  try {
    const names = new Set(['127.0.0.1', '::1', 'localhost', ...hosts.filter((h) => h !== '' && h !== '0.0.0.0')]);
    const san = [...names].map((h) => (isIP(h) ? `IP:${h}` : `DNS:${h}`)).join(',');
    writeFileSync(
      join(dir, 'leaf.ext'),
      `subjectAltName=${san}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n`,
    );
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    openssl(
      ['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', String(days), '-subj', `/CN=${name}`],
      dir,
    );
    openssl(['req', ...ec, '-keyout', 'service.key', '-out', 'service.csr', '-subj', '/CN=emu3'], dir);
    openssl(
      [
        'x509',
        '-req',
        '-in',
        'service.csr',
        '-CA',
        'ca.crt',
        '-CAkey',
        'ca.key',
        '-CAcreateserial',
        '-out',
        'service.crt',
        '-days',
        String(days),
        '-extfile',
        'leaf.ext',
      ],
      dir,
    );
    rmSync(join(dir, 'ca.key')); // nothing more is ever signed by it
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    dir,
    tls: { cert: join(dir, 'service.crt'), key: join(dir, 'service.key'), ca: join(dir, 'ca.crt') },
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
