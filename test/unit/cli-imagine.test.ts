// emu3 imagine's flags → the GenerateRequest (proto field names), its refusals, and the progress bar.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Flags, parseArgs, UsageError } from '../../cli/args.js';
import { imagineRequest, imagineSpec, progressBar } from '../../cli/imagine-request.js';

const flags = (argv: string[]) => new Flags('imagine', parseArgs(imagineSpec, argv));

test('imagine: flags become TASK_GENERATE_IMAGE with the image and sampling fields', () => {
  assert.deepEqual(imagineRequest(flags([]), 'a fox'), {
    parts: [{ text: 'a fox' }],
    task: 'TASK_GENERATE_IMAGE',
    sampling: {},
    image: {},
  });
  const req = imagineRequest(
    flags([
      '--ratio=16:9',
      '--guidance',
      '2.5',
      '--negative',
      'blurry',
      '--seed',
      '42',
      '--temperature',
      '0.9',
      '--top-k',
      '100',
      '--no-quality-suffix',
      '--codes',
      'c.json',
    ]),
    'a fox',
  );
  assert.deepEqual(req.image, {
    ratio: '16:9',
    guidanceScale: 2.5,
    negativePrompt: 'blurry',
    qualitySuffix: false,
    returnCodes: true,
  });
  assert.deepEqual(req.sampling, { temperature: 0.9, topK: 100, seed: 42 });
  assert.deepEqual(imagineRequest(flags(['--size', '720x480']), 'x').image, { width: 720, height: 480 });
});

test('imagine: bad flags are refused naming the flag', () => {
  const bad = (argv: string[], re: RegExp) =>
    assert.throws(
      () => imagineRequest(flags(argv), 'x'),
      (e: unknown) => e instanceof UsageError && re.test(e.message),
    );
  bad(['--ratio', '16/9'], /--ratio must be "W:H"/);
  bad(['--size', '720'], /--size must be "WIDTHxHEIGHT"/);
  bad(['--ratio', '1:1', '--size', '8x8'], /not both/);
  bad(['--guidance', '-1'], /--guidance must be in \[0, 100\]/);
  bad(['--guidance', 'NaN'], /--guidance/);
  bad(['--seed', '-3'], /--seed/);
  bad(['--temperature', '101'], /--temperature/);
});

test('progress bar: cells filled in proportion, rows counted', () => {
  assert.equal(progressBar(0, 4, 8), '[--------] 0/4 rows');
  assert.equal(progressBar(2, 4, 8), '[####----] 2/4 rows');
  assert.equal(progressBar(90, 90, 10), '[##########] 90/90 rows');
  assert.equal(progressBar(9, 90, 10), '[#---------]  9/90 rows');
});
