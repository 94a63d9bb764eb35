import assert from 'node:assert/strict';
import { test } from 'node:test';
import { InvalidArgumentError } from '../../services/coordinator/errors.js';
import {
  checkPromptLength,
  defaultLimits,
  type GenerateRequestLike,
  validateGenerateRequest,
} from '../../services/coordinator/request-validation.js';

const image = { data: new Uint8Array([0x89, 0x50, 0x4e, 0x47]), mimeType: 'image/png' };
const good: GenerateRequestLike = { parts: [{ image }, { text: 'Describe the image.' }] };

function rejects(req: GenerateRequestLike, field: string, limit: RegExp) {
  assert.throws(
    () => validateGenerateRequest(req),
    (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError, `got ${e}`);
      assert.equal(e.code, 3);
      assert.equal(e.field, field);
      assert.match(e.message, limit);
      return true;
    },
  );
}

test('defaults are Emu3-Chat: greedy, 1024 new tokens, no penalty, no stop strings', () => {
  const v = validateGenerateRequest(good);
  assert.equal(v.task, 'understand');
  assert.deepEqual(v.sampling, {
    temperature: 0,
    topK: 0,
    topP: 1,
    minP: 0,
    repetitionPenalty: 1,
    seed: null,
    maxNewTokens: 1024,
    maxNewTokensExplicit: false,
    stop: [],
    ignoreEos: false,
  });
  assert.deepEqual(
    v.parts.map((p) => p.kind),
    ['image', 'text'],
  );
  assert.equal(v.topLogprobs, 0);
});

test('explicit values pass through', () => {
  const v = validateGenerateRequest({
    ...good,
    task: 'TASK_UNDERSTAND',
    sampling: {
      temperature: 0.7,
      topK: 50,
      topP: 0.9,
      minP: 0.05,
      repetitionPenalty: 1.1,
      seed: '42',
      maxNewTokens: 7,
    },
    topLogprobs: 3,
    requestId: 'abc',
  });
  assert.equal(v.sampling.seed, 42);
  assert.equal(v.sampling.maxNewTokens, 7);
  assert.equal(v.sampling.maxNewTokensExplicit, true);
  assert.equal(v.requestId, 'abc');
});

test('each bad field is refused with InvalidArgument naming the field and the limit', () => {
  rejects({}, 'parts', /at least one part/);
  rejects({ parts: [] }, 'parts', /at least one part/);
  rejects({ parts: [{}] }, 'parts[0]', /exactly one of text or image/);
  rejects({ parts: [{ text: 'a', image }] }, 'parts[0]', /exactly one/);
  rejects({ ...good, task: 'TASK_BOGUS' }, 'task', /unknown task "TASK_BOGUS"/);
  rejects({ ...good, task: 7 }, 'task', /unknown task 7/);
  rejects({ ...good, task: 'TASK_GENERATE_IMAGE' }, 'task', /not supported yet/);
  rejects(
    { ...good, sampling: { temperature: Number.NaN } },
    'sampling.temperature',
    /NaN must be 0 \(greedy\) or in \[1e-6, 100\]/,
  );
  rejects({ ...good, sampling: { temperature: -0.5 } }, 'sampling.temperature', /-0.5/);
  rejects({ ...good, sampling: { topP: 0 } }, 'sampling.top_p', /\(0, 1\]/);
  rejects({ ...good, sampling: { topP: 1.5 } }, 'sampling.top_p', /\(0, 1\]/);
  rejects({ ...good, sampling: { topP: Number.NaN } }, 'sampling.top_p', /\(0, 1\]/);
  rejects({ ...good, sampling: { topK: -1 } }, 'sampling.top_k', /\[0, 2048\]/);
  rejects({ ...good, sampling: { topK: 5000 } }, 'sampling.top_k', /\[0, 2048\]/);
  rejects({ ...good, sampling: { minP: 1.1 } }, 'sampling.min_p', /\[0, 1\]/);
  rejects({ ...good, sampling: { minP: -0.1 } }, 'sampling.min_p', /\[0, 1\]/);
  rejects({ ...good, sampling: { repetitionPenalty: 0 } }, 'sampling.repetition_penalty', /0 must be in \[1e-6, 10\]/);
  rejects({ ...good, sampling: { seed: -1 } }, 'sampling.seed', /4294967295/);
  rejects({ ...good, sampling: { maxNewTokens: 20000 } }, 'sampling.max_new_tokens', /\[1, 9215\]/);
  rejects({ ...good, sampling: { stop: [''] } }, 'sampling.stop[0]', /empty/);
  rejects({ ...good, sampling: { stop: Array(9).fill('x') } }, 'sampling.stop', /limit 8/);
  rejects({ ...good, sampling: { stop: ['x'.repeat(65)] } }, 'sampling.stop[0]', /64 characters/);
  rejects({ ...good, topLogprobs: 21 }, 'top_logprobs', /\[0, 20\]/);
  rejects({ parts: Array(5).fill({ image }) }, 'parts', /more than 4 images/);
  rejects({ parts: [{ image: { data: new Uint8Array(0) } }] }, 'parts[0].image.data', /empty/);
  rejects({ parts: [{ image: { data: image.data, mimeType: 'text/html' } }] }, 'parts[0].image.mime_type', /image\/\*/);
  rejects({ parts: [{ text: 'x'.repeat(40000) }] }, 'parts[].text', /32768 characters/);
  rejects({ ...good, requestId: 'r'.repeat(129) }, 'request_id', /128 characters/);
});

