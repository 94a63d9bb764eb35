// Validation of a Generate request (a plain object as @grpc/proto-loader gives it with keepCase false and
// defaults false, so unset `optional` fields are undefined). Every refusal is an InvalidArgumentError naming the
// proto field and the limit. Defaults are Emu3-Chat's (docs/model.md, "Understanding (Emu3-Chat)"): greedy, at most 1024 new tokens, stop at eos;
// for TASK_GENERATE_IMAGE upstream's generation defaults (temperature 1, top_k 2048, guidance 3.0, "1:1").
import { generationGrid, parseRatio, RatioError, type TokenGrid } from '../../lib/prompt/generation-size.js';
import { imageLayoutLength } from '../../lib/prompt/layout.js';
import { CFG_NEGATIVE_PROMPT } from '../../lib/prompt/prompt.js';
import { InvalidArgumentError } from './errors.js';

export interface GenerateRequestLike {
  parts?: Array<{ text?: string | null; image?: { data?: Uint8Array | null; mimeType?: string | null } | null }> | null;
  task?: string | number | null;
  sampling?: {
    temperature?: number | null;
    topK?: number | null;
    topP?: number | null;
    minP?: number | null;
    repetitionPenalty?: number | null;
    seed?: number | string | null;
    maxNewTokens?: number | null;
    stop?: string[] | null;
    ignoreEos?: boolean | null;
  } | null;
  requestId?: string | null;
  returnTokenIds?: boolean | null;
  topLogprobs?: number | null;
  image?: {
    ratio?: string | null;
    width?: number | null;
    height?: number | null;
    guidanceScale?: number | null;
    negativePrompt?: string | null;
    qualitySuffix?: boolean | null;
    returnCodes?: boolean | null;
    previewRows?: boolean | null;
  } | null;
}

/** A validated TASK_GENERATE_IMAGE request's image fields. */
export interface ValidImage {
  grid: TokenGrid;
  guidanceScale: number;
  negativePrompt: string;
  qualitySuffix: boolean;
  returnCodes: boolean;
  /** Each progress message carries the row's codes. */
  previewRows: boolean;
}

export type ValidPart = { kind: 'text'; text: string } | { kind: 'image'; data: Uint8Array; mimeType: string };

export interface ValidSampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  /** null: the coordinator picks one (and may report it). */
  seed: number | null;
  maxNewTokens: number;
  /** false when maxNewTokens is the default (then it is shortened to fit the context instead of refused). */
  maxNewTokensExplicit: boolean;
  stop: string[];
  ignoreEos: boolean;
}

export interface ValidRequest {
  parts: ValidPart[];
  task: 'understand' | 'generate';
  /** Set for task 'generate'. */
  image: ValidImage | null;
  sampling: ValidSampling;
  requestId: string;
  returnTokenIds: boolean;
  topLogprobs: number;
}

export interface RequestLimits {
  /** Model context (max_position_embeddings): prompt + new tokens must fit. */
  contextLength: number;
  maxImages: number;
  maxImageBytes: number;
  /** Characters over all text parts. */
  maxTextChars: number;
  maxStopStrings: number;
  maxStopChars: number;
  maxTopLogprobs: number;
  /** Largest top_k (the candidates the last stage can return). */
  maxTopK: number;
  maxRequestIdChars: number;
  /** The model's image_area (config.json); null when the model does not generate images. */
  imageArea: number | null;
  /** Most codes in a generated grid (the VQ service's max_codes). */
  maxImageCodes: number;
  maxNegativePromptChars: number;
}

export const genDefaults = {
  temperature: 1,
  topK: 2048,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
  guidanceScale: 3,
  ratio: '1:1',
} as const;

export const MAX_GUIDANCE_SCALE = 100;
export const MAX_RATIO_SIDE = 100;
export const MAX_ASPECT = 5;
/** Upstream's layout constraint breaks for 1 or 2 columns (an eol lands where eoi or eos belongs). */
export const MIN_GRID_COLUMNS = 3;
const IMG_TOKEN_TEXT = '<|image token|>';

export const chatDefaults = {
  temperature: 0,
  topK: 0,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
  maxNewTokens: 1024,
} as const;

export const defaultLimits: RequestLimits = {
  contextLength: 9216,
  maxImages: 4,
  maxImageBytes: 20 * 1024 * 1024,
  maxTextChars: 32768,
  maxStopStrings: 8,
  maxStopChars: 64,
  maxTopLogprobs: 20,
  maxTopK: 2048,
  maxRequestIdChars: 128,
  imageArea: null,
  maxImageCodes: 16384,
  maxNegativePromptChars: 4096,
};

