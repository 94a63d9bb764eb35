// Reading the JSON files of a model directory (config.json, preprocessor_config.json, ...): every failure names the
// file and what it was read as.
import { readFileSync } from 'node:fs';
import { CheckpointError } from './errors.js';

export function readJsonFile(
  path: string,
  what = '',
  error: (message: string) => Error = (m) => new CheckpointError(m),
): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw error(`${path}: cannot read${what ? ` ${what}` : ''} (${(e as NodeJS.ErrnoException).code ?? e})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw error(`${path}: invalid JSON (${(e as Error).message})`);
  }
}
