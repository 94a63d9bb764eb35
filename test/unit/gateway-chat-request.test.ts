import assert from 'node:assert/strict';
import { test } from 'node:test';
import { validateGenerateRequest } from '../../services/coordinator/request-validation.js';
import { BUILT_IN_SYSTEM_PROMPT, mapChatRequest } from '../../services/gateway/chat-request.js';
import { fromGrpcStatus, GatewayError } from '../../services/gateway/errors.js';

const ctx = { servedModel: 'emu3-tiny', requestId: 'chatcmpl-test' };
// The 8-byte PNG signature followed by 4 bytes: what matters here is that the bytes arrive unchanged.
const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3, 4]);
const dataUrl = `data:image/png;base64,${png.toString('base64')}`;

function chat(extra: Record<string, unknown>, messages: unknown = [{ role: 'user', content: 'Hi' }]) {
  return mapChatRequest({ model: 'emu3-tiny', messages, ...extra }, ctx);
}

function refused(fn: () => unknown, status: number, param: string | null, code?: string, message?: RegExp) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof GatewayError, `got ${e}`);
    assert.equal(e.status, status, e.message);
    assert.equal(e.param, param, e.message);
    if (code) assert.equal(e.code, code);
    if (message) assert.match(e.message, message);
    return true;
  });
}

test('the built-in system prompt is the text of the chat template before USER:', () => {
  assert.equal(BUILT_IN_SYSTEM_PROMPT, 'You are a helpful assistant.');
});

test('a user message with an image and text becomes the parts in order, bytes unchanged', () => {
  const plan = chat({}, [
    {
      role: 'user',
      content: [
        { type: 'image_url', image_url: { url: dataUrl, detail: 'high' } },
        { type: 'text', text: 'What is this?' },
      ],
    },
  ]);
  assert.equal(plan.request.parts.length, 2);
  const [image, text] = plan.request.parts;
  assert.ok('image' in image);
  assert.deepEqual(image.image.data, png);
  assert.equal(image.image.mimeType, 'image/png');
  assert.deepEqual(text, { text: 'What is this?' });
  assert.equal(plan.request.task, 'TASK_UNDERSTAND');
  assert.equal(plan.request.requestId, 'chatcmpl-test');
  assert.equal(plan.model, 'emu3-tiny');
  assert.equal(plan.stream, false);
  assert.equal(plan.logprobs, null);
  assert.equal(plan.request.topLogprobs, 0);
});

test('defaults leave every sampling field unset (the coordinator applies its own)', () => {
  const s = chat({}).request.sampling;
  assert.deepEqual(s, {
    temperature: undefined,
    topK: undefined,
    topP: undefined,
    minP: undefined,
    repetitionPenalty: undefined,
    seed: undefined,
    maxNewTokens: undefined,
    stop: [],
    ignoreEos: false,
  });
  // and the coordinator's validator takes the request as is, with Emu3-Chat's defaults
  const v = validateGenerateRequest(chat({}).request);
  assert.equal(v.sampling.temperature, 0);
  assert.equal(v.sampling.maxNewTokens, 1024);
});

test('the built-in system prompt is accepted (string or text parts); consecutive user messages join with a newline', () => {
  const plan = chat({}, [
    { role: 'system', content: 'You are a helpful assistant. ' },
    { role: 'developer', content: [{ type: 'text', text: 'You are a helpful assistant.' }] },
    { role: 'user', content: 'First.' },
    { role: 'user', content: [{ type: 'text', text: 'Second.' }] },
  ]);
  assert.deepEqual(plan.request.parts, [{ text: 'First.' }, { text: '\n' }, { text: 'Second.' }]);
});

