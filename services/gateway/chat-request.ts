// POST /v1/chat/completions body → emu3.v1.GenerateRequest. Pure: no I/O.
//
// The Generate API carries one user turn under Emu3-Chat's fixed template (bos, "You are a helpful assistant.
// USER: ", the images, the text, ". ASSISTANT:"), so:
// * system (or developer) messages are accepted only when their text is that fixed system prompt; any other would
//   be silently lost, so it is refused;
// * consecutive user messages form that one turn: their parts in order, a "\n" between messages (the coordinator
//   places every image before the text, as the template does);
// * assistant, tool and function messages (multi-turn history, tool results) cannot be expressed and are refused.
import { CHAT_SYSTEM_PREFIX } from '../../lib/prompt/prompt.js';
import { parseImageUrl } from './data-url.js';
import { modelNotFound } from './errors.js';
import type { GeneratePart, GenerateRequestMessage, GenerateSampling } from './generate-request.js';
import {
  invalid,
  isObject,
  type JsonObject,
  onlyDefault,
  optionalBoolean,
  optionalInteger,
  optionalNumber,
  optionalString,
  refuseUnknownKeys,
} from './json-fields.js';

/** The system prompt the Generate API always uses: "You are a helpful assistant." */
export const BUILT_IN_SYSTEM_PROMPT = CHAT_SYSTEM_PREFIX.replace(/\s*USER:\s*$/, '');

/** Most alternatives per token OpenAI allows (and the coordinator's default max_top_logprobs). */
export const MAX_TOP_LOGPROBS = 20;

export interface ChatPlan {
  request: GenerateRequestMessage;
  /** The model named in the answer (the served one). */
  model: string;
  stream: boolean;
  /** stream_options.include_usage: a last chunk with usage and no choices. */
  includeUsage: boolean;
  /** null: no logprobs; else the alternatives to return per token (0 = only the chosen token's logprob). */
  logprobs: { top: number } | null;
  /** The OpenAI parameter that a proto field named in a coordinator refusal came from (null: none). */
  paramOf(protoField: string): string | null;
}

export interface ChatContext {
  /** GetModelInfo.model_name: a request naming another model is answered 404. */
  servedModel: string;
  /** Sent as GenerateRequest.request_id (the completion's id). */
  requestId: string;
}

const MAPPED = [
  'model',
  'messages',
  'stream',
  'stream_options',
  'max_tokens',
  'max_completion_tokens',
  'temperature',
  'top_p',
  'seed',
  'stop',
  'n',
  'logprobs',
  'top_logprobs',
  // vLLM's extensions, which the Generate API has exactly.
  'top_k',
  'min_p',
  'repetition_penalty',
  'ignore_eos',
];
/** Accepted and ignored: they change nothing the model computes. */
const IGNORED = ['user', 'metadata', 'service_tier', 'safety_identifier', 'prompt_cache_key', 'parallel_tool_calls'];
/** Accepted only at their "off" value (checked below). */
const OFF_ONLY = [
  'store',
  'frequency_penalty',
  'presence_penalty',
  'logit_bias',
  'tools',
  'tool_choice',
  'functions',
  'function_call',
  'response_format',
  'modalities',
  'audio',
  'prediction',
  'reasoning_effort',
  'web_search_options',
  'verbosity',
];
const KNOWN = new Set([...MAPPED, ...IGNORED, ...OFF_ONLY]);

const SAMPLING_PARAMS: Record<string, string> = {
  temperature: 'temperature',
  top_k: 'top_k',
  top_p: 'top_p',
  min_p: 'min_p',
  repetition_penalty: 'repetition_penalty',
  seed: 'seed',
  ignore_eos: 'ignore_eos',
};

function refuseUnsupported(body: JsonObject): void {
  const empty = (v: unknown) => (Array.isArray(v) && v.length === 0) || (isObject(v) && Object.keys(v).length === 0);
  onlyDefault(body, 'store', (v) => v === false, 'nothing is stored by this server');
  onlyDefault(
    body,
    'frequency_penalty',
    (v) => v === 0,
    'the Generate API has no frequency penalty (repetition_penalty, a multiplicative HF penalty, is an extension)',
  );
  onlyDefault(
    body,
    'presence_penalty',
    (v) => v === 0,
    'the Generate API has no presence penalty (repetition_penalty, a multiplicative HF penalty, is an extension)',
  );
  onlyDefault(body, 'logit_bias', empty, 'the Generate API has no logit bias');
  onlyDefault(body, 'tools', empty, 'Emu3-Chat has no tool calling');
  onlyDefault(body, 'functions', empty, 'Emu3-Chat has no function calling');
  onlyDefault(body, 'tool_choice', (v) => v === 'none', 'Emu3-Chat has no tool calling');
  onlyDefault(body, 'function_call', (v) => v === 'none', 'Emu3-Chat has no function calling');
  onlyDefault(
    body,
    'response_format',
    (v) => isObject(v) && v.type === 'text' && Object.keys(v).length === 1,
    'only {"type": "text"}: the Generate API has no constrained (JSON) decoding',
  );
  onlyDefault(
    body,
    'modalities',
    (v) => Array.isArray(v) && v.length === 1 && v[0] === 'text',
    'answers are text only',
  );
  for (const key of ['audio', 'prediction', 'reasoning_effort', 'web_search_options', 'verbosity'])
    onlyDefault(body, key, () => false, 'the Generate API has no such option');
}

