// Public surface of the tokenizer. (files.ts, which writes tokenizer files, is deliberately not re-exported.)
export { checkTokenizerAgainstConfig, loadTokenizer } from './load.js';
export { SPLIT_PATTERN, splitPieces } from './pretokenize.js';
export {
  ROLE_STRINGS,
  type Role,
  SPECIAL_START_ID,
  TIKTOKEN_FILE,
  VISION_TOKENS_FILE,
  VISUAL_TOKEN_COUNT,
  visualTokenString,
} from './specials.js';
export { StreamDetokenizer } from './stream.js';
export { type DecodeOptions, Emu3Tokenizer, parseTiktokenRanks, type RoleIds, type VisualRange } from './tokenizer.js';
