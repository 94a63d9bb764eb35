// BENCHMARKS.md is one file with a `## Name` section per benchmark; each bench rewrites only its own section.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const benchmarksPath = join(fileURLToPath(new URL('../..', import.meta.url)), 'BENCHMARKS.md');

/** Replaces (or appends) the section whose heading is `## ${name}`; `body` is everything under the heading. */
export function writeBenchSection(name: string, body: string): void {
  const header = `## ${name}`;
  const section = `${header}\n\n${body.trim()}\n`;
  let doc = existsSync(benchmarksPath) ? readFileSync(benchmarksPath, 'utf8') : '# Benchmarks\n';
  const start = doc.indexOf(`${header}\n`);
  if (start >= 0) {
    const next = doc.indexOf('\n## ', start + header.length);
    doc = `${doc.slice(0, start)}${section}${next >= 0 ? `\n${doc.slice(next + 1)}` : ''}`;
  } else {
    doc = `${doc.trimEnd()}\n\n${section}`;
  }
  writeFileSync(benchmarksPath, doc);
}

/** Median of a non-empty list. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
