// Qwen's pre-tokenizer split pattern (docs/model.md, "Pre-split pattern"), made exact for JavaScript: the reference
// runs it on Rust's fancy-regex, where \s is Unicode White_Space (JS's \s adds U+FEFF and lacks U+0085) and (?i:'s)
// also matches U+017F (ſ) through case folding.
//
// Reference: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
const WS = '\\p{White_Space}';
const NOT_WS = '\\P{White_Space}';

export const SPLIT_PATTERN = [
  "'[sS\\u017F]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]",
  '[^\\r\\n\\p{L}\\p{N}]?\\p{L}+',
  '\\p{N}',
  ` ?[^${WS}\\p{L}\\p{N}]+[\\r\\n]*`,
  `${WS}*[\\r\\n]+`,
  `${WS}+(?!${NOT_WS})`,
  `${WS}+`,
].join('|');

/** A fresh global regex (callers iterate with lastIndex, so each encode gets its own or resets it). */
export function splitRegex(): RegExp {
  return new RegExp(SPLIT_PATTERN, 'gu');
}

/** The pre-split pieces of a text without special tokens (for tests and tools). */
export function splitPieces(text: string): string[] {
  return Array.from(text.matchAll(splitRegex()), (m) => m[0]);
}
