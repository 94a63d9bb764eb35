// Validation of a Generate request (a plain object as @grpc/proto-loader gives it with keepCase false and
// defaults false, so unset `optional` fields are undefined). Every refusal is an InvalidArgumentError naming the
// proto field and the limit. Defaults are Emu3-Chat's (docs/model.md, "Understanding (Emu3-Chat)"): greedy, at most 1024 new tokens, stop at eos.
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
  task: 'understand';
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
}

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

function validateTask(task: GenerateRequestLike['task']): 'understand' {
  const n = !isSet(task) ? 0 : typeof task === 'number' ? task : taskNames[task];
  if (n === 0 || n === 1) return 'understand';
  if (n === 2) bad('task', 'TASK_GENERATE_IMAGE is not supported yet (only TASK_UNDERSTAND)');
  return bad('task', `unknown task ${JSON.stringify(task)} (allowed: TASK_UNSPECIFIED, TASK_UNDERSTAND)`);
}

function validateSampling(s: NonNullable<GenerateRequestLike['sampling']>, limits: RequestLimits): ValidSampling {
  const f = (name: string) => `sampling.${name}`;
  const requested = s.temperature ?? chatDefaults.temperature;
  const temperature = requested === 0 ? 0 : requested; // -0 is greedy too
  if (temperature !== 0 && !(temperature >= MIN_TEMPERATURE && temperature <= MAX_TEMPERATURE))
    bad(
      f('temperature'),
      `${temperature} must be 0 (greedy) or in [${MIN_TEMPERATURE.toExponential()}, ${MAX_TEMPERATURE}] ` +
        '(the last stage divides float32 logits by it: smaller values vanish or overflow in float32)',
    );
  const topK = integerIn(f('top_k'), s.topK ?? chatDefaults.topK, 0, limits.maxTopK);
  const topP = s.topP ?? chatDefaults.topP;
  if (!(topP > 0 && topP <= 1)) bad(f('top_p'), `${topP} must be in (0, 1]`);
  const minP = s.minP ?? chatDefaults.minP;
  if (!(minP >= 0 && minP <= 1)) bad(f('min_p'), `${minP} must be in [0, 1]`);
  const repetitionPenalty = s.repetitionPenalty ?? chatDefaults.repetitionPenalty;
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
  const task = validateTask(req.task);
  const sampling = validateSampling(req.sampling ?? {}, limits);
  const requestId = req.requestId ?? '';
  if (requestId.length > limits.maxRequestIdChars)
    bad('request_id', `is longer than ${limits.maxRequestIdChars} characters`);
  const topLogprobs = integerIn('top_logprobs', req.topLogprobs ?? 0, 0, limits.maxTopLogprobs);
  return { parts, task, sampling, requestId, returnTokenIds: req.returnTokenIds ?? false, topLogprobs };
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