/** The text of a system message: a string, or text parts only. */
function systemText(content: unknown, param: string): string {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) invalid(param, 'must be a string or an array of text parts');
  return content
    .map((p, j) => {
      if (!isObject(p) || p.type !== 'text' || typeof p.text !== 'string')
        invalid(`${param}[${j}]`, 'a system message may hold only text parts');
      return p.text;
    })
    .join('');
}

interface PartsOut {
  parts: GeneratePart[];
  /** For each part, the OpenAI parameter it came from. */
  origins: string[];
}

function userParts(content: unknown, param: string, out: PartsOut): void {
  if (typeof content === 'string') {
    out.parts.push({ text: content });
    out.origins.push(param);
    return;
  }
  if (!Array.isArray(content)) invalid(param, 'must be a string or an array of content parts');
  if (content.length === 0) invalid(param, 'has no content parts');
  content.forEach((p, j) => {
    const at = `${param}[${j}]`;
    if (!isObject(p)) invalid(at, 'must be an object with a "type"');
    if (p.type === 'text') {
      refuseUnknownKeys(p, new Set(['type', 'text']), at);
      if (typeof p.text !== 'string') invalid(`${at}.text`, 'must be a string');
      out.parts.push({ text: p.text });
      out.origins.push(at);
      return;
    }
    if (p.type === 'image_url') {
      refuseUnknownKeys(p, new Set(['type', 'image_url']), at);
      const image = p.image_url;
      if (!isObject(image) || typeof image.url !== 'string')
        invalid(`${at}.image_url`, 'must be an object with a "url" string');
      refuseUnknownKeys(image, new Set(['url', 'detail']), `${at}.image_url`);
      // `detail` is accepted and has no effect: the VQ service resizes every image to its own pixel bounds.
      const detail = image.detail;
      if (detail !== undefined && detail !== null && detail !== 'auto' && detail !== 'low' && detail !== 'high')
        invalid(`${at}.image_url.detail`, `${JSON.stringify(detail)} must be "auto", "low" or "high"`);
      const { data, mimeType } = parseImageUrl(image.url, `${at}.image_url.url`);
      out.parts.push({ image: { data, mimeType } });
      out.origins.push(`${at}.image_url`);
      return;
    }
    invalid(
      `${at}.type`,
      `${JSON.stringify(p.type)} parts are not supported (only "text" and "image_url": Emu3-Chat reads text and images)`,
      'unsupported_content',
    );
  });
}

function mapMessages(messages: unknown): PartsOut {
  if (!Array.isArray(messages) || messages.length === 0) invalid('messages', 'must be a non-empty array of messages');
  const out: PartsOut = { parts: [], origins: [] };
  let users = 0;
  messages.forEach((m, i) => {
    const at = `messages[${i}]`;
    if (!isObject(m)) invalid(at, 'must be an object with a "role"');
    const role = m.role;
    if (role === 'system' || role === 'developer') {
      refuseUnknownKeys(m, new Set(['role', 'content']), at);
      if (users > 0) invalid(at, `a ${role} message after the user's turn cannot be expressed (one user turn)`);
      const text = systemText(m.content, `${at}.content`);
      if (text.trim() !== BUILT_IN_SYSTEM_PROMPT)
        invalid(
          `${at}.content`,
          `the Generate API always uses the system prompt ${JSON.stringify(BUILT_IN_SYSTEM_PROMPT)}; a different ` +
            'one cannot be sent (omit the system message, or send exactly that text)',
          'unsupported_system_prompt',
        );
      return;
    }
    if (role === 'user') {
      // `name` is refused: the prompt has no place for a participant's name.
      refuseUnknownKeys(m, new Set(['role', 'content']), at);
      if (users > 0) {
        out.parts.push({ text: '\n' });
        out.origins.push(at);
      }
      users++;
      userParts(m.content, `${at}.content`, out);
      return;
    }
    if (role === 'assistant' || role === 'tool' || role === 'function')
      invalid(
        `${at}.role`,
        `"${role}" messages cannot be expressed: the Generate API takes one user turn (no conversation history, ` +
          'no tool results); send the question as the user message',
        'unsupported_message',
      );
    invalid(`${at}.role`, `${JSON.stringify(role)} must be "system", "developer" or "user"`);
  });
  if (users === 0) invalid('messages', 'needs a user message');
  return out;
}