test('image size limit is configurable and named', () => {
  assert.throws(
    () => validateGenerateRequest(good, { ...defaultLimits, maxImageBytes: 3 }),
    /parts\[0\].image.data: 4 bytes is more than the limit of 3 bytes/,
  );
});

test('prompt length against the context: too long refused, an explicit max_new_tokens must fit, a default one shrinks', () => {
  const dflt = validateGenerateRequest(good).sampling;
  assert.equal(checkPromptLength(100, dflt, 9216), 1024);
  assert.equal(checkPromptLength(9000, dflt, 9216), 216);
  assert.throws(
    () => checkPromptLength(9216, dflt, 9216),
    (e: unknown) => e instanceof InvalidArgumentError && e.field === 'parts' && /9216 tokens/.test(e.message),
  );
  const explicit = validateGenerateRequest({ ...good, sampling: { maxNewTokens: 500 } }).sampling;
  assert.equal(checkPromptLength(8716, explicit, 9216), 500);
  assert.throws(
    () => checkPromptLength(8717, explicit, 9216),
    (e: unknown) =>
      e instanceof InvalidArgumentError && e.field === 'sampling.max_new_tokens' && /at most 499/.test(e.message),
  );
});

// The last stage's arithmetic in float32 (lib/onnx/sampling-head.ts): positive logits ÷ penalty, then ÷ temperature.
function lastStageScaled(logit: number, penalty: number, temperature: number): number {
  const f = Math.fround;
  const penalised = logit < 0 ? f(f(logit) * f(penalty)) : f(f(logit) / f(penalty));
  return f(penalised / f(temperature));
}

test('temperatures that vanish or overflow in float32 are refused; the smallest accepted one stays finite', () => {
  for (const t of [1e-38, 1e-44, 1e-46, 5e-324, 2.2e-308, 1e-7, 9.99e-7, Number.POSITIVE_INFINITY, 100.5]) {
    rejects(
      { ...good, sampling: { temperature: t } },
      'sampling.temperature',
      /must be 0 \(greedy\) or in \[1e-6, 100\]/,
    );
  }
  rejects({ ...good, sampling: { temperature: Number.NEGATIVE_INFINITY } }, 'sampling.temperature', /-Infinity/);
  // What the old range let through: 1e-38 overflows a logit of 10, 1e-46 narrows to 0 ("greedy" on the shard).
  assert.equal(lastStageScaled(10, 1, 1e-38), Number.POSITIVE_INFINITY);
  assert.equal(Math.fround(1e-46), 0);
  for (const t of [1e-6, 0.7, 100]) {
    assert.equal(validateGenerateRequest({ ...good, sampling: { temperature: t } }).sampling.temperature, t);
  }
  assert.equal(validateGenerateRequest({ ...good, sampling: { temperature: -0 } }).sampling.temperature, 0);
  // The documented bound: at both minima a logit of ±3.4e26 is still finite in float32, and float32 holds 1e-6 as a
  // normal number.
  for (const logit of [3.4e26, -3.4e26]) assert.ok(Number.isFinite(lastStageScaled(logit, 1e-6, 1e-6)));
  assert.ok(Math.fround(1e-6) > 1.1754943508222875e-38);
});

test('repetition penalties that vanish or overflow in float32 are refused', () => {
  for (const p of [1e-38, 1e-44, 1e-46, 5e-324, 9.9e-7, -1, Number.POSITIVE_INFINITY, 10.01]) {
    rejects({ ...good, sampling: { repetitionPenalty: p } }, 'sampling.repetition_penalty', /must be in \[1e-6, 10\]/);
  }
  assert.equal(lastStageScaled(10, 1e-38, 1), Number.POSITIVE_INFINITY);
  assert.equal(Math.fround(1e-46), 0);
  for (const p of [1e-6, 1.1, 10]) {
    assert.equal(
      validateGenerateRequest({ ...good, sampling: { repetitionPenalty: p } }).sampling.repetitionPenalty,
      p,
    );
  }
});

test('seed: [0, 2^32 - 1] as a number or a 64-bit decimal string, anything else refused naming the range', () => {
  for (const seed of [0, 4294967295, '4294967295']) {
    assert.equal(validateGenerateRequest({ ...good, sampling: { seed } }).sampling.seed, Number(seed));
  }
  for (const seed of [
    4294967296,
    '4294967296',
    -1,
    2 ** 53 + 2,
    '18446744073709551615',
    1.5,
    Number.POSITIVE_INFINITY,
  ]) {
    rejects({ ...good, sampling: { seed } }, 'sampling.seed', /must be an integer in \[0, 4294967295\]/);
  }
});
