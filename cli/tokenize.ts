// `emu3 tokenize --model DIR "text"`: prints each id of the text and the piece of text it decodes to.
import { loadTokenizer } from '../lib/tokenizer/load.js';
import type { Flags } from './args.js';
import type { Command } from './main.js';

export const command: Command = {
  spec: {
    name: 'tokenize',
    summary: 'show the Emu3 token ids of a text and the piece each one decodes to',
    usage: 'emu3 tokenize --model DIR [--json] "text" ["more text" …]',
    flags: {
      model: { help: 'model directory holding emu3.tiktoken, emu3_vision_tokens.txt and config.json, required' },
      json: { help: 'print {"ids": [...], "pieces": [...]} as JSON instead of a table', boolean: true },
    },
  },
  async run(flags: Flags, positionals: string[]): Promise<number> {
    const dir = flags.required('model');
    if (positionals.length === 0) {
      console.error('emu3 tokenize: give the text to tokenize as an argument');
      return 2;
    }
    const tok = loadTokenizer(dir);
    const ids = tok.encode(positionals.join(' '));
    // A token may hold part of a UTF-8 character; show its bytes then, so every line says exactly what it is.
    const strict = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
    const pieces = ids.map((id) => {
      const bytes = tok.tokenBytes(id);
      try {
        return strict.decode(bytes);
      } catch {
        return `<bytes ${Buffer.from(bytes).toString('hex')}>`;
      }
    });
    if (flags.bool('json')) {
      console.log(JSON.stringify({ ids, pieces }));
      return 0;
    }
    const width = Math.max(...ids.map((id) => String(id).length), 2);
    for (let i = 0; i < ids.length; i++) console.log(`${String(ids[i]).padStart(width)}  ${JSON.stringify(pieces[i])}`);
    console.log(`${ids.length} tokens`);
    return 0;
  },
};
