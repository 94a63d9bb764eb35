// The Emu3 tokenizer (docs/model.md, "Tokenizer"): tiktoken ranks + Emu3's special tokens. Encode = NFC, split at
// special-token strings, Qwen's pre-split pattern, byte-level BPE. Decode = token bytes → UTF-8 (invalid bytes
// → U+FFFD).
import { BytePairEncoder } from './bpe.js';
import { splitRegex } from './pretokenize.js';
import {
  parseVisionTokenLines,
  ROLE_STRINGS,
  type Role,
  SPECIAL_START_ID,
  specialTokenStrings,
  VISUAL_TOKEN_COUNT,
  VISUAL_TOKEN_PATTERN,
} from './specials.js';
import { StreamDetokenizer } from './stream.js';

export type RoleIds = Record<Role, number>;

export interface VisualRange {
  /** Id of visual code 0 (`<|visual token 000000|>`); code k has id start + k. */
  start: number;
  count: number;
}

export interface DecodeOptions {
  /** Drop every special id (≥ 151643), as HF's skip_special_tokens=True. */
  skipSpecialTokens?: boolean;
}

const LONE_SURROGATE = /\p{Cs}/gu;

function isAscii(s: string): boolean {
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) > 0x7f) return false;
  return true;
}

/** Parses emu3.tiktoken text: "<base64 bytes> <rank>" per line. Errors name the source and line. */
export function parseTiktokenRanks(text: string, source: string): Map<string, number> {
  const ranks = new Map<string, number>();
  let lineNo = 0;
  for (const line of text.split('\n')) {
    lineNo++;
    if (line.length === 0) continue;
    const space = line.indexOf(' ');
    const rank = Number(line.slice(space + 1));
    if (space <= 0 || !Number.isInteger(rank) || rank < 0) {
      throw new Error(`${source}:${lineNo}: expected "<base64> <rank>", got ${JSON.stringify(line.slice(0, 60))}`);
    }
    const bytes = Buffer.from(line.slice(0, space), 'base64').toString('latin1');
    if (ranks.has(bytes)) throw new Error(`${source}:${lineNo}: token bytes repeated (rank ${rank})`);
    ranks.set(bytes, rank);
  }
  return ranks;
}

export class Emu3Tokenizer {
  /** Number of BPE tokens (151643); special ids follow. */
  readonly numRegular: number;
  /** Regular + special tokens (184622 for the real files). */
  readonly vocabSize: number;
  readonly roles: RoleIds;
  readonly visual: VisualRange;
  readonly specialStrings: readonly string[];

  private readonly bpe: BytePairEncoder;
  private readonly specialIds = new Map<string, number>();
  /** Bytes of every id, regular and special. */
  private readonly idBytes: Uint8Array[];
  private readonly oneShotDecoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

  /**
   * @param ranks latin1 byte string → rank; ranks must be exactly 0..n-1.
   * @param visionTokenLines the lines of emu3_vision_tokens.txt (stripped, non-empty).
   */
  constructor(ranks: Map<string, number>, visionTokenLines: readonly string[], source = 'tokenizer') {
    this.numRegular = ranks.size;
    if (this.numRegular !== SPECIAL_START_ID) {
      throw new Error(`${source}: ${ranks.size} BPE ranks, but Emu3 numbers specials from ${SPECIAL_START_ID}`);
    }
    this.idBytes = new Array(this.numRegular);
    for (const [bytes, rank] of ranks) {
      if (rank >= this.numRegular) throw new Error(`${source}: rank ${rank} ≥ number of ranks ${this.numRegular}`);
      this.idBytes[rank] = Buffer.from(bytes, 'latin1');
    }
    this.bpe = new BytePairEncoder(ranks);

    this.specialStrings = specialTokenStrings(visionTokenLines);
    this.specialStrings.forEach((s, i) => {
      // The special-token scan in encode() relies on this shape: "<|" … "|>" with neither inside.
      if (!s.startsWith('<|') || !s.endsWith('|>') || s.slice(2, -2).includes('|>') || s.slice(2).includes('<|')) {
        throw new Error(`${source}: special token ${JSON.stringify(s)} is not of the form <|…|>`);
      }
      if (this.specialIds.has(s)) throw new Error(`${source}: special token ${s} listed twice`);
      const id = SPECIAL_START_ID + i;
      this.specialIds.set(s, id);
      this.idBytes.push(Buffer.from(s, 'utf8'));
    });
    this.vocabSize = this.idBytes.length;

    const roles = {} as RoleIds;
    for (const [role, str] of Object.entries(ROLE_STRINGS) as [Role, string][]) {
      const id = this.specialIds.get(str);
      if (id === undefined) throw new Error(`${source}: role token ${role} ${str} is missing`);
      roles[role] = id;
    }
    this.roles = roles;
    this.visual = this.checkVisualRange(source);
  }

