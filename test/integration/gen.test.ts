// Emu3-Gen through the real system (vq + 2 shards + coordinator over emu3-tiny): the served codes equal a float64
// reference loop (test/reference/gen-f64.ts) for small grids, greedy and seeded, with guidance and the layout
// constraint; the PNG follows the ratio; same seed → same PNG bytes whatever runs beside it (chat included); a
// cancel mid-image frees both sequences on every stage; Tokenize gives upstream's G-mode prompt.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import type * as grpc from '@grpc/grpc-js';
import sharp from 'sharp';
import { binPath } from '../../cli/system.js';
import { imageLayoutLength, layoutIds } from '../../lib/prompt/index.js';
import { generationPrompts } from '../../lib/prompt/prompt.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { Emu3Reference } from '../reference/emu3-f64.js';
import { referenceImageTokens } from '../reference/gen-f64.js';
import { generate, type Harness, shardInfos, sleep, startHarness, unary } from './pipeline-harness.js';

const run = promisify(execFile);
let h: Harness;
let tok: Emu3Tokenizer;
let ref: Emu3Reference;
before(async () => {
  h = await startHarness();
  tok = loadTokenizer(h.modelDir);
  ref = Emu3Reference.load(h.modelDir);
});
after(async () => {
  await h?.close();
});

interface ImageAnswer {
  progress: { rowsDone: number; rows: number; rowCodes: number[] }[];
  // biome-ignore lint/suspicious/noExplicitAny: the decoded Final message
  final: any;
}

function imagine(request: object, opts: { cancelAfterRows?: number } = {}) {
  const call = (
    h.client as unknown as { Generate(r: object): grpc.ClientReadableStream<Record<string, unknown>> }
  ).Generate({ task: 'TASK_GENERATE_IMAGE', ...request });
  const answer: ImageAnswer = { progress: [], final: null };
  const done = new Promise<ImageAnswer>((resolve, reject) => {
    call.on('data', (m: { progress?: ImageAnswer['progress'][number]; final?: unknown }) => {
      if (m.progress) {
        answer.progress.push(m.progress);
        if (answer.progress.length === opts.cancelAfterRows) call.cancel();
      }
      if (m.final) answer.final = m.final;
    });
    call.on('error', reject);
    call.on('end', () => resolve(answer));
  });
  return { call, done };
}

function referenceCodes(
  text: string,
  grid: { height: number; width: number },
  o: { temperature: number; seed: number; guidance: number },
) {
  const { prompt, negative } = generationPrompts(tok, text, grid);
  const ids = layoutIds(tok);
  const tokens = referenceImageTokens(ref, prompt, negative, {
    grid,
    ids,
    guidanceScale: o.guidance,
    temperature: o.temperature,
    topK: 2048,
    seed: o.seed,
  });
  assert.equal(tokens.length, imageLayoutLength(grid));
  assert.deepEqual(tokens.slice(-3), [ids.eof, ids.eoi, ids.eos], 'the reference ends as the layout says');
  return tokens.filter((t) => t >= ids.visualStart).map((t) => t - ids.visualStart);
}

test(
  'greedy with guidance: the served 4×4 grid equals the float64 reference; PNG 32×32; a progress row each',
  { timeout: 300_000 },
  async () => {
    const text = 'a lighthouse at dusk';
    const a = await imagine({
      parts: [{ text }],
      sampling: { temperature: 0 },
      image: { width: 32, height: 32, returnCodes: true, previewRows: true },
    }).done;
    const img = a.final.image;
    assert.deepEqual([img.gridHeight, img.gridWidth, img.width, img.height], [4, 4, 32, 32]);
    assert.equal(a.final.finishReason, 'FINISH_REASON_EOS');
    assert.equal(a.final.usage.completionTokens, imageLayoutLength({ height: 4, width: 4 }));
    assert.deepEqual(
      img.codes,
      referenceCodes(text, { height: 4, width: 4 }, { temperature: 0, seed: 0, guidance: 3 }),
    );
    assert.deepEqual(
      a.progress.map((p) => ({ rowsDone: p.rowsDone, rows: p.rows })),
      [1, 2, 3, 4].map((rowsDone) => ({ rowsDone, rows: 4 })),
    );
    assert.deepEqual(
      a.progress.flatMap((p) => p.rowCodes),
      img.codes,
      'the row previews are the grid, row by row',
    );
    const meta = await sharp(img.png).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 32, 32]);
  },
);

