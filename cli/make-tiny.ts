// `emu3 make-tiny`: writes emu3-tiny (a random-weight Emu3 LLM, the real tokenizer files and a random VQ model) in
// exactly the upstream directory layout, deterministic from a seed.
import { join } from 'node:path';
import { type Preset, writeTinyEmu3 } from '../lib/model/tiny.js';
import { writeTokenizerFiles } from '../lib/tokenizer/files.js';
import { writeTinyVq } from '../lib/vq/tiny.js';
import type { Command } from './main.js';

export const command: Command = {
  spec: {
    name: 'make-tiny',
    summary: 'write a small random-weight Emu3 model, tokenizer and VQ model in the upstream file layout',
    usage: 'emu3 make-tiny --out DIR [--seed N] [--preset tiny|small] [--dtype f32|bf16] [--shards K] [--no-vq]',
    flags: {
      out: { help: 'directory to write, required (created if missing; the VQ model goes to DIR/vq)' },
      seed: { help: 'random seed, an integer in [0, 2^32); same seed, same bytes', default: '0' },
      preset: { help: 'model size: tiny (hidden 64, 4 layers) or small (hidden 1024, 12 layers)', default: 'tiny' },
      dtype: { help: 'weight dtype of the LLM safetensors: f32 or bf16', default: 'f32' },
      shards: {
        help: 'number of LLM safetensors files: 1 writes model.safetensors, K > 1 writes K shards + index',
        default: '1',
      },
      'no-vq': { help: 'skip the VQ model (DIR/vq)', boolean: true },
    },
  },
  async run(flags) {
    const dir = flags.required('out');
    const seed = flags.int('seed', 0, 0xffffffff) ?? 0;
    const preset: Preset = flags.oneOf('preset', ['tiny', 'small'] as const) ?? 'tiny';
    const dtype = flags.oneOf('dtype', ['f32', 'bf16'] as const) ?? 'f32';
    const shards = flags.int('shards', 1, 1000) ?? 1;
    const log = (msg: string) => console.log(msg);
    const started = Date.now();
    writeTinyEmu3(dir, { seed, preset, dtype, shards }, log);
    await writeTokenizerFiles(dir, log);
    if (!flags.bool('no-vq')) writeTinyVq(join(dir, 'vq'), { seed, preset }, log);
    log(`emu3-${preset} written to ${dir} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return 0;
  },
};
