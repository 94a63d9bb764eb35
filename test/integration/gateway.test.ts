// The OpenAI gateway with the official openai npm client as the real client: vq + 2 shards + coordinator
// (pipeline-harness.ts) and `emu3 gateway` as real processes. Greedy answers through the gateway are checked against
// the same request made directly over gRPC.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';
import { type Child, freePort, startChild } from '../../cli/system.js';
import { createLogger } from '../../lib/rpc/log.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import { BUILT_IN_SYSTEM_PROMPT } from '../../services/gateway/chat-request.js';
import { startGateway } from '../../services/gateway/server.js';
import { generate, type Harness, picture, sleep, startHarness, unary } from './pipeline-harness.js';

const MAX_BODY_BYTES = 2 * 1024 * 1024;
const T = { timeout: 120_000 };

interface ModelInfo {
  modelName: string;
  contextLength: number;
  kvTokensInUse: number;
}

let h: Harness;
let gateway: Child;
let baseUrl: string;
let openai: OpenAI;
let info: ModelInfo;
let image: Buffer;
let imageUrl: string;

async function waitHttpHealthy(url: string, child: Child, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (child.process.exitCode !== null) throw new Error(`gateway exited: ${child.tail.join('\n')}`);
    try {
      const res = await fetch(url);
      if (res.status === 200) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > until) throw new Error(`gateway not healthy within ${timeoutMs} ms: ${child.tail.join('\n')}`);
    await sleep(200);
  }
}

before(
  async () => {
    // A short drain, for the last test (the coordinator stopped while answering).
    h = await startHarness(['--drain-timeout-ms', '300']);
    const address = `127.0.0.1:${await freePort()}`;
    gateway = startChild(
      'gateway',
      address,
      [
        'gateway',
        '--listen',
        address,
        '--coordinator',
        h.system.address,
        '--model',
        h.modelDir,
        '--max-body-bytes',
        String(MAX_BODY_BYTES),
      ],
      join(h.work, 'logs'),
    );
    baseUrl = `http://${address}/v1`;
    await waitHttpHealthy(`http://${address}/health`, gateway, 60_000);
    openai = new OpenAI({ baseURL: baseUrl, apiKey: 'not-checked', maxRetries: 0, timeout: 120_000 });
    info = await unary<ModelInfo>(h.client, 'GetModelInfo', {});
    image = await picture(160, 128, 3);
    imageUrl = `data:image/png;base64,${image.toString('base64')}`;
  },
  { timeout: 300_000 },
);

after(
  async () => {
    if (gateway && gateway.process.exitCode === null) {
      gateway.process.kill('SIGTERM');
      await gateway.exited;
    }
    await h?.close();
  },
  { timeout: 60_000 },
);

const kvInUse = async () => (await unary<ModelInfo>(h.client, 'GetModelInfo', {})).kvTokensInUse;

async function waitKv(pred: (kv: number) => boolean, what: string, timeoutMs = 30_000): Promise<number> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const kv = await kvInUse();
    if (pred(kv)) return kv;
    if (Date.now() > until) throw new Error(`${what}: kv_tokens_in_use is still ${kv}`);
    await sleep(50);
  }
}

const longRequest = {
  model: '',
  messages: [{ role: 'user' as const, content: 'Count to a thousand, slowly.' }],
  max_tokens: 1500,
  ignore_eos: true,
};

// First, while nothing is cached: kv_tokens_in_use then counts only live sequences. Back to exactly the idle value
// means the request ended cancelled: one that ran to its end would have left its prompt in the prefix cache.
test('aborting a stream through the AbortController cancels the Generate call (its KV is freed)', T, async () => {
  const baseline = await kvInUse();
  const ac = new AbortController();
  const stream = await openai.chat.completions.create(
    { ...longRequest, model: info.modelName, stream: true } as OpenAI.ChatCompletionCreateParamsStreaming,
    { signal: ac.signal },
  );
  let chunks = 0;
  let during = 0;
  for await (const _ of stream) {
    if (++chunks === 3) {
      during = await kvInUse();
      ac.abort();
    }
  }
  assert.equal(chunks, 3, 'the stream ends at the abort');
  assert.ok(during > baseline, `KV in use while streaming (${during}) above the idle ${baseline}`);
  await waitKv((kv) => kv === baseline, 'after the abort');
});

