import assert from 'node:assert/strict';
import { test } from 'node:test';
import { validateGenerateRequest } from '../../services/coordinator/request-validation.js';
import { GatewayError } from '../../services/gateway/errors.js';
import { generationNotAvailable, intendedSize, mapImageRequest } from '../../services/gateway/images.js';

const ctx = { servedModel: 'emu3-tiny', requestId: 'img-1' };
const refused = (param: string) => (e: unknown) => e instanceof GatewayError && e.status === 400 && e.param === param;

test('size WxH → the ratio in lowest terms, the area and the token grid (pixels / 8)', () => {
  assert.deepEqual(intendedSize('1024x1024'), {
    ratio: '1:1',
    area: 1048576,
    grid: { height: 128, width: 128 },
    pixels: { width: 1024, height: 1024 },
  });
  // Emu3-Gen's default: 1:1 at 720x720 pixels is a 90x90 grid
  assert.deepEqual(intendedSize('720x720')?.grid, { height: 90, width: 90 });
  const wide = intendedSize('1792x1024');
  assert.equal(wide?.ratio, '7:4');
  assert.deepEqual(wide?.grid, { height: 128, width: 224 });
  assert.equal(intendedSize('auto'), null);
  assert.throws(() => intendedSize('1024'), refused('size'));
  assert.throws(() => intendedSize('4x4'), refused('size'));
  assert.throws(() => intendedSize('5000x100'), refused('size'));
});

test('an image request becomes Generate with TASK_GENERATE_IMAGE and the prompt as its text', () => {
  const plan = mapImageRequest({ prompt: 'a red fox', model: 'emu3-tiny', size: '1024x1024', n: 1, user: 'u' }, ctx);
  assert.deepEqual(plan.request, {
    parts: [{ text: 'a red fox' }],
    task: 'TASK_GENERATE_IMAGE',
    sampling: {},
    requestId: 'img-1',
    returnTokenIds: false,
    topLogprobs: 0,
    image: { width: 1024, height: 1024 },
  });
  assert.equal(mapImageRequest({ prompt: 'x' }, ctx).request.image, undefined, 'size auto: the default size');
  assert.equal(plan.responseFormat, 'b64_json');
  assert.equal(plan.size?.ratio, '1:1');
  assert.equal(mapImageRequest({ prompt: 'x' }, ctx).size, null);
  assert.throws(() => mapImageRequest({}, ctx), refused('prompt'));
  assert.throws(() => mapImageRequest({ prompt: 'x', n: 2 }, ctx), refused('n'));
  assert.throws(() => mapImageRequest({ prompt: 'x', response_format: 'url' }, ctx), refused('response_format'));
  assert.throws(() => mapImageRequest({ prompt: 'x', style: 'vivid' }, ctx), refused('style'));
  assert.throws(() => mapImageRequest({ prompt: 'x', bogus: 1 }, ctx), refused('bogus'));
  assert.throws(
    () => mapImageRequest({ prompt: 'x', model: 'dall-e-3' }, ctx),
    (e: unknown) => e instanceof GatewayError && e.status === 404,
  );
});

test("a model without image generation: the coordinator's refusal of the task is 501; other refusals are not", () => {
  const plan = mapImageRequest({ prompt: 'a red fox', size: '1024x1024' }, ctx);
  let details = '';
  try {
    validateGenerateRequest(plan.request);
    assert.fail('the coordinator accepted TASK_GENERATE_IMAGE on a model without image_area');
  } catch (err) {
    details = (err as Error).message;
  }
  const e = generationNotAvailable(3, details, plan.size);
  assert.ok(e);
  assert.equal(e.status, 501);
  assert.equal(e.code, 'image_generation_not_available');
  assert.equal(e.retryable, false);
  assert.match(e.message, /image generation is not available/);
  assert.match(e.message, /ratio 1:1, a 128×128 token grid/);
  assert.equal(generationNotAvailable(3, 'parts: at least one part', plan.size), null);
  assert.equal(generationNotAvailable(8, details, plan.size), null);
});