test('another system prompt, a late system message, history and tools are refused naming the message', () => {
  refused(
    () =>
      chat({}, [
        { role: 'system', content: 'You are a pirate.' },
        { role: 'user', content: 'Hi' },
      ]),
    400,
    'messages[0].content',
    'unsupported_system_prompt',
    /You are a helpful assistant\./,
  );
  refused(
    () =>
      chat({}, [
        { role: 'user', content: 'Hi' },
        { role: 'system', content: BUILT_IN_SYSTEM_PROMPT },
      ]),
    400,
    'messages[1]',
  );
  refused(
    () =>
      chat({}, [
        { role: 'user', content: 'Hi' },
        { role: 'assistant', content: 'Hello' },
        { role: 'user', content: 'Again' },
      ]),
    400,
    'messages[1].role',
    'unsupported_message',
    /one user turn/,
  );
  refused(() => chat({}, [{ role: 'tool', content: 'x', tool_call_id: 'a' }]), 400, 'messages[0].role');
  refused(() => chat({}, [{ role: 'wizard', content: 'x' }]), 400, 'messages[0].role');
  refused(() => chat({}, [{ role: 'system', content: BUILT_IN_SYSTEM_PROMPT }]), 400, 'messages');
  refused(() => chat({}, []), 400, 'messages');
  refused(() => chat({}, [{ role: 'user', content: 'Hi', name: 'bob' }]), 400, 'messages[0].name', 'unknown_parameter');
  refused(
    () => chat({}, [{ role: 'user', content: [{ type: 'input_audio', input_audio: {} }] }]),
    400,
    'messages[0].content[0].type',
    'unsupported_content',
  );
});

test('image URLs: http(s) is refused (nothing is downloaded), a broken data: URL names its part', () => {
  const ask = (url: string) =>
    chat({}, [
      {
        role: 'user',
        content: [
          { type: 'text', text: 'x' },
          { type: 'image_url', image_url: { url } },
        ],
      },
    ]);
  refused(
    () => ask('https://example.com/cat.png'),
    400,
    'messages[0].content[1].image_url.url',
    'image_url_not_supported',
    /downloads nothing/,
  );
  refused(() => ask('data:image/png;base64,@@@@'), 400, 'messages[0].content[1].image_url.url', 'invalid_image_url');
});

test('sampling parameters map onto SamplingParams', () => {
  const s = chat({
    temperature: 0.7,
    top_p: 0.9,
    seed: 4294967295,
    max_tokens: 12,
    stop: 'END',
    top_k: 40,
    min_p: 0.05,
    repetition_penalty: 1.1,
    ignore_eos: true,
  }).request.sampling;
  assert.deepEqual(s, {
    temperature: 0.7,
    topK: 40,
    topP: 0.9,
    minP: 0.05,
    repetitionPenalty: 1.1,
    seed: 4294967295,
    maxNewTokens: 12,
    stop: ['END'],
    ignoreEos: true,
  });
  assert.deepEqual(chat({ stop: ['a', 'b'] }).request.sampling.stop, ['a', 'b']);
  assert.equal(chat({ max_completion_tokens: 7 }).request.sampling.maxNewTokens, 7);
  assert.equal(chat({ max_completion_tokens: 7, max_tokens: 7 }).request.sampling.maxNewTokens, 7);
  assert.equal(chat({ top_k: -1 }).request.sampling.topK, 0);
  assert.equal(chat({ temperature: null, stop: null }).request.sampling.temperature, undefined);
});

test('values the Generate API cannot take are refused naming the parameter', () => {
  refused(() => chat({ seed: -1 }), 400, 'seed');
  refused(() => chat({ seed: 2 ** 32 }), 400, 'seed');
  refused(() => chat({ seed: 1.5 }), 400, 'seed');
  refused(() => chat({ max_tokens: 0 }), 400, 'max_tokens');
  refused(() => chat({ max_tokens: 5, max_completion_tokens: 6 }), 400, 'max_tokens');
  refused(() => chat({ temperature: 'hot' }), 400, 'temperature');
  refused(() => chat({ stop: [1] }), 400, 'stop');
  refused(() => chat({ n: 2 }), 400, 'n', undefined, /n = 1/);
  assert.equal(chat({ n: 1 }).request.parts.length, 1);
  refused(() => chat({ frequency_penalty: 0.5 }), 400, 'frequency_penalty', 'unsupported_parameter');
  refused(() => chat({ presence_penalty: 1 }), 400, 'presence_penalty', 'unsupported_parameter');
  refused(() => chat({ logit_bias: { 5: 10 } }), 400, 'logit_bias', 'unsupported_parameter');
  refused(() => chat({ tools: [{ type: 'function' }] }), 400, 'tools', 'unsupported_parameter');
  refused(() => chat({ response_format: { type: 'json_object' } }), 400, 'response_format');
  refused(() => chat({ store: true }), 400, 'store');
  refused(() => chat({ temperatur: 1 }), 400, 'temperatur', 'unknown_parameter');
  // "off" values and ignored fields pass
  const ok = chat({
    frequency_penalty: 0,
    presence_penalty: 0,
    logit_bias: {},
    tools: [],
    tool_choice: 'none',
    response_format: { type: 'text' },
    store: false,
    user: 'u-1',
    metadata: { a: 'b' },
  });
  assert.equal(ok.request.parts.length, 1);
});