test('aborting a whole (non-streamed) request frees its KV too', T, async () => {
  const baseline = await kvInUse();
  const ac = new AbortController();
  const pending = openai.chat.completions.create(
    { ...longRequest, model: info.modelName } as OpenAI.ChatCompletionCreateParamsNonStreaming,
    { signal: ac.signal },
  );
  const refused = assert.rejects(pending, (e: unknown) => e instanceof OpenAI.APIUserAbortError);
  await waitKv((kv) => kv > baseline, 'while generating');
  ac.abort();
  await refused;
  await waitKv((kv) => kv === baseline, 'after the abort');
});

test('models: the list and the model by id are the served model; another id is 404', T, async () => {
  const list = await openai.models.list();
  assert.deepEqual(
    list.data.map((m) => m.id),
    [info.modelName],
  );
  const model = await openai.models.retrieve(info.modelName);
  assert.equal(model.id, info.modelName);
  assert.equal(model.object, 'model');
  assert.equal((model as unknown as { max_model_len: number }).max_model_len, info.contextLength);
  await assert.rejects(
    openai.models.retrieve('gpt-4o'),
    (e: unknown) => e instanceof OpenAI.NotFoundError && e.code === 'model_not_found',
  );
});

test('health is 200 while the coordinator serves', T, async () => {
  const res = await fetch(baseUrl.replace(/\/v1$/, '/health'));
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { status: 'SERVING', coordinator: h.system.address });
});

const question = 'What is in this picture?';
const imageMessages = (): OpenAI.ChatCompletionMessageParam[] => [
  { role: 'system', content: BUILT_IN_SYSTEM_PROMPT },
  {
    role: 'user',
    content: [
      { type: 'image_url', image_url: { url: imageUrl } },
      { type: 'text', text: question },
    ],
  },
];
const grpcParts = () => [{ image: { data: image, mimeType: 'image/png' } }, { text: question }];

test('a streamed greedy answer about an image equals the same request over gRPC, chunk by chunk', T, async () => {
  const direct = await generate(h.client, { parts: grpcParts(), sampling: { maxNewTokens: 12 } }).done;
  const stream = await openai.chat.completions.create({
    model: info.modelName,
    messages: imageMessages(),
    max_tokens: 12,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks: OpenAI.ChatCompletionChunk[] = [];
  for await (const c of stream) chunks.push(c);
  assert.ok(direct.text.length > 0 && direct.final.usage.completionTokens > 1, `gRPC answer "${direct.text}"`);
  // the role, at least one text chunk, the finish chunk, the usage chunk
  assert.ok(chunks.length >= 4, `${chunks.length} chunks`);
  assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
  const text = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
  assert.equal(text, direct.text);
  const reasons = chunks.map((c) => c.choices[0]?.finish_reason ?? null).filter((r) => r !== null);
  assert.deepEqual(reasons, [direct.final.finishReason === 'FINISH_REASON_LENGTH' ? 'length' : 'stop']);
  const last = chunks[chunks.length - 1];
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage?.prompt_tokens, direct.final.usage.promptTokens);
  assert.equal(last.usage?.completion_tokens, direct.final.usage.completionTokens);
  assert.equal(last.usage?.total_tokens, direct.final.usage.promptTokens + direct.final.usage.completionTokens);
  for (const c of chunks.slice(0, -1)) assert.equal(c.usage, null);
  assert.ok(chunks.every((c) => c.id === chunks[0].id && c.id.startsWith('chatcmpl-')));
});

test('the whole answer equals the stream; the repeated image prompt reports cached tokens', T, async () => {
  const direct = await generate(h.client, { parts: grpcParts(), sampling: { maxNewTokens: 12 } }).done;
  const { data, response } = await openai.chat.completions
    .create({ model: info.modelName, messages: imageMessages(), max_completion_tokens: 12 })
    .withResponse();
  assert.equal(response.headers.get('x-request-id'), data.id);
  assert.equal(data.object, 'chat.completion');
  assert.equal(data.model, info.modelName);
  assert.equal(data.choices.length, 1);
  assert.equal(data.choices[0].message.role, 'assistant');
  assert.equal(data.choices[0].message.content, direct.text);
  assert.equal(data.usage?.prompt_tokens, direct.final.usage.promptTokens);
  assert.equal(data.usage?.completion_tokens, direct.final.usage.completionTokens);
  const cached = data.usage?.prompt_tokens_details?.cached_tokens ?? 0;
  assert.ok(cached > 0 && cached < (data.usage?.prompt_tokens ?? 0), `cached ${cached}`);
});

test('max_tokens with ignore_eos ends at "length" after exactly that many tokens', T, async () => {
  const c = await openai.chat.completions.create({
    model: info.modelName,
    messages: [{ role: 'user', content: 'Say something.' }],
    max_tokens: 5,
    ignore_eos: true,
  } as OpenAI.ChatCompletionCreateParamsNonStreaming);
  assert.equal(c.choices[0].finish_reason, 'length');
  assert.equal(c.usage?.completion_tokens, 5);
});

test('a stop string cuts the answer where the gRPC answer is cut, with finish_reason "stop"', T, async () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Tell me a story.' }];
  const parts = [{ text: 'Tell me a story.' }];
  const full = await generate(h.client, { parts, sampling: { maxNewTokens: 24, ignoreEos: true } }).done;
  assert.ok(full.text.length >= 6, `the greedy answer "${full.text}" is long enough to hold a stop string`);
  const stop = full.text.slice(Math.floor(full.text.length / 2), Math.floor(full.text.length / 2) + 2);
  const direct = await generate(h.client, { parts, sampling: { maxNewTokens: 24, ignoreEos: true, stop: [stop] } })
    .done;
  assert.equal(direct.final.finishReason, 'FINISH_REASON_STOP');
  const c = await openai.chat.completions.create({
    model: info.modelName,
    messages,
    max_tokens: 24,
    stop: [stop],
    ignore_eos: true,
  } as OpenAI.ChatCompletionCreateParamsNonStreaming);
  assert.equal(c.choices[0].message.content, direct.text);
  assert.equal(c.choices[0].message.content, full.text.slice(0, full.text.indexOf(stop)));
  assert.equal(c.choices[0].finish_reason, 'stop');
});

