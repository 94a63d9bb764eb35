// Emu3 prompts built directly as token ids (docs/model.md, "Prompt formats"). The reference formats one string and
// tokenizes it; tiktoken splits at special tokens first, so encoding each run of ordinary text between specials and
// splicing in the special ids gives the same ids. Adjacent text parts are joined before encoding so the pre-split
// pattern sees exactly the text the reference sees.
import type { Emu3Tokenizer } from '../tokenizer/tokenizer.js';
import type { TokenGrid } from './generation-size.js';

export const CHAT_SYSTEM_PREFIX = 'You are a helpful assistant. USER: ';
export const CHAT_ASSISTANT_SUFFIX = '. ASSISTANT:';
export const GENERATION_QUALITY_SUFFIX = ' masterpiece, film grained, best quality.';
export const CFG_NEGATIVE_PROMPT =
  'lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, ' +
  'low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.';

/** A VQ code grid: `codes` row-major, length height × width, each in 0..32767. */
export interface CodeGrid {
  height: number;
  width: number;
  codes: ArrayLike<number>;
}

/** Text parts are encoded (after joining neighbours); number[] parts are spliced in as ids. */
type Part = string | number[];

function assemble(tok: Emu3Tokenizer, parts: Part[]): number[] {
  const out: number[] = [];
  let text = '';
  for (const p of parts) {
    if (typeof p === 'string') {
      text += p;
      continue;
    }
    if (text) tok.encodeInto(text, out);
    text = '';
    for (let i = 0; i < p.length; i++) out.push(p[i]);
  }
  if (text) tok.encodeInto(text, out);
  return out;
}

function checkGrid(grid: { height: number; width: number }, what: string): void {
  if (!Number.isInteger(grid.height) || !Number.isInteger(grid.width) || grid.height < 1 || grid.width < 1) {
    throw new RangeError(`${what}: grid ${grid.height}x${grid.width} must have positive integer sides`);
  }
}

/** boi, "H*W", img: the image prefix shared by understanding blocks and generation prompts. */
function imagePrefix(tok: Emu3Tokenizer, grid: { height: number; width: number }): Part[] {
  return [[tok.roles.boi], `${grid.height}*${grid.width}`, [tok.roles.img]];
}

/** Ids of one image block: boi "h*w" img, each row's visual ids followed by eol, then eof eoi. */
function imageBlockParts(tok: Emu3Tokenizer, grid: CodeGrid, what = 'image'): Part[] {
  checkGrid(grid, what);
  const { height, width, codes } = grid;
  if (codes.length !== height * width) {
    throw new RangeError(`${what}: ${codes.length} codes for a ${height}x${width} grid (need ${height * width})`);
  }
  const { eol, eof, eoi } = tok.roles;
  const body: number[] = new Array(height * (width + 1) + 2);
  let at = 0;
  for (let r = 0; r < height; r++) {
    for (let c = 0; c < width; c++) {
      const code = codes[r * width + c];
      if (!Number.isInteger(code) || code < 0 || code >= tok.visual.count) {
        throw new RangeError(`${what}: code ${code} at row ${r}, column ${c} outside 0..${tok.visual.count - 1}`);
      }
      body[at++] = tok.visual.start + code;
    }
    body[at++] = eol;
  }
  body[at++] = eof;
  body[at++] = eoi;
  return [...imagePrefix(tok, grid), body];
}

export interface UnderstandingOptions {
  /** 'chat' (Emu3-Chat): system text, USER:, ". ASSISTANT:". 'plain' (Emu3-Stage1): images then text. */
  template?: 'chat' | 'plain';
}

/**
 * Emu3-Chat prompt: bos + "You are a helpful assistant. USER: " + image blocks (in order) + text + ". ASSISTANT:".
 * The text may contain special-token strings; like the reference, they become special ids.
 */
export function understandingPromptIds(
  tok: Emu3Tokenizer,
  text: string,
  images: readonly CodeGrid[],
  opts: UnderstandingOptions = {},
): number[] {
  const chat = (opts.template ?? 'chat') === 'chat';
  const parts: Part[] = [[tok.roles.bos]];
  if (chat) parts.push(CHAT_SYSTEM_PREFIX);
  images.forEach((img, i) => {
    parts.push(...imageBlockParts(tok, img, `image ${i}`));
  });
  parts.push(text);
  if (chat) parts.push(CHAT_ASSISTANT_SUFFIX);
  return assemble(tok, parts);
}

export interface GenerationOptions {
  /** Append " masterpiece, film grained, best quality." to the user text, as the reference demos do. Default true. */
  qualitySuffix?: boolean;
  /** The CFG negative prompt text. Default CFG_NEGATIVE_PROMPT. */
  negativePrompt?: string;
}

/** Emu3-Gen prompt: bos + text + boi + "H*W" + img (no chat template). */
export function generationPromptIds(
  tok: Emu3Tokenizer,
  text: string,
  grid: TokenGrid,
  opts: GenerationOptions = {},
): number[] {
  checkGrid(grid, 'generation');
  const body = (opts.qualitySuffix ?? true) ? text + GENERATION_QUALITY_SUFFIX : text;
  return assemble(tok, [[tok.roles.bos], body, ...imagePrefix(tok, grid)]);
}

/** The CFG unconditional prompt: bos + negative text + the same image prefix. */
export function negativePromptIds(tok: Emu3Tokenizer, grid: TokenGrid, opts: GenerationOptions = {}): number[] {
  checkGrid(grid, 'generation');
  return assemble(tok, [[tok.roles.bos], opts.negativePrompt ?? CFG_NEGATIVE_PROMPT, ...imagePrefix(tok, grid)]);
}

/** Both prompts of a CFG generation request. */
export function generationPrompts(
  tok: Emu3Tokenizer,
  text: string,
  grid: TokenGrid,
  opts: GenerationOptions = {},
): { prompt: number[]; negative: number[] } {
  return { prompt: generationPromptIds(tok, text, grid, opts), negative: negativePromptIds(tok, grid, opts) };
}