test('the model must be the served one (404 model_not_found); no model means the served one', () => {
  refused(() => chat({ model: 'gpt-4o' }), 404, 'model', 'model_not_found', /emu3-tiny/);
  assert.equal(mapChatRequest({ messages: [{ role: 'user', content: 'x' }] }, ctx).model, 'emu3-tiny');
});

test('stream, stream_options.include_usage', () => {
  const plan = chat({ stream: true, stream_options: { include_usage: true } });
  assert.equal(plan.stream, true);
  assert.equal(plan.includeUsage, true);
  assert.equal(chat({ stream: true }).includeUsage, false);
  refused(() => chat({ stream_options: { include_usage: true } }), 400, 'stream_options');
  refused(() => chat({ stream: true, stream_options: { bogus: 1 } }), 400, 'stream_options.bogus');
});

test('logprobs / top_logprobs map onto top_logprobs (at least 1, since 0 sends none)', () => {
  const one = chat({ logprobs: true });
  assert.deepEqual(one.logprobs, { top: 0 });
  assert.equal(one.request.topLogprobs, 1);
  const five = chat({ logprobs: true, top_logprobs: 5 });
  assert.deepEqual(five.logprobs, { top: 5 });
  assert.equal(five.request.topLogprobs, 5);
  assert.equal(chat({ logprobs: false }).request.topLogprobs, 0);
  refused(() => chat({ top_logprobs: 3 }), 400, 'top_logprobs', undefined, /logprobs/);
  refused(() => chat({ logprobs: true, top_logprobs: 21 }), 400, 'top_logprobs');
});

test("the coordinator's own refusals of a mapped request name the OpenAI parameter", () => {
  const refusal = (body: Record<string, unknown>, messages?: unknown) => {
    const plan = chat(body, messages);
    try {
      validateGenerateRequest(plan.request);
    } catch (err) {
      return fromGrpcStatus(3, (err as Error).message, plan.paramOf);
    }
    assert.fail('the coordinator accepted the request');
  };
  assert.equal(refusal({ top_p: 0 }).param, 'top_p');
  assert.equal(refusal({ temperature: 101 }).param, 'temperature');
  assert.equal(refusal({ repetition_penalty: 0 }).param, 'repetition_penalty');
  assert.equal(refusal({ stop: ['x', ''] }).param, 'stop');
  assert.equal(refusal({ stop: ['1', '2', '3', '4', '5', '6', '7', '8', '9'] }).param, 'stop');
  assert.equal(refusal({ max_tokens: 100_000 }).param, 'max_tokens');
  assert.equal(refusal({ max_completion_tokens: 100_000 }).param, 'max_completion_tokens');
  const images = Array.from({ length: 5 }, () => ({ type: 'image_url', image_url: { url: dataUrl } }));
  const tooMany = refusal({}, [{ role: 'user', content: images }]);
  assert.equal(tooMany.status, 400);
  assert.equal(tooMany.param, 'messages');
  // an image refused by index (as the VQ's refusals name it) points at its content part
  const plan = chat({}, [
    { role: 'user', content: 'a' },
    { role: 'user', content: [{ type: 'image_url', image_url: { url: dataUrl } }] },
  ]);
  // parts: [text a, "\n", image]
  assert.equal(
    fromGrpcStatus(3, 'parts[2].image: cannot decode', plan.paramOf).param,
    'messages[1].content[0].image_url',
  );
});
