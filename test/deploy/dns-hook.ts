// Loaded with `node --import` into the processes that test/integration/deploy-cpu-tiny.test.ts starts from the
// rendered manifests: it answers name lookups for the cluster DNS names in EMU3_TEST_HOSTS (a JSON object, name →
// loopback address) as the cluster's DNS would, and refuses every other name, so nothing leaves the machine.
// grpc-js resolves names with dns.promises.lookup (and asks TXT records for service config).
import dns from 'node:dns';

const hosts = JSON.parse(process.env.EMU3_TEST_HOSTS ?? '{}') as Record<string, string>;
const isIp = (h: string) => /^\d+\.\d+\.\d+\.\d+$/.test(h) || h.includes(':');

function answer(host: string): string {
  if (isIp(host)) return host;
  const address = hosts[host];
  if (address === undefined) {
    const err = new Error(
      `getaddrinfo ENOTFOUND ${host} (not a name of the rendered manifests)`,
    ) as NodeJS.ErrnoException;
    err.code = 'ENOTFOUND';
    throw err;
  }
  return address;
}

type LookupOptions = { all?: boolean } | number | undefined;
const wantsAll = (o: LookupOptions) => typeof o === 'object' && o?.all === true;

dns.promises.lookup = (async (host: string, options?: LookupOptions) => {
  const address = answer(host);
  const family = address.includes(':') ? 6 : 4;
  return wantsAll(options) ? [{ address, family }] : { address, family };
}) as typeof dns.promises.lookup;

dns.promises.resolveTxt = (async (host: string) => {
  answer(host);
  return [];
}) as typeof dns.promises.resolveTxt;

dns.lookup = ((host: string, options: unknown, callback?: unknown) => {
  const cb = (typeof options === 'function' ? options : callback) as (...a: unknown[]) => void;
  const opts = typeof options === 'function' ? undefined : (options as LookupOptions);
  try {
    const address = answer(host);
    const family = address.includes(':') ? 6 : 4;
    if (wantsAll(opts)) process.nextTick(cb, null, [{ address, family }]);
    else process.nextTick(cb, null, address, family);
  } catch (err) {
    process.nextTick(cb, err);
  }
}) as typeof dns.lookup;
