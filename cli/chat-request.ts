// `emu3 chat`'s flags → a GenerateRequest (checked with the API's own ranges, so a bad value is refused before any
// call), the summary line printed at the end, and the words for a failed call. Pure: no I/O.
import type { CommandSpec, Flags } from './args.js';
import { UsageError } from './args.js';
import { CLIENT_AUTH_FLAGS } from './security-flags.js';

export const chatSpec: CommandSpec = {
  name: 'chat',
  summary: 'ask the coordinator about images and text; the answer streams to the terminal',
  usage: 'emu3 chat [--addr HOST:PORT] [--image FILE]... [sampling flags] "text"',
  flags: {
    addr: { help: 'coordinator address', default: '127.0.0.1:50051' },
    ...CLIENT_AUTH_FLAGS,
    image: {
      help: 'an image file to ask about (repeatable; images come before the text; default: none)',
      repeatable: true,
    },
    temperature: { help: 'softmax temperature in [0, 100]; 0 = greedy (default: 0)' },
    'top-k': { help: "keep the k most likely tokens; 0 = off, at most the server's max_top_k (default: 0)" },
    'top-p': { help: 'nucleus sampling mass in (0, 1]; 1 = off (default: 1)' },
    'min-p': { help: "drop tokens below min_p × the top token's probability, in [0, 1]; 0 = off (default: 0)" },
    'repetition-penalty': { help: 'HF repetition penalty in (0, 10]; 1 = off (default: 1)' },
    seed: { help: 'sampling seed in [0, 2^32-1] (default: chosen by the server, printed at the end)' },
    'max-new-tokens': { help: 'most tokens to generate, ≥ 1 (default: 1024, shortened to fit the context)' },
    stop: {
      help: "a stop string (repeatable; at most the server's max_stop_strings, each 1 to max_stop_chars long; default: none)",
      repeatable: true,
    },
    'ignore-eos': { boolean: true, help: 'keep generating past the end-of-sequence token (default: off)' },
    'top-logprobs': {
      help: "print each token's logprob and its n most likely alternatives to stderr; at most the server's max_top_logprobs (default: 0 = none)",
    },
    'return-token-ids': { boolean: true, help: 'print the generated token ids to stderr at the end (default: off)' },
    'request-id': {
      help: "your id for this request, echoed in the summary and the server's logs (default: the server's)",
    },
    'deadline-ms': { help: 'give up after this many milliseconds (default: no deadline)' },
    quiet: { boolean: true, help: 'print only the answer: no summary line (default: off)' },
  },
};

export interface ChatRequest {
  parts: ({ text: string } | { image: { data: Buffer; mimeType: string } })[];
  sampling: Record<string, unknown>;
  requestId?: string;
  returnTokenIds?: boolean;
  topLogprobs?: number;
}

const INT32_MAX = 2 ** 31 - 1;

function real(flags: Flags, name: string, ok: (v: number) => boolean, range: string): number | undefined {
  const v = flags.number(name);
  if (v !== undefined && !ok(v)) throw new UsageError(`chat: --${name} must be in ${range}, got ${v}`);
  return v;
}

/** The request for `text` and the images (already read) from the flags; UsageError names the first bad flag. */
export function chatRequest(flags: Flags, text: string, images: { data: Buffer; mimeType: string }[]): ChatRequest {
  const sampling: Record<string, unknown> = {};
  const set = (key: string, v: unknown) => {
    if (v !== undefined) sampling[key] = v;
  };
  set(
    'temperature',
    real(flags, 'temperature', (v) => v >= 0 && v <= 100, '[0, 100]'),
  );
  set('topK', flags.int('top-k', 0, INT32_MAX));
  set(
    'topP',
    real(flags, 'top-p', (v) => v > 0 && v <= 1, '(0, 1]'),
  );
  set(
    'minP',
    real(flags, 'min-p', (v) => v >= 0 && v <= 1, '[0, 1]'),
  );
  set(
    'repetitionPenalty',
    real(flags, 'repetition-penalty', (v) => v > 0 && v <= 10, '(0, 10]'),
  );
  set('seed', flags.int('seed', 0, 0xffffffff));
  set('maxNewTokens', flags.int('max-new-tokens', 1, INT32_MAX));
  const stop = flags.all('stop');
  stop.forEach((s) => {
    if (s === '') throw new UsageError('chat: --stop must not be empty');
  });
  if (stop.length > 0) sampling.stop = stop;
  if (flags.bool('ignore-eos')) sampling.ignoreEos = true;
  const req: ChatRequest = { parts: [...images.map((image) => ({ image })), { text }], sampling };
  const requestId = flags.string('request-id');
  if (requestId !== undefined) req.requestId = requestId;
  if (flags.bool('return-token-ids')) req.returnTokenIds = true;
  const topLogprobs = flags.int('top-logprobs', 0, 0xffffffff);
  if (topLogprobs !== undefined) req.topLogprobs = topLogprobs;
  return req;
}

export interface FinalLike {
  finishReason: string;
  seed?: number;
  requestId?: string;
  stopString?: string;
  usage?: { promptTokens: number; cachedTokens: number; completionTokens: number };
  timings?: { queueMs: number; vqMs: number; ttftMs: number; decodeMs: number };
}

/** Tokens per second of the decode: the tokens after the first over the time from the first to the last. */
export function tokensPerSecond(completionTokens: number, decodeMs: number): number | undefined {
  if (completionTokens < 2 || !(decodeMs > 0)) return undefined;
  return ((completionTokens - 1) * 1000) / decodeMs;
}

const ms = (v: number | undefined) => `${(v ?? 0).toFixed(1)} ms`;

/** The line `emu3 chat` ends with: why it ended, seed, TTFT, tokens/s, then the rest of the usage and timings. */
export function summaryLine(f: FinalLike): string {
  const u = f.usage ?? { promptTokens: 0, cachedTokens: 0, completionTokens: 0 };
  const t = f.timings ?? { queueMs: 0, vqMs: 0, ttftMs: 0, decodeMs: 0 };
  const rate = tokensPerSecond(u.completionTokens, t.decodeMs);
  const stop = f.stopString ? ` "${f.stopString}"` : '';
  return (
    `[${f.finishReason}${stop}] seed ${f.seed ?? 0}, TTFT ${ms(t.ttftMs)}, ` +
    `${rate === undefined ? 'n/a' : rate.toFixed(1)} tokens/s; ` +
    `${u.completionTokens} tokens generated after a ${u.promptTokens}-token prompt (${u.cachedTokens} cached); ` +
    `queue ${ms(t.queueMs)}, vq ${ms(t.vqMs)}, decode ${ms(t.decodeMs)}` +
    (f.requestId ? `; request ${f.requestId}` : '')
  );
}

/**
 * A failed call in words. A channel that never connected (UNAVAILABLE with grpc-js's "No connection established")
 * means nothing answers at the address; grpc-js's empty "Resolution note: " tail is dropped.
 */
export function explainError(code: string, details: string, address: string): string {
  const clean = details.replace(/\.?\s*Resolution note:\s*$/, '').trim();
  if (code === 'UNAVAILABLE' && /^No connection established/.test(clean)) {
    const last = /Last error: (.*)$/.exec(clean)?.[1];
    return `nothing answers at ${address}: is \`npm start\` (emu3 up) running?${last ? ` (${last.replace(/\.$/, '')})` : ''}`;
  }
  if (code === 'UNAUTHENTICATED')
    return `${code}: ${clean} (set EMU3_AUTH_TOKEN or give --auth-token-file FILE: the coordinator runs with --auth-token-file)`;
  return `${code}: ${clean}`;
}