/**
 * The last stage receives temperature and repetition penalty as float32 and computes, in float32, positive logits ÷
 * penalty (negative ones × penalty) and then ÷ temperature. Below these minima a value narrows to a float32
 * subnormal or 0 (1e-46 → 0, which the shard reads as "off") or the quotient overflows to ±inf (NaN logprobs):
 * with both at their minimum, a logit of magnitude up to 3.4e26 still scales to a finite float32 (3.4e38 is the
 * largest), far beyond any real logit. At 1e-6 the draw is already greedy for any logit gap above 1e-5.
 */
export const MIN_TEMPERATURE = 1e-6;
export const MAX_TEMPERATURE = 100;
export const MIN_REPETITION_PENALTY = 1e-6;
export const MAX_REPETITION_PENALTY = 10;
/** The seed is a uint32 on the wire and seeds a 32-bit generator. */
export const MAX_SEED = 0xffffffff;

const taskNames: Record<string, number> = { TASK_UNSPECIFIED: 0, TASK_UNDERSTAND: 1, TASK_GENERATE_IMAGE: 2 };

function isSet<T>(v: T | null | undefined): v is T {
  return v !== undefined && v !== null;
}

function bad(field: string, message: string): never {
  throw new InvalidArgumentError(field, message);
}

function integerIn(field: string, v: number, lo: number, hi: number): number {
  if (!Number.isInteger(v) || v < lo || v > hi) bad(field, `${v} must be an integer in [${lo}, ${hi}]`);
  return v;
}

function validateParts(req: GenerateRequestLike, limits: RequestLimits): ValidPart[] {
  const parts = req.parts ?? [];
  if (parts.length === 0) bad('parts', 'at least one part (text or image) is required');
  const out: ValidPart[] = [];
  let images = 0;
  let chars = 0;
  parts.forEach((p, i) => {
    const hasText = isSet(p.text);
    const hasImage = isSet(p.image);
    if (hasText === hasImage) bad(`parts[${i}]`, 'must hold exactly one of text or image');
    if (hasText) {
      chars += p.text!.length;
      if (chars > limits.maxTextChars) bad('parts[].text', `text totals more than ${limits.maxTextChars} characters`);
      out.push({ kind: 'text', text: p.text! });
      return;
    }
    const data = p.image!.data;
    if (!data || data.length === 0) bad(`parts[${i}].image.data`, 'is empty');
    if (data.length > limits.maxImageBytes)
      bad(`parts[${i}].image.data`, `${data.length} bytes is more than the limit of ${limits.maxImageBytes} bytes`);
    const mimeType = p.image!.mimeType ?? '';
    if (mimeType !== '' && !/^image\/[\w.+-]+$/.test(mimeType))
      bad(`parts[${i}].image.mime_type`, `"${mimeType}" is not an image/* type`);
    images++;
    if (images > limits.maxImages) bad('parts', `more than ${limits.maxImages} images (limit ${limits.maxImages})`);
    out.push({ kind: 'image', data, mimeType });
  });
  return out;
}

function validateTask(task: GenerateRequestLike['task'], limits: RequestLimits): 'understand' | 'generate' {
  const n = !isSet(task) ? 0 : typeof task === 'number' ? task : taskNames[task];
  if (n === 0 || n === 1) return 'understand';
  if (n === 2) {
    if (limits.imageArea === null)
      bad('task', 'TASK_GENERATE_IMAGE: this model does not generate images (its config.json has no image_area)');
    return 'generate';
  }
  return bad(
    'task',
    `unknown task ${JSON.stringify(task)} (allowed: TASK_UNSPECIFIED, TASK_UNDERSTAND, TASK_GENERATE_IMAGE)`,
  );
}

