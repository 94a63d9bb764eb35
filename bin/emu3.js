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
const { run } = await import(pathToFileURL(main).href);
process.exitCode = await run(process.argv.slice(2));
