import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ChatAnswer,
  ChatChunks,
  finishReasonOf,
  type TokenText,
  usageOf,
} from '../../services/gateway/chat-response.js';
import { GatewayError } from '../../services/gateway/errors.js';
import type { GenerateDelta, GenerateFinal } from '../../services/gateway/generate-request.js';
import { SSE_DONE, sseEvent } from '../../services/gateway/sse.js';

const meta = { id: 'chatcmpl-1', created: 1700000000, model: 'emu3-tiny', systemFingerprint: 'fp_abc' };
// A vocabulary of three tokens for the logprob texts.
const vocab: Record<number, string> = { 10: 'Hel', 11: 'lo', 12: '!' };
const tokenText: TokenText = (id) => ({ token: vocab[id], bytes: [...Buffer.from(vocab[id])] });

const delta = (text: string, logprobs: GenerateDelta['logprobs'] = []): GenerateDelta => ({
  text,
  tokenIds: [],
  logprobs,
});
const final = (finishReason: string): GenerateFinal => ({
  finishReason,
  usage: { promptTokens: 30, cachedTokens: 12, completionTokens: 3 },
  requestId: 'chatcmpl-1',
  seed: 0,
  stopString: '',
});

test('finish reasons: eos and stop strings are "stop", length is "length", a server cancel is a 503', () => {
  assert.equal(finishReasonOf('FINISH_REASON_EOS'), 'stop');
  assert.equal(finishReasonOf('FINISH_REASON_STOP'), 'stop');
  assert.equal(finishReasonOf('FINISH_REASON_LENGTH'), 'length');
  assert.throws(
    () => finishReasonOf('FINISH_REASON_CANCELLED'),
    (e: unknown) => e instanceof GatewayError && e.status === 503 && e.retryable,
  );
  assert.throws(
    () => finishReasonOf('FINISH_REASON_UNSPECIFIED'),
    (e: unknown) => (e as GatewayError).status === 500,
  );
});

test('usage: prompt, completion, total, cached → prompt_tokens_details.cached_tokens', () => {
  assert.deepEqual(usageOf({ promptTokens: 30, cachedTokens: 12, completionTokens: 3 }), {
    prompt_tokens: 30,
    completion_tokens: 3,
    total_tokens: 33,
    prompt_tokens_details: { cached_tokens: 12 },
  });
});

test('a whole answer: the deltas joined, one choice, usage and the fingerprint', () => {
  const a = new ChatAnswer(meta, null);
  a.add(delta('Hel'));
  a.add(delta(''));
  a.add(delta('lo!'));
  assert.deepEqual(a.finish(final('FINISH_REASON_EOS')), {
    id: 'chatcmpl-1',
    object: 'chat.completion',
    created: 1700000000,
    model: 'emu3-tiny',
    system_fingerprint: 'fp_abc',
    choices: [
      {
        index: 0,
        message: { role: 'assistant', content: 'Hello!', refusal: null },
        logprobs: null,
        finish_reason: 'stop',
      },
    ],
    usage: { prompt_tokens: 30, completion_tokens: 3, total_tokens: 33, prompt_tokens_details: { cached_tokens: 12 } },
  });
});

test('logprobs: each token with its text, bytes and the asked-for number of alternatives', () => {
  const a = new ChatAnswer(meta, { top: 1, tokenText });
  a.add(
    delta('Hello', [
      {
        tokenId: 10,
        logprob: -0.5,
        top: [
          { tokenId: 10, logprob: -0.5 },
          { tokenId: 12, logprob: -2 },
        ],
      },
      { tokenId: 11, logprob: -0.25, top: [{ tokenId: 11, logprob: -0.25 }] },
    ]),
  );
  const c = a.finish(final('FINISH_REASON_LENGTH'));
  assert.equal(c.choices[0].finish_reason, 'length');
  assert.deepEqual(c.choices[0].logprobs, {
    content: [
      {
        token: 'Hel',
        bytes: [72, 101, 108],
        logprob: -0.5,
        top_logprobs: [{ token: 'Hel', bytes: [72, 101, 108], logprob: -0.5 }],
      },
      {
        token: 'lo',
        bytes: [108, 111],
        logprob: -0.25,
        top_logprobs: [{ token: 'lo', bytes: [108, 111], logprob: -0.25 }],
      },
    ],
    refusal: null,
  });
  const none = new ChatAnswer(meta, { top: 0, tokenText });
  none.add(delta('!', [{ tokenId: 12, logprob: -1, top: [{ tokenId: 12, logprob: -1 }] }]));
  assert.deepEqual(none.finish(final('FINISH_REASON_EOS')).choices[0].logprobs?.content[0].top_logprobs, []);
});

test('a cancelled answer is an error, not a completion', () => {
  const a = new ChatAnswer(meta, null);
  a.add(delta('cut'));
  assert.throws(() => a.finish(final('FINISH_REASON_CANCELLED')), GatewayError);
});

test('chunks: the role first, one per delta with text, then the finish chunk', () => {
  const c = new ChatChunks(meta, null, false);
  const base = {
    id: 'chatcmpl-1',
    object: 'chat.completion.chunk',
    created: 1700000000,
    model: 'emu3-tiny',
    system_fingerprint: 'fp_abc',
  };
  assert.deepEqual(c.first(), {
    ...base,
    choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }],
  });
  assert.equal(c.delta(delta('')), null);
  assert.deepEqual(c.delta(delta('Hi')), {
    ...base,
    choices: [{ index: 0, delta: { content: 'Hi' }, logprobs: null, finish_reason: null }],
  });
  assert.deepEqual(c.final(final('FINISH_REASON_STOP')), [
    { ...base, choices: [{ index: 0, delta: {}, logprobs: null, finish_reason: 'stop' }] },
  ]);
});

test('chunks with include_usage: "usage": null on each, then a last chunk with no choices and the counts', () => {
  const c = new ChatChunks(meta, null, true);
  assert.equal((c.first() as { usage: unknown }).usage, null);
  assert.equal((c.delta(delta('x')) as { usage: unknown }).usage, null);
  const [finish, usage] = c.final(final('FINISH_REASON_EOS')) as { usage: unknown; choices: unknown[] }[];
  assert.equal(finish.usage, null);
  assert.deepEqual(usage.choices, []);
  assert.deepEqual(usage.usage, usageOf(final('FINISH_REASON_EOS').usage));
  assert.throws(() => c.final(final('FINISH_REASON_CANCELLED')), GatewayError);
});

test('a chunk with only logprobs (text held back) still carries them', () => {
  const c = new ChatChunks(meta, { top: 0, tokenText }, false);
  const chunk = c.delta(delta('', [{ tokenId: 12, logprob: -1, top: [{ tokenId: 12, logprob: -1 }] }])) as {
    choices: { delta: unknown; logprobs: { content: unknown[] } }[];
  };
  assert.deepEqual(chunk.choices[0].delta, { content: '' });
  assert.deepEqual(chunk.choices[0].logprobs.content, [{ token: '!', bytes: [33], logprob: -1, top_logprobs: [] }]);
});

test('SSE framing: one data line per event, a blank line after it, then [DONE]', () => {
  const text = 'two\nlines\r\nand "quotes"';
  const event = sseEvent({ content: text });
  assert.ok(event.startsWith('data: '));
  assert.ok(event.endsWith('\n\n'));
  assert.equal(event.slice(0, -2).split('\n').length, 1);
  assert.deepEqual(JSON.parse(event.slice('data: '.length)), { content: text });
  assert.equal(SSE_DONE, 'data: [DONE]\n\n');
});
