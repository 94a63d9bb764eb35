#!/usr/bin/env node
// The emu3 command: a thin shim over the compiled CLI (built by `npm ci` via the prepare script, or `npm run build`).
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const main = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli', 'main.js');
if (!existsSync(main)) {
  console.error('emu3: the TypeScript sources are not built yet; run `npm run build` (npm ci does it for you).');
  process.exit(1);
}
// A child of `emu3 up` runs in its own process group (so a terminal's Ctrl-C reaches only `up`, which drains the
// system in order); it is told so by EMU3_EXIT_WITH_PARENT and stops (SIGTERM: a normal drain) when `up` goes away
// without stopping it, which closes the stdin pipe `up` holds.
if (process.env.EMU3_EXIT_WITH_PARENT === '1') {
  process.stdin.on('end', () => process.kill(process.pid, 'SIGTERM'));
  process.stdin.resume();
  process.stdin.unref?.();
}
const { run } = await import(pathToFileURL(main).href);
const code = await run(process.argv.slice(2));
// A command that failed exits at once: a half-started service (a bound side socket, an open client channel) must not
// keep a failed process alive.
if (code !== 0) process.exit(code);
process.exitCode = code;
