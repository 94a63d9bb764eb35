// Generate's stream (deltas, then one final) → an OpenAI chat completion, whole or as chunks. Pure: no I/O.
import { GatewayError } from './errors.js';
import type { GenerateDelta, GenerateFinal } from './generate-request.js';

/** A token id's text and UTF-8 bytes (a token may hold part of a character: its text then has U+FFFD). */
export type TokenText = (id: number) => { token: string; bytes: number[] };

export type FinishReason = 'stop' | 'length';

/**
 * FINISH_REASON_EOS and FINISH_REASON_STOP → "stop", FINISH_REASON_LENGTH → "length". FINISH_REASON_CANCELLED (the
 * server drained on shutdown before the answer was complete) has no OpenAI finish reason: it is an error, 503, so a
 * client retries rather than takes a cut-off answer as complete.
 */
export function finishReasonOf(reason: string): FinishReason {
  if (reason === 'FINISH_REASON_EOS' || reason === 'FINISH_REASON_STOP') return 'stop';
  if (reason === 'FINISH_REASON_LENGTH') return 'length';
  if (reason === 'FINISH_REASON_CANCELLED')
    throw new GatewayError(
      503,
      'the server stopped this request before the answer was complete (it is shutting down); retry it',
      { code: 'server_shutting_down' },
    );
  throw new GatewayError(500, `the coordinator ended the answer with an unknown finish reason ${reason}`, {
    code: 'internal',
  });
}

export interface ChatUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

export function usageOf(u: GenerateFinal['usage']): ChatUsage {
  const prompt = u?.promptTokens ?? 0;
  const completion = u?.completionTokens ?? 0;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: u?.cachedTokens ?? 0 },
  };
}

export interface ChatTopLogprob {
  token: string;
  logprob: number;
  bytes: number[];
}

export interface ChatTokenLogprob extends ChatTopLogprob {
  top_logprobs: ChatTopLogprob[];
}

/** Generate's TokenLogprob entries as OpenAI's logprobs.content, keeping `top` alternatives of each. */
export function logprobsOf(entries: GenerateDelta['logprobs'], top: number, tokenText: TokenText): ChatTokenLogprob[] {
  return entries.map((e) => ({
    ...tokenText(e.tokenId),
    logprob: e.logprob,
    top_logprobs: e.top.slice(0, top).map((t) => ({ ...tokenText(t.tokenId), logprob: t.logprob })),
  }));
}

export interface CompletionMeta {
  id: string;
  /** Unix seconds. */
  created: number;
  model: string;
  /** GetModelInfo.model_fingerprint: it changes exactly when the served weights do. */
  systemFingerprint: string;
}

export interface LogprobOptions {
  top: number;
  tokenText: TokenText;
}

/** Collects a whole answer (stream: false). */
export class ChatAnswer {
  private text = '';
  private readonly logprobs: ChatTokenLogprob[] = [];

  constructor(
    private readonly meta: CompletionMeta,
    private readonly lp: LogprobOptions | null,
  ) {}

  add(delta: GenerateDelta): void {
    this.text += delta.text;
    if (this.lp) this.logprobs.push(...logprobsOf(delta.logprobs, this.lp.top, this.lp.tokenText));
  }

  /** The chat.completion object; throws GatewayError for a cancelled answer. */
  finish(final: GenerateFinal) {
    const finish = finishReasonOf(final.finishReason);
    return {
      id: this.meta.id,
      object: 'chat.completion' as const,
      created: this.meta.created,
      model: this.meta.model,
      system_fingerprint: this.meta.systemFingerprint,
      choices: [
        {
          index: 0,
          message: { role: 'assistant' as const, content: this.text, refusal: null },
          logprobs: this.lp ? { content: this.logprobs, refusal: null } : null,
          finish_reason: finish,
        },
      ],
      usage: usageOf(final.usage),
    };
  }
}

/** Builds the chat.completion.chunk objects of a streamed answer (stream: true). */
export class ChatChunks {
  constructor(
    private readonly meta: CompletionMeta,
    private readonly lp: LogprobOptions | null,
    private readonly includeUsage: boolean,
  ) {}

  private chunk(delta: object, logprobs: ChatTokenLogprob[] | null, finish: FinishReason | null) {
    return {
      id: this.meta.id,
      object: 'chat.completion.chunk' as const,
      created: this.meta.created,
      model: this.meta.model,
      system_fingerprint: this.meta.systemFingerprint,
      choices: [
        {
          index: 0,
          delta,
          logprobs: logprobs ? { content: logprobs, refusal: null } : null,
          finish_reason: finish,
        },
      ],
      // With include_usage every chunk carries "usage": null and one last chunk carries the counts (as OpenAI).
      ...(this.includeUsage ? { usage: null } : {}),
    };
  }

  /** The first chunk: the assistant role, no text yet. */
  first() {
    return this.chunk({ role: 'assistant', content: '' }, null, null);
  }

  /** A chunk for the delta's text (and logprobs); null when it carries neither. */
  delta(d: GenerateDelta) {
    const logprobs = this.lp && d.logprobs.length > 0 ? logprobsOf(d.logprobs, this.lp.top, this.lp.tokenText) : null;
    if (d.text === '' && !logprobs) return null;
    return this.chunk({ content: d.text }, logprobs, null);
  }

  /** The finish chunk, then the usage chunk when asked for; throws GatewayError for a cancelled answer. */
  final(f: GenerateFinal): object[] {
    const out: object[] = [this.chunk({}, null, finishReasonOf(f.finishReason))];
    if (this.includeUsage)
      out.push({
        id: this.meta.id,
        object: 'chat.completion.chunk',
        created: this.meta.created,
        model: this.meta.model,
        system_fingerprint: this.meta.systemFingerprint,
        choices: [],
        usage: usageOf(f.usage),
      });
    return out;
  }
}