test(
  'seeded top-k sampling with guidance 2.5 on a 2:1 grid equals the reference; same seed → same PNG bytes beside other work',
  { timeout: 300_000 },
  async () => {
    const text = 'two boats';
    const request = {
      parts: [{ text }],
      sampling: { seed: 1234 },
      image: { width: 48, height: 24, guidanceScale: 2.5, returnCodes: true },
    };
    const alone = await imagine(request).done;
    const img = alone.final.image;
    assert.deepEqual([img.gridHeight, img.gridWidth, img.width, img.height], [3, 6, 48, 24]);
    assert.equal(alone.final.seed, 1234);
    assert.deepEqual(
      alone.progress.map((p) => p.rowCodes.length),
      [0, 0, 0],
      'no row codes unless asked',
    );
    assert.deepEqual(
      img.codes,
      referenceCodes(text, { height: 3, width: 6 }, { temperature: 1, seed: 1234, guidance: 2.5 }),
    );
    // again, beside a chat answer and another image: Chat and Gen share micro-batches, the answer does not change
    const chat = generate(h.client, {
      parts: [{ text: 'Tell me a story.' }],
      sampling: { maxNewTokens: 40, ignoreEos: true },
    });
    const other = imagine({ parts: [{ text: 'a forest' }], sampling: { seed: 5 }, image: { ratio: '1:1' } });
    const again = await imagine(request).done;
    assert.ok(Buffer.from(again.final.image.png).equals(Buffer.from(img.png)), 'identical PNG bytes');
    assert.deepEqual(again.final.image.codes, img.codes);
    assert.equal((await chat.done).ids.length, 40);
    const o = await other.done;
    assert.deepEqual([o.final.image.width, o.final.image.height], [128, 128]);
    // the unconditional prompt of this size was cached by the first run: its KV came from the prefix cache
    const { negative } = generationPrompts(tok, text, { height: 3, width: 6 });
    assert.ok(again.final.usage.cachedTokens >= negative.length - 1, `cached ${again.final.usage.cachedTokens}`);
  },
);

test('Tokenize in G mode gives the tokenized upstream prompt string', { timeout: 60_000 }, async () => {
  const text = 'a cat on a mat';
  const r = await unary<{ tokenIds: number[]; images: { height: number; width: number }[] }>(h.client, 'Tokenize', {
    parts: [{ text }],
    task: 'TASK_GENERATE_IMAGE',
    image: { ratio: '2:1' },
  });
  // 2:1 at 128²: s = √(16384/2) = 90.51; rows round(11.31) = 11, columns round(22.63) = 23
  assert.deepEqual(r.images, [{ height: 11, width: 23 }]);
  const upstream = `<|extra_203|>${text} masterpiece, film grained, best quality.<|image start|>11*23<|image token|>`;
  assert.deepEqual(r.tokenIds, tok.encode(upstream));
});

test('cancel mid-image frees both sequences on every stage', { timeout: 300_000 }, async () => {
  const held = async () => (await shardInfos(h.system)).map((i) => [i.kv_slots_in_use, i.kv_tokens_in_use]);
  const baseline = await held();
  const { done } = imagine(
    { parts: [{ text: 'a mountain' }], sampling: { seed: 3 }, image: { ratio: '1:1' } },
    { cancelAfterRows: 2 },
  );
  await assert.rejects(done, (e: grpc.ServiceError) => e.code === 1);
  let now = await held();
  for (let i = 0; i < 100 && JSON.stringify(now) !== JSON.stringify(baseline); i++) {
    await sleep(100);
    now = await held();
  }
  assert.deepEqual(now, baseline, 'every stage holds what it held before the image');
});

test('bad image requests are INVALID_ARGUMENT naming the field', { timeout: 60_000 }, async () => {
  const cases: [object, RegExp][] = [
    [{ image: { ratio: '3:x' } }, /image\.ratio/],
    [{ image: { ratio: '9:1' } }, /image\.ratio.*aspect/],
    [{ image: { ratio: '1:1', width: 64, height: 64 } }, /image\.ratio.*not both/],
    [{ image: { guidanceScale: Number.NaN } }, /image\.guidance_scale/],
    [{ image: { guidanceScale: -2 } }, /image\.guidance_scale/],
    [{ parts: [{ text: 'word '.repeat(2000) }] }, /parts.*context/],
  ];
  for (const [over, field] of cases)
    await assert.rejects(imagine({ parts: [{ text: 'x' }], ...over }).done, (e: grpc.ServiceError) => {
      assert.equal(e.code, 3, e.details);
      assert.match(e.details, field);
      return true;
    });
});

test('emu3 imagine writes the same PNG as the API for the same seed and size', { timeout: 120_000 }, async () => {
  const out = join(h.work, 'cli.png');
  const args = [
    'imagine',
    '--addr',
    h.system.address,
    '--size',
    '32x32',
    '--seed',
    '77',
    '--guidance',
    '2',
    '--out',
    out,
  ];
  const { stderr } = await run(process.execPath, [binPath(), ...args, 'a small red house'], { timeout: 60_000 });
  assert.match(stderr, /\[#+\] 4\/4 rows/);
  assert.match(stderr, /wrote .*cli\.png \(32x32 px\)/);
  const api = await imagine({
    parts: [{ text: 'a small red house' }],
    sampling: { seed: 77 },
    image: { width: 32, height: 32, guidanceScale: 2 },
  }).done;
  assert.ok(readFileSync(out).equals(Buffer.from(api.final.image.png)));
});