test('logprobs: the gRPC logprobs of each token with its text and top_logprobs alternatives', T, async () => {
  const parts = [{ text: 'Name a colour.' }];
  const direct = await generate(h.client, {
    parts,
    sampling: { maxNewTokens: 4, ignoreEos: true },
    topLogprobs: 2,
  }).done;
  const logprobs: { tokenId: number; logprob: number; top: { tokenId: number; logprob: number }[] }[] = [];
  // generate() keeps text and ids only: run it again for the logprobs (greedy, so the same tokens)
  await new Promise<void>((resolve, reject) => {
    const call = (
      h.client as unknown as {
        Generate(r: object): NodeJS.EventEmitter;
      }
    ).Generate({ parts, sampling: { maxNewTokens: 4, ignoreEos: true }, topLogprobs: 2 });
    call.on('data', (m: { delta?: { logprobs: typeof logprobs } }) => {
      if (m.delta) logprobs.push(...m.delta.logprobs);
    });
    call.on('error', reject);
    call.on('end', resolve);
  });
  const c = await openai.chat.completions.create({
    model: info.modelName,
    messages: [{ role: 'user', content: 'Name a colour.' }],
    max_tokens: 4,
    ignore_eos: true,
    logprobs: true,
    top_logprobs: 2,
  } as OpenAI.ChatCompletionCreateParamsNonStreaming);
  assert.equal(c.choices[0].message.content, direct.text);
  const content = c.choices[0].logprobs?.content ?? [];
  const tok = loadTokenizer(h.modelDir);
  assert.equal(content.length, 4);
  content.forEach((entry, i) => {
    assert.equal(entry.token, tok.decode([logprobs[i].tokenId]));
    assert.deepEqual(entry.bytes, [...tok.decodeBytes([logprobs[i].tokenId])]);
    assert.equal(entry.logprob, logprobs[i].logprob);
    assert.deepEqual(
      entry.top_logprobs.map((t) => [t.token, t.logprob]),
      logprobs[i].top.map((t) => [tok.decode([t.tokenId]), t.logprob]),
    );
    assert.equal(entry.top_logprobs.length, 2);
  });
});

const isApiError =
  (status: number, check: (e: InstanceType<typeof OpenAI.APIError>) => void = () => {}) =>
  (e: unknown) => {
    assert.ok(e instanceof OpenAI.APIError, `got ${e}`);
    assert.equal(e.status, status, e.message);
    check(e);
    return true;
  };

