import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import { parseJson, readBody } from '../../services/gateway/body.js';
import { GatewayError } from '../../services/gateway/errors.js';
import { modelById, modelList } from '../../services/gateway/models.js';
import { MethodNotAllowed, matchRoute } from '../../services/gateway/routes.js';

function body(chunks: string[], headers: Record<string, string> = {}) {
  return Object.assign(Readable.from(chunks.map((c) => Buffer.from(c))), { headers });
}

const isStatus = (s: number) => (e: unknown) => e instanceof GatewayError && e.status === s;

test('routes: the OpenAI paths and /health; unknown paths 404, wrong methods 405 with Allow', () => {
  assert.deepEqual(matchRoute('POST', '/v1/chat/completions'), { name: 'chat', params: [] });
  assert.deepEqual(matchRoute('POST', '/v1/chat/completions?x=1'), { name: 'chat', params: [] });
  assert.deepEqual(matchRoute('POST', '/v1/images/generations'), { name: 'images', params: [] });
  assert.deepEqual(matchRoute('GET', '/v1/models'), { name: 'models', params: [] });
  assert.deepEqual(matchRoute('GET', '/v1/models/emu3%2Dtiny'), { name: 'model', params: ['emu3-tiny'] });
  assert.deepEqual(matchRoute('GET', '/health'), { name: 'health', params: [] });
  assert.deepEqual(matchRoute('HEAD', '/health'), { name: 'health', params: [] });
  assert.throws(() => matchRoute('GET', '/v1/completions'), isStatus(404));
  assert.throws(() => matchRoute('GET', '/v1/models/a/b'), isStatus(404));
  assert.throws(() => matchRoute('GET', '/v1/models/%E0%A4%A'), isStatus(400));
  assert.throws(
    () => matchRoute('GET', '/v1/chat/completions'),
    (e: unknown) => e instanceof MethodNotAllowed && e.status === 405 && e.allow === 'POST',
  );
  assert.throws(
    () => matchRoute('DELETE', '/v1/models'),
    (e: unknown) => e instanceof MethodNotAllowed && e.allow === 'GET',
  );
});

test('bodies: read whole under the limit, 413 past it (declared or streamed)', { timeout: 10_000 }, async () => {
  assert.equal((await readBody(body(['{"a":', '1}']), 7)).toString(), '{"a":1}');
  await assert.rejects(readBody(body(['{"a":', '12}']), 7), isStatus(413));
  await assert.rejects(readBody(body(['{}'], { 'content-length': '8' }), 7), isStatus(413));
});

test('JSON: malformed or empty bodies are 400 invalid_json', () => {
  assert.deepEqual(parseJson(Buffer.from('{"a":[1]}')), { a: [1] });
  assert.throws(
    () => parseJson(Buffer.from('{"a":')),
    (e: unknown) => e instanceof GatewayError && e.status === 400 && e.code === 'invalid_json',
  );
  assert.throws(() => parseJson(Buffer.from('  ')), isStatus(400));
});

test('models: the served model as a list and by id; another id is 404', () => {
  const info = {
    modelName: 'emu3-tiny',
    modelFingerprint: 'ab',
    vocabSize: 184622,
    contextLength: 2048,
    kvCapacityTokens: 0,
    kvTokensInUse: 0,
  };
  const model = { id: 'emu3-tiny', object: 'model', created: 5, owned_by: 'emu3-serve', max_model_len: 2048 };
  assert.deepEqual(modelList(info, 5), { object: 'list', data: [model] });
  assert.deepEqual(modelById(info, 'emu3-tiny', 5), model);
  assert.throws(
    () => modelById(info, 'gpt-4o', 5),
    (e: unknown) => e instanceof GatewayError && e.status === 404 && e.code === 'model_not_found',
  );
});