  static fromText(tiktokenText: string, visionTokensText: string, source = 'tokenizer'): Emu3Tokenizer {
    return new Emu3Tokenizer(parseTiktokenRanks(tiktokenText, source), parseVisionTokenLines(visionTokensText), source);
  }

  private checkVisualRange(source: string): VisualRange {
    const first = '<|visual token 000000|>';
    const start = this.specialIds.get(first);
    if (start === undefined) throw new Error(`${source}: ${first} is missing`);
    for (let k = 0; k < VISUAL_TOKEN_COUNT; k++) {
      const s = this.specialStrings[start - SPECIAL_START_ID + k];
      const m = s === undefined ? null : VISUAL_TOKEN_PATTERN.exec(s);
      if (!m || Number(m[1]) !== k) {
        throw new Error(`${source}: id ${start + k} should be visual token ${k}, found ${s ?? 'nothing'}`);
      }
    }
    return { start, count: VISUAL_TOKEN_COUNT };
  }

  /** Id of a special-token string, or undefined. */
  specialId(s: string): number | undefined {
    return this.specialIds.get(s);
  }

  isSpecial(id: number): boolean {
    return id >= this.numRegular && id < this.vocabSize;
  }

  visualId(code: number): number {
    if (!Number.isInteger(code) || code < 0 || code >= this.visual.count) {
      throw new RangeError(`visual code ${code} outside 0..${this.visual.count - 1}`);
    }
    return this.visual.start + code;
  }

  /** Visual code of an id, or -1 when the id is not a visual token. */
  visualCode(id: number): number {
    const k = id - this.visual.start;
    return k >= 0 && k < this.visual.count ? k : -1;
  }

  /** The raw bytes of one token (a special's bytes are its literal string). */
  tokenBytes(id: number): Uint8Array {
    const b = this.idBytes[id];
    if (b === undefined || !Number.isInteger(id)) {
      throw new RangeError(`token id ${id} outside the vocabulary 0..${this.vocabSize - 1}`);
    }
    return b;
  }

  /** Encode like the reference: NFC, special-token strings → their ids, everything else BPE'd. */
  encode(text: string): number[] {
    const out: number[] = [];
    this.encodeInto(text, out);
    return out;
  }

  /** encode(), appending to `out` (used by the prompt builder to avoid copies). */
  encodeInto(text: string, out: number[]): void {
    const s = text.normalize('NFC').replace(LONE_SURROGATE, '\uFFFD');
    let chunkStart = 0;
    let search = 0;
    for (;;) {
      const open = s.indexOf('<|', search);
      if (open < 0) break;
      const close = s.indexOf('|>', open + 2);
      if (close < 0) break;
      const id = this.specialIds.get(s.slice(open, close + 2));
      if (id === undefined) {
        search = open + 1;
        continue;
      }
      this.encodeOrdinaryInto(s, chunkStart, open, out);
      out.push(id);
      chunkStart = search = close + 2;
    }
    this.encodeOrdinaryInto(s, chunkStart, s.length, out);
  }

  /** BPE-encodes text with no special-token matching and no normalization. */
  encodeOrdinary(text: string): number[] {
    const out: number[] = [];
    this.encodeOrdinaryInto(text, 0, text.length, out);
    return out;
  }

  private encodeOrdinaryInto(s: string, start: number, end: number, out: number[]): void {
    if (start >= end) return;
    const chunk = start === 0 && end === s.length ? s : s.slice(start, end);
    const re = splitRegex();
    for (let m = re.exec(chunk); m !== null; m = re.exec(chunk)) {
      const piece = m[0];
      this.bpe.encodePiece(isAscii(piece) ? piece : Buffer.from(piece, 'utf8').toString('latin1'), out);
    }
  }

  /** ids → text; invalid UTF-8 becomes U+FFFD (Python's errors="replace"); a leading BOM is kept. */
  decode(ids: ArrayLike<number>, opts: DecodeOptions = {}): string {
    return this.oneShotDecoder.decode(this.decodeBytes(ids, opts));
  }

  /** Concatenated bytes of `ids` (specials as their literal strings unless skipped). */
  decodeBytes(ids: ArrayLike<number>, opts: DecodeOptions = {}): Uint8Array {
    const parts: Uint8Array[] = [];
    let length = 0;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (opts.skipSpecialTokens && id >= this.numRegular && id < this.vocabSize) continue;
      const b = this.tokenBytes(id);
      parts.push(b);
      length += b.length;
    }
    const out = new Uint8Array(length);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /** A streaming detokenizer for one sequence. */
  stream(opts: DecodeOptions = {}): StreamDetokenizer {
    return new StreamDetokenizer(this, opts);
  }
}
