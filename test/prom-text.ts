// Reading Prometheus text exposition in tests: samples by `name{label="v",...}` with labels sorted, and promtool's
// verdict on a scrape.
import { spawnSync } from 'node:child_process';

export type Samples = Map<string, number>;

/** `name{b="2",a="1"} 3` → key `name{a="1",b="2"}`, value 3 (comments and blank lines skipped). */
export function parseSamples(text: string): Samples {
  const out: Samples = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$/.exec(line);
    if (!m) throw new Error(`not a sample line: ${line}`);
    const labels = m[3]
      ? [...m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)].map((l) => `${l[1]}="${l[2]}"`)
      : [];
    labels.sort();
    out.set(labels.length > 0 ? `${m[1]}{${labels.join(',')}}` : m[1], Number(m[4]));
  }
  return out;
}

/** A sample's value, 0 when absent (a counter not yet incremented). */
export function sample(s: Samples, key: string): number {
  return s.get(key) ?? 0;
}

/** `promtool check metrics` on `text`: its exit status and what it printed. Throws if promtool is missing. */
export function promtoolCheck(text: string): { status: number; output: string } {
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  if (r.error) throw new Error(`promtool not runnable (apt-get install prometheus): ${r.error.message}`);
  return { status: r.status ?? -1, output: `${r.stdout}${r.stderr}` };
}

export async function scrape(url: string): Promise<string> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`${url}: HTTP ${res.status}`);
  return res.text();
}
