export { generationGrid, parseRatio, RatioError, type TokenGrid } from './generation-size.js';
export { type AllowedTokens, imageLayoutAllowed, imageLayoutLength, type LayoutIds, layoutIds } from './layout.js';
export {
  CFG_NEGATIVE_PROMPT,
  CHAT_ASSISTANT_SUFFIX,
  CHAT_SYSTEM_PREFIX,
  type CodeGrid,
  GENERATION_QUALITY_SUFFIX,
  type GenerationOptions,
  generationPromptIds,
  generationPrompts,
  negativePromptIds,
  type UnderstandingOptions,
  understandingPromptIds,
} from './prompt.js';
export { ImageSizeError, pythonRound, type SmartResizeOptions, smartResize } from './smart-resize.js';
