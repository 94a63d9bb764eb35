import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CFG_NEGATIVE_PROMPT } from '../../lib/prompt/prompt.js';
import { InvalidArgumentError } from '../../services/coordinator/errors.js';
import {
  checkImagePromptLength,
  checkPromptLength,
  defaultLimits,
  type GenerateRequestLike,
  validateGenerateRequest,
} from '../../services/coordinator/request-validation.js';

const image = { data: new Uint8Array([0x89, 0x50, 0x4e, 0x47]), mimeType: 'image/png' };
const good: GenerateRequestLike = { parts: [{ image }, { text: 'Describe the image.' }] };

function rejects(req: GenerateRequestLike, field: string, limit: RegExp, limits = defaultLimits) {
  assert.throws(
    () => validateGenerateRequest(req, limits),
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
  rejects(
    { ...good, task: 'TASK_GENERATE_IMAGE' },
    'task',
    /does not generate images \(its config.json has no image_area\)/,
  );
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

// TASK_GENERATE_IMAGE on a model with image_area 128² (emu3-tiny) and a 2,048-token context.
const genLimits = { ...defaultLimits, imageArea: 128 * 128, contextLength: 2048, maxImageCodes: 16384 };
const gen = (over: Partial<GenerateRequestLike> = {}): GenerateRequestLike => ({
  parts: [{ text: 'a red fox' }],
  task: 'TASK_GENERATE_IMAGE',
  ...over,
});

test('TASK_GENERATE_IMAGE defaults: 1:1 from image_area, guidance 3, top_k 2048 at temperature 1, the negative prompt', () => {
  const v = validateGenerateRequest(gen(), genLimits);
  assert.equal(v.task, 'generate');
  assert.deepEqual(v.image, {
    grid: { height: 16, width: 16 },
    guidanceScale: 3,
    negativePrompt: CFG_NEGATIVE_PROMPT,
    qualitySuffix: true,
    returnCodes: false,
    previewRows: false,
  });
  assert.deepEqual([v.sampling.temperature, v.sampling.topK, v.sampling.topP], [1, 2048, 1]);
  // "16:9" at 518,400 px is upstream's 68×120; a pixel size is its ratio in lowest terms and its area
  const real = { ...genLimits, imageArea: 720 * 720, contextLength: 9216 };
  assert.deepEqual(validateGenerateRequest(gen({ image: { ratio: '16:9' } }), real).image?.grid, {
    height: 68,
    width: 120,
  });
  assert.deepEqual(validateGenerateRequest(gen({ image: { width: 48, height: 24 } }), genLimits).image?.grid, {
    height: 3,
    width: 6,
  });
  const g = validateGenerateRequest(
    gen({ image: { guidanceScale: 0, negativePrompt: '', qualitySuffix: false, returnCodes: true } }),
    genLimits,
  );
  assert.deepEqual(
    [g.image?.guidanceScale, g.image?.negativePrompt, g.image?.qualitySuffix, g.image?.returnCodes],
    [0, '', false, true],
  );
});

test('bad image requests are INVALID_ARGUMENT naming the field', () => {
  const r = (over: Partial<GenerateRequestLike>, field: string, limit: RegExp) =>
    rejects(gen(over), field, limit, genLimits);
  r({ image: { ratio: 'wide' } }, 'image.ratio', /must be "W:H"/);
  r({ image: { ratio: '0:1' } }, 'image.ratio', /at least 1/);
  r({ image: { ratio: '1:-2' } }, 'image.ratio', /must be "W:H"/);
  r({ image: { ratio: '6:1' } }, 'image.ratio', /aspect ratio 6.000 exceeds the limit 5/);
  r({ image: { ratio: '101:100' } }, 'image.ratio', /at most 100/);
  r({ image: { ratio: '1:1', width: 64, height: 64 } }, 'image.ratio', /not both/);
  r({ image: { width: 64 } }, 'image.height', /go together/);
  r({ image: { width: 4, height: 4 } }, 'image.width', /\[8, 4096\]/);
  r({ image: { width: 16, height: 16 } }, 'image.width', /2x2 grid: at least 3 columns/);
  r({ image: { guidanceScale: Number.NaN } }, 'image.guidance_scale', /NaN must be in \[0, 100\]/);
  r({ image: { guidanceScale: -1 } }, 'image.guidance_scale', /-1/);
  r({ image: { negativePrompt: 'x'.repeat(5000) } }, 'image.negative_prompt', /longer than 4096/);
  r({ parts: [{ image }] }, 'parts[0]', /text parts only/);
  r({ parts: [{ text: 'a <|image token|> b' }] }, 'parts[0].text', /must not contain/);
  r({ sampling: { maxNewTokens: 10 } }, 'sampling.max_new_tokens', /does not apply/);
  r({ sampling: { stop: ['x'] } }, 'sampling.stop', /does not apply/);
  r({ sampling: { repetitionPenalty: 1.2 } }, 'sampling.repetition_penalty', /does not apply/);
  r({ topLogprobs: 2 }, 'top_logprobs', /must be 0/);
  r({ image: { width: 4096, height: 4096 } }, 'image.width', /more than the 16384 codes/);
  rejects(gen({ image: { ratio: '1:1' } }), 'image.ratio', /more than the context of 200/, {
    ...genLimits,
    contextLength: 200,
  });
  rejects({ ...good, image: { ratio: '1:1' } }, 'image', /TASK_GENERATE_IMAGE only/, genLimits);
  // the prompt is measured once built: prompt (or negative prompt) + the layout must fit the context
  assert.throws(
    () => checkImagePromptLength(1800, 40, { height: 16, width: 16 }, 2048),
    (e: unknown) => e instanceof InvalidArgumentError && e.field === 'parts' && /275 tokens/.test(e.message),
  );
  assert.throws(
    () => checkImagePromptLength(10, 1900, { height: 16, width: 16 }, 2048),
    (e: unknown) => e instanceof InvalidArgumentError && e.field === 'image.negative_prompt',
  );
  checkImagePromptLength(1773, 40, { height: 16, width: 16 }, 2048);
});
