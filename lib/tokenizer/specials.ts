// Emu3's special tokens and their numbering (docs/model.md, "Special tokens and ids").

export const TIKTOKEN_FILE = 'emu3.tiktoken';
export const VISION_TOKENS_FILE = 'emu3_vision_tokens.txt';

/** Regular (BPE) tokens are ids 0..SPECIAL_START_ID-1; specials follow consecutively. */
export const SPECIAL_START_ID = 151643;
export const EXTRA_TOKEN_COUNT = 205;
export const VISUAL_TOKEN_COUNT = 32768;

export const ROLE_STRINGS = {
  pad: '<|endoftext|>',
  bos: '<|extra_203|>',
  eos: '<|extra_204|>',
  eol: '<|extra_200|>',
  eof: '<|extra_201|>',
  img: '<|image token|>',
  boi: '<|image start|>',
  eoi: '<|image end|>',
} as const;

export type Role = keyof typeof ROLE_STRINGS;

export const VISUAL_TOKEN_PATTERN = /^<\|visual token (\d+)\|>$/;

export function visualTokenString(code: number): string {
  return `<|visual token ${String(code).padStart(6, '0')}|>`;
}

/** Special-token strings in id order: endoftext, im_start, im_end, extra_0..204, then the vision-token file. */
export function specialTokenStrings(visionTokenLines: readonly string[]): string[] {
  const out = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'];
  for (let i = 0; i < EXTRA_TOKEN_COUNT; i++) out.push(`<|extra_${i}|>`);
  out.push(...visionTokenLines);
  return out;
}

/** Lines of emu3_vision_tokens.txt as the reference reads them: stripped, empty lines skipped. */
export function parseVisionTokenLines(text: string): string[] {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
}
