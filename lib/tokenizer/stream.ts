// Incremental detokenizer: feed ids one at a time, get back only text that is complete. Bytes of a UTF-8 character
// split across tokens are held until the character is whole, so nothing is emitted twice or half; the
// concatenation of every push() plus end() equals the one-shot decode of all ids.
import type { DecodeOptions, Emu3Tokenizer } from './tokenizer.js';

export class StreamDetokenizer {
  private readonly decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });
  private ended = false;

  constructor(
    private readonly tokenizer: Emu3Tokenizer,
    private readonly opts: DecodeOptions = {},
  ) {}

  /** Text completed by this id ('' while a character is still incomplete or the id is a skipped special). */
  push(id: number): string {
    if (this.ended) throw new Error('StreamDetokenizer: push() after end()');
    if (this.opts.skipSpecialTokens && this.tokenizer.isSpecial(id)) return '';
    return this.decoder.decode(this.tokenizer.tokenBytes(id), { stream: true });
  }

  pushMany(ids: ArrayLike<number>): string {
    let text = '';
    for (let i = 0; i < ids.length; i++) text += this.push(ids[i]);
    return text;
  }

  /** Flushes: a dangling incomplete character becomes U+FFFD, as in the one-shot decode. */
  end(): string {
    if (this.ended) return '';
    this.ended = true;
    return this.decoder.decode();
  }
}