test('a bad image is a 400 in the OpenAI error shape, streamed or not, naming the content part', T, async () => {
  const notAnImage = `data:image/png;base64,${Buffer.from('this is not a PNG file at all').toString('base64')}`;
  const withImage = (url: string) => ({
    model: info.modelName,
    messages: [
      {
        role: 'user' as const,
        content: [
          { type: 'text' as const, text: 'What is it?' },
          { type: 'image_url' as const, image_url: { url } },
        ],
      },
    ],
  });
  const body = withImage(notAnImage);
  const check = (e: InstanceType<typeof OpenAI.APIError>) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.equal(e.type, 'invalid_request_error');
    assert.equal(e.param, 'messages[0].content[1].image_url');
    assert.equal(e.code, 'invalid_argument');
    assert.match(e.message, /image/);
  };
  await assert.rejects(openai.chat.completions.create(body), isApiError(400, check));
  await assert.rejects(openai.chat.completions.create({ ...body, stream: true }), isApiError(400, check));
  // an http URL is refused by the gateway itself
  await assert.rejects(
    openai.chat.completions.create(withImage('https://example.com/cat.png')),
    isApiError(400, (e) => assert.equal(e.code, 'image_url_not_supported')),
  );
});

test('too many tokens, n > 1, a custom system prompt and an unknown model are refused', T, async () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Hi' }];
  await assert.rejects(
    openai.chat.completions.create({ model: info.modelName, messages, max_tokens: info.contextLength + 1 }),
    isApiError(400, (e) => {
      assert.equal(e.param, 'max_tokens');
      assert.match(e.message, /max_new_tokens/);
    }),
  );
  await assert.rejects(
    openai.chat.completions.create({
      model: info.modelName,
      messages: [{ role: 'user', content: 'word '.repeat(6000) }],
    }),
    isApiError(400, (e) => assert.equal(e.param, 'messages')),
  );
  await assert.rejects(
    openai.chat.completions.create({ model: info.modelName, messages, n: 2 }),
    isApiError(400, (e) => assert.equal(e.param, 'n')),
  );
  await assert.rejects(
    openai.chat.completions.create({
      model: info.modelName,
      messages: [{ role: 'system', content: 'You are a pirate.' }, ...messages],
    }),
    isApiError(400, (e) => assert.equal(e.code, 'unsupported_system_prompt')),
  );
  await assert.rejects(
    openai.chat.completions.create({ model: 'gpt-4o', messages }),
    isApiError(404, (e) => assert.equal(e.code, 'model_not_found')),
  );
});

test(
  'images.generate returns the PNG the Generate API makes for the same size (b64_json); a size too large is 400 on size',
  T,
  async () => {
    const r = await openai.images.generate({
      model: info.modelName,
      prompt: 'a red fox',
      size: '32x32' as '1024x1024',
    });
    assert.equal(r.data?.length, 1);
    const png = Buffer.from(r.data![0].b64_json!, 'base64');
    assert.deepEqual([...png.subarray(1, 4)], [0x50, 0x4e, 0x47], 'a PNG');
    // width and height at bytes 16..24 of the IHDR chunk
    assert.deepEqual([png.readUInt32BE(16), png.readUInt32BE(20)], [32, 32]);
    const tooLarge = openai.images.generate({ model: info.modelName, prompt: 'a red fox', size: '1024x1024' });
    await assert.rejects(
      tooLarge,
      isApiError(400, (e) => {
        assert.equal(e.param, 'size');
        assert.match(e.message, /image\.width.*(codes the VQ decodes|context)/);
      }),
    );
    const res = await fetch(`${baseUrl}/images/generations`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a red fox', size: '48x24' }),
    });
    assert.equal(res.status, 200);
    const body = (await res.json()) as { created: number; data: { b64_json: string }[] };
    const wide = Buffer.from(body.data[0].b64_json, 'base64');
    assert.deepEqual([wide.readUInt32BE(16), wide.readUInt32BE(20)], [48, 24]);
    assert.ok(Math.abs(body.created - Date.now() / 1000) < 600);
  },
);

