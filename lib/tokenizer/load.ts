// Loads the tokenizer of a model directory and checks its role ids against the directory's config.json.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { readJsonFile } from '../model/json-file.js';
import { type Role, TIKTOKEN_FILE, VISION_TOKENS_FILE } from './specials.js';
import { Emu3Tokenizer } from './tokenizer.js';

/** config.json key holding each role's id (configuration_emu3.py). */
const CONFIG_KEYS: Record<Role, string> = {
  pad: 'pad_token_id',
  bos: 'bos_token_id',
  eos: 'eos_token_id',
  img: 'img_token_id',
  boi: 'boi_token_id',
  eoi: 'eoi_token_id',
  eol: 'eol_token_id',
  eof: 'eof_token_id',
};

function readText(path: string): string {
  if (!existsSync(path)) throw new Error(`tokenizer file ${path} not found`);
  return readFileSync(path, 'utf8');
}

/**
 * Checks the file-derived ids against a parsed config.json object. Keys absent from the config are not checked;
 * a present key that differs is an error naming both values.
 */
export function checkTokenizerAgainstConfig(tok: Emu3Tokenizer, config: Record<string, unknown>, source: string): void {
  for (const [role, key] of Object.entries(CONFIG_KEYS) as [Role, string][]) {
    if (!(key in config)) continue;
    if (config[key] !== tok.roles[role]) {
      throw new Error(
        `${source}: ${key} is ${JSON.stringify(config[key])} but the tokenizer files give ${role} = ${tok.roles[role]}`,
      );
    }
  }
  if ('vocab_size' in config && config.vocab_size !== tok.vocabSize) {
    throw new Error(
      `${source}: vocab_size is ${JSON.stringify(config.vocab_size)} but the tokenizer files give ${tok.vocabSize} tokens`,
    );
  }
}

/** Reads DIR/emu3.tiktoken and DIR/emu3_vision_tokens.txt, then checks the ids against DIR/config.json. */
export function loadTokenizer(dir: string): Emu3Tokenizer {
  const tiktokenPath = join(dir, TIKTOKEN_FILE);
  const visionPath = join(dir, VISION_TOKENS_FILE);
  const tok = Emu3Tokenizer.fromText(readText(tiktokenPath), readText(visionPath), dir);
  const configPath = join(dir, 'config.json');
  const config = readJsonFile(configPath);
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new Error(`${configPath}: expected a JSON object`);
  }
  checkTokenizerAgainstConfig(tok, config as Record<string, unknown>, configPath);
  return tok;
}