function stopStrings(body: JsonObject): string[] {
  const v = body.stop;
  if (v === undefined || v === null) return [];
  if (typeof v === 'string') return [v];
  if (!Array.isArray(v) || !v.every((s) => typeof s === 'string'))
    invalid('stop', 'must be a string or an array of strings');
  return v as string[];
}

function maxTokens(body: JsonObject): { value: number | undefined; param: string } {
  const completion = optionalInteger(body, 'max_completion_tokens', 1, 2 ** 31 - 1);
  const legacy = optionalInteger(body, 'max_tokens', 1, 2 ** 31 - 1);
  if (completion !== undefined && legacy !== undefined && completion !== legacy)
    invalid('max_tokens', `${legacy} differs from max_completion_tokens ${completion}; give one of them`);
  return completion !== undefined
    ? { value: completion, param: 'max_completion_tokens' }
    : { value: legacy, param: 'max_tokens' };
}

export function mapChatRequest(body: unknown, ctx: ChatContext): ChatPlan {
  if (!isObject(body)) invalid('body', 'must be a JSON object');
  refuseUnknownKeys(body, KNOWN);
  refuseUnsupported(body);
  const model = optionalString(body, 'model');
  checkModel(model, ctx.servedModel);
  const n = optionalInteger(body, 'n', 1, 2 ** 31 - 1);
  if (n !== undefined && n !== 1) invalid('n', `${n} is not supported: the Generate API returns one choice (n = 1)`);
  const stream = optionalBoolean(body, 'stream') ?? false;
  const streamOptions = body.stream_options;
  let includeUsage = false;
  if (streamOptions !== undefined && streamOptions !== null) {
    if (!stream) invalid('stream_options', 'is only allowed with "stream": true');
    if (!isObject(streamOptions)) invalid('stream_options', 'must be an object');
    refuseUnknownKeys(streamOptions, new Set(['include_usage', 'include_obfuscation']), 'stream_options');
    includeUsage = optionalBoolean(streamOptions, 'include_usage') ?? false;
    // include_obfuscation (random padding against length side channels) is accepted; no padding is added.
    optionalBoolean(streamOptions, 'include_obfuscation');
  }
  const wantLogprobs = optionalBoolean(body, 'logprobs') ?? false;
  const top = optionalInteger(body, 'top_logprobs', 0, MAX_TOP_LOGPROBS);
  if (top !== undefined && !wantLogprobs) invalid('top_logprobs', 'needs "logprobs": true');
  const max = maxTokens(body);
  const topK = optionalInteger(body, 'top_k', -1, 2 ** 31 - 1);
  const sampling: GenerateSampling = {
    temperature: optionalNumber(body, 'temperature'),
    // vLLM's convention: -1 (like 0) is off.
    topK: topK === -1 ? 0 : topK,
    topP: optionalNumber(body, 'top_p'),
    minP: optionalNumber(body, 'min_p'),
    repetitionPenalty: optionalNumber(body, 'repetition_penalty'),
    seed: optionalInteger(body, 'seed', 0, 0xffffffff),
    maxNewTokens: max.value,
    stop: stopStrings(body),
    ignoreEos: optionalBoolean(body, 'ignore_eos') ?? false,
  };
  const { parts, origins } = mapMessages(body.messages);
  const request: GenerateRequestMessage = {
    parts,
    task: 'TASK_UNDERSTAND',
    sampling,
    requestId: ctx.requestId,
    returnTokenIds: false,
    // The Generate API sends logprobs only when top_logprobs > 0; with logprobs but no alternatives asked for,
    // one is requested and not returned.
    topLogprobs: wantLogprobs ? Math.max(1, top ?? 0) : 0,
  };
  return {
    request,
    model: ctx.servedModel,
    stream,
    includeUsage,
    logprobs: wantLogprobs ? { top: top ?? 0 } : null,
    paramOf: (field) => paramOf(field, origins, max.param),
  };
}

/** A request naming a model other than the served one is refused 404, as OpenAI does; no model means the served one. */
export function checkModel(model: string | undefined, served: string): void {
  if (model !== undefined && model !== served) throw modelNotFound(model, served);
}

function paramOf(field: string, origins: string[], maxParam: string): string | null {
  const part = /^parts\[(\d+)\]/.exec(field);
  if (part) return origins[Number(part[1])] ?? 'messages';
  if (field === 'parts' || field.startsWith('parts[]')) return 'messages';
  if (field === 'sampling.max_new_tokens') return maxParam;
  if (field.startsWith('sampling.stop')) return 'stop';
  if (field.startsWith('sampling.')) return SAMPLING_PARAMS[field.slice('sampling.'.length)] ?? null;
  if (field === 'top_logprobs') return 'top_logprobs';
  return null;
}