/** The grid of an image request from its ratio or its pixel size (upstream's calculate_generate_size). */
function imageGrid(img: NonNullable<GenerateRequestLike['image']>, limits: RequestLimits): TokenGrid {
  const area = limits.imageArea!;
  const hasRatio = isSet(img.ratio) && img.ratio !== '';
  const hasSize = (img.width ?? 0) !== 0 || (img.height ?? 0) !== 0;
  if (hasRatio && hasSize) bad('image.ratio', 'give either ratio or width and height, not both');
  let ratio: string = genDefaults.ratio;
  let pixels = area;
  let field = 'image.ratio';
  if (hasSize) {
    field = 'image.width';
    const w = img.width ?? 0;
    const h = img.height ?? 0;
    if (w === 0 || h === 0) bad(w === 0 ? 'image.width' : 'image.height', 'width and height go together');
    integerIn('image.width', w, 8, 4096);
    integerIn('image.height', h, 8, 4096);
    const g = gcd(w, h);
    ratio = `${w / g}:${h / g}`;
    pixels = w * h;
  } else if (hasRatio) ratio = img.ratio!;
  let wh: { w: number; h: number };
  try {
    wh = parseRatio(ratio);
  } catch (err) {
    return bad(field, (err as Error).message);
  }
  if (!hasSize && (wh.w > MAX_RATIO_SIDE || wh.h > MAX_RATIO_SIDE))
    bad(field, `"${ratio}": W and H must be at most ${MAX_RATIO_SIDE}`);
  const aspect = Math.max(wh.w, wh.h) / Math.min(wh.w, wh.h);
  if (aspect > MAX_ASPECT) bad(field, `"${ratio}": aspect ratio ${aspect.toFixed(3)} exceeds the limit ${MAX_ASPECT}`);
  let grid: TokenGrid;
  try {
    grid = generationGrid(ratio, pixels);
  } catch (err) {
    if (err instanceof RatioError) return bad(field, err.message);
    throw err;
  }
  if (grid.width < MIN_GRID_COLUMNS)
    bad(field, `"${ratio}" gives a ${grid.height}x${grid.width} grid: at least ${MIN_GRID_COLUMNS} columns are needed`);
  if (grid.height * grid.width > limits.maxImageCodes)
    bad(
      field,
      `"${ratio}" gives a ${grid.height}x${grid.width} grid, more than the ${limits.maxImageCodes} codes the VQ decodes`,
    );
  if (imageLayoutLength(grid) >= limits.contextLength)
    bad(
      field,
      `"${ratio}" gives a ${grid.height}x${grid.width} grid of ${imageLayoutLength(grid)} tokens, more than the ` +
        `context of ${limits.contextLength}`,
    );
  return grid;
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

function validateImage(req: GenerateRequestLike, parts: ValidPart[], limits: RequestLimits): ValidImage {
  parts.forEach((p, i) => {
    if (p.kind !== 'text') bad(`parts[${i}]`, 'TASK_GENERATE_IMAGE takes text parts only');
    if (p.text.includes(IMG_TOKEN_TEXT))
      bad(`parts[${i}].text`, `must not contain ${IMG_TOKEN_TEXT} (it would move the image layout)`);
  });
  const img = req.image ?? {};
  const grid = imageGrid(img, limits);
  const guidanceScale = img.guidanceScale ?? genDefaults.guidanceScale;
  if (!(guidanceScale >= 0 && guidanceScale <= MAX_GUIDANCE_SCALE))
    bad('image.guidance_scale', `${guidanceScale} must be in [0, ${MAX_GUIDANCE_SCALE}] (upstream 3.0)`);
  const negativePrompt = img.negativePrompt ?? CFG_NEGATIVE_PROMPT;
  if (negativePrompt.length > limits.maxNegativePromptChars)
    bad('image.negative_prompt', `is longer than ${limits.maxNegativePromptChars} characters`);
  if (negativePrompt.includes(IMG_TOKEN_TEXT))
    bad('image.negative_prompt', `must not contain ${IMG_TOKEN_TEXT} (it would move the image layout)`);
  const s = req.sampling ?? {};
  if (isSet(s.maxNewTokens) && s.maxNewTokens !== 0)
    bad('sampling.max_new_tokens', 'does not apply to TASK_GENERATE_IMAGE (the layout fixes the length)');
  if ((s.stop ?? []).length > 0) bad('sampling.stop', 'does not apply to TASK_GENERATE_IMAGE');
  if (s.ignoreEos) bad('sampling.ignore_eos', 'does not apply to TASK_GENERATE_IMAGE');
  if (isSet(s.repetitionPenalty) && s.repetitionPenalty !== 1)
    bad('sampling.repetition_penalty', 'does not apply to TASK_GENERATE_IMAGE (must be unset or 1)');
  if ((req.topLogprobs ?? 0) !== 0) bad('top_logprobs', 'must be 0 for TASK_GENERATE_IMAGE');
  return {
    grid,
    guidanceScale,
    negativePrompt,
    qualitySuffix: img.qualitySuffix ?? true,
    returnCodes: img.returnCodes ?? false,
    previewRows: img.previewRows ?? false,
  };
}

interface SamplingDefaults {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
}

function validateSampling(
  s: NonNullable<GenerateRequestLike['sampling']>,
  limits: RequestLimits,
  defaults: SamplingDefaults = chatDefaults,
): ValidSampling {
  const f = (name: string) => `sampling.${name}`;
  const requested = s.temperature ?? defaults.temperature;
  const temperature = requested === 0 ? 0 : requested; // -0 is greedy too
  if (temperature !== 0 && !(temperature >= MIN_TEMPERATURE && temperature <= MAX_TEMPERATURE))
    bad(
      f('temperature'),
      `${temperature} must be 0 (greedy) or in [${MIN_TEMPERATURE.toExponential()}, ${MAX_TEMPERATURE}] ` +
        '(the last stage divides float32 logits by it: smaller values vanish or overflow in float32)',
    );
  const topK = integerIn(f('top_k'), s.topK ?? Math.min(defaults.topK, limits.maxTopK), 0, limits.maxTopK);
  const topP = s.topP ?? defaults.topP;
  if (!(topP > 0 && topP <= 1)) bad(f('top_p'), `${topP} must be in (0, 1]`);
  const minP = s.minP ?? defaults.minP;
  if (!(minP >= 0 && minP <= 1)) bad(f('min_p'), `${minP} must be in [0, 1]`);
  const repetitionPenalty = s.repetitionPenalty ?? defaults.repetitionPenalty;
  if (!(repetitionPenalty >= MIN_REPETITION_PENALTY && repetitionPenalty <= MAX_REPETITION_PENALTY))
    bad(
      f('repetition_penalty'),
      `${repetitionPenalty} must be in [${MIN_REPETITION_PENALTY.toExponential()}, ${MAX_REPETITION_PENALTY}] (1 = off; ` +
        'the last stage divides float32 logits by it: smaller values vanish or overflow in float32)',
    );
  const seed = isSet(s.seed) ? integerIn(f('seed'), Number(s.seed), 0, MAX_SEED) : null;
  const maxNew = limits.contextLength - 1;
  const maxNewTokensExplicit = isSet(s.maxNewTokens) && s.maxNewTokens !== 0;
  const maxNewTokens = maxNewTokensExplicit
    ? integerIn(f('max_new_tokens'), s.maxNewTokens!, 1, maxNew)
    : Math.min(chatDefaults.maxNewTokens, maxNew);
  const stop = s.stop ?? [];
  if (stop.length > limits.maxStopStrings)
    bad(f('stop'), `${stop.length} stop strings, limit ${limits.maxStopStrings}`);
  stop.forEach((x, i) => {
    if (x.length === 0) bad(`sampling.stop[${i}]`, 'is empty');
    if (x.length > limits.maxStopChars) bad(`sampling.stop[${i}]`, `is longer than ${limits.maxStopChars} characters`);
  });
  return {
    temperature,
    topK,
    topP,
    minP,
    repetitionPenalty,
    seed,
    maxNewTokens,
    maxNewTokensExplicit,
    stop: [...stop],
    ignoreEos: s.ignoreEos ?? false,
  };
}

/** Checks everything that can be checked before the prompt is built; throws InvalidArgumentError. */
export function validateGenerateRequest(req: GenerateRequestLike, limits: RequestLimits = defaultLimits): ValidRequest {
  const parts = validateParts(req, limits);
  const task = validateTask(req.task, limits);
  if (task !== 'generate' && isSet(req.image)) bad('image', 'is for TASK_GENERATE_IMAGE only');
  const image = task === 'generate' ? validateImage(req, parts, limits) : null;
  const sampling = validateSampling(req.sampling ?? {}, limits, task === 'generate' ? genDefaults : chatDefaults);
  const requestId = req.requestId ?? '';
  if (requestId.length > limits.maxRequestIdChars)
    bad('request_id', `is longer than ${limits.maxRequestIdChars} characters`);
  const topLogprobs = integerIn('top_logprobs', req.topLogprobs ?? 0, 0, limits.maxTopLogprobs);
  return { parts, task, image, sampling, requestId, returnTokenIds: req.returnTokenIds ?? false, topLogprobs };
}

/** An image's two prompts and its layout must fit the context (each sequence holds its prompt and the layout). */
export function checkImagePromptLength(prompt: number, negative: number, grid: TokenGrid, contextLength: number): void {
  const layout = imageLayoutLength(grid);
  const longest = Math.max(prompt, negative);
  if (longest + layout > contextLength)
    bad(
      prompt >= negative ? 'parts' : 'image.negative_prompt',
      `the ${prompt >= negative ? 'prompt' : 'negative prompt'} is ${longest} tokens; with the ${grid.height}x${grid.width} ` +
        `image's ${layout} tokens that exceeds the context of ${contextLength}`,
    );
}

/**
 * Once the prompt is built: it must leave room for at least one new token, and an explicit max_new_tokens must fit
 * beside it (a default one is shortened to fit). Returns the max_new_tokens to use.
 */
export function checkPromptLength(promptTokens: number, sampling: ValidSampling, contextLength: number): number {
  if (promptTokens >= contextLength)
    bad(
      'parts',
      `the prompt is ${promptTokens} tokens, the context holds ${contextLength} (prompt + at least 1 new token)`,
    );
  const room = contextLength - promptTokens;
  if (sampling.maxNewTokens <= room) return sampling.maxNewTokens;
  if (sampling.maxNewTokensExplicit)
    bad(
      'sampling.max_new_tokens',
      `${sampling.maxNewTokens} new tokens after a ${promptTokens}-token prompt exceed the context of ${contextLength} tokens (at most ${room})`,
    );
  return room;
}