test('HTTP-level errors: malformed JSON 400, too large 413, unknown route 404, wrong method 405', T, async () => {
  const post = (path: string, body: string) =>
    fetch(`${baseUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
  const errorOf = async (res: Response) => (await res.json()) as { error: Record<string, unknown> };

  const malformed = await post('/chat/completions', '{"model": ');
  assert.equal(malformed.status, 400);
  const m = await errorOf(malformed);
  assert.deepEqual(Object.keys(m.error).sort(), ['code', 'message', 'param', 'type']);
  assert.equal(m.error.code, 'invalid_json');
  assert.equal(m.error.type, 'invalid_request_error');

  const large = await post('/chat/completions', JSON.stringify({ pad: 'x'.repeat(MAX_BODY_BYTES) }));
  assert.equal(large.status, 413);
  assert.equal((await errorOf(large)).error.code, 'request_too_large');

  const unknown = await fetch(`${baseUrl}/completions`);
  assert.equal(unknown.status, 404);
  assert.equal((await errorOf(unknown)).error.code, 'unknown_url');

  const wrong = await fetch(`${baseUrl}/chat/completions`);
  assert.equal(wrong.status, 405);
  assert.equal(wrong.headers.get('allow'), 'POST');
  assert.equal((await errorOf(wrong)).error.code, 'method_not_allowed');
});

test('the raw stream: one "data:" event per chunk, ending with data: [DONE]', T, async () => {
  const res = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      messages: [{ role: 'user', content: 'Hi' }],
      max_tokens: 3,
      ignore_eos: true,
      stream: true,
    }),
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
  const text = await res.text();
  assert.ok(text.endsWith('data: [DONE]\n\n'));
  const events = text.split('\n\n').filter((e) => e !== '');
  assert.ok(events.every((e) => e.startsWith('data: ') && !e.includes('\n')));
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e.slice('data: '.length)));
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk' && !('usage' in c)));
  assert.equal(chunks[chunks.length - 1].choices[0].finish_reason, 'length');
});

test('with the coordinator unreachable: /health is 503 and a chat request is 503 unavailable', T, async () => {
  const dead = `127.0.0.1:${await freePort()}`;
  const gw = await startGateway({
    listen: '127.0.0.1:0',
    coordinator: dead,
    log: createLogger('gateway', { level: 'error' }),
  });
  try {
    const health = await fetch(gw.baseUrl.replace(/\/v1$/, '/health'));
    assert.equal(health.status, 503);
    assert.match(((await health.json()) as { status: string }).status, /^UNREACHABLE/);
    const client = new OpenAI({ baseURL: gw.baseUrl, apiKey: 'x', maxRetries: 0 });
    await assert.rejects(
      client.chat.completions.create({ model: 'emu3-tiny', messages: [{ role: 'user', content: 'Hi' }] }),
      isApiError(503, (e) => {
        assert.equal(e.type, 'server_error');
        assert.equal(e.code, 'unavailable');
      }),
    );
  } finally {
    await gw.close();
  }
});

// Last: it stops the coordinator.
test('a coordinator drained mid-answer: the stream ends with an error event, a whole answer is 503', T, async () => {
  const baseline = await kvInUse();
  const wholeRefused = assert.rejects(
    openai.chat.completions.create({
      ...longRequest,
      model: info.modelName,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming),
    isApiError(503, (e) => assert.equal(e.code, 'server_shutting_down')),
  );
  // the whole request is admitted (holds KV) before the drain starts
  await waitKv((kv) => kv > baseline, 'the whole request admitted');
  const stream = await openai.chat.completions.create({
    ...longRequest,
    model: info.modelName,
    stream: true,
  } as OpenAI.ChatCompletionCreateParamsStreaming);
  let text = '';
  let chunks = 0;
  await assert.rejects(
    (async () => {
      for await (const c of stream) {
        text += c.choices[0]?.delta.content ?? '';
        if (++chunks === 3) h.system.children.find((c) => c.name === 'coordinator')?.process.kill('SIGTERM');
      }
    })(),
    (e: unknown) => {
      assert.ok(e instanceof OpenAI.APIError, `got ${e}`);
      assert.equal(e.code, 'server_shutting_down');
      assert.equal(e.type, 'server_error');
      return true;
    },
  );
  assert.ok(chunks >= 3 && text.length > 0, `${chunks} chunks, "${text}" before the error`);
  await wholeRefused;
});
