// Prompt ids built directly (docs/model.md, "Prompt formats") must equal tokenizing the reference's full prompt string,
// and the image-layout constraint must follow the reference helper's rules.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { imageLayoutAllowed, imageLayoutLength, layoutIds } from '../../lib/prompt/layout.js';
import {
  CFG_NEGATIVE_PROMPT,
  type CodeGrid,
  generationPromptIds,
  generationPrompts,
  negativePromptIds,
  understandingPromptIds,
} from '../../lib/prompt/prompt.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import type { Emu3Tokenizer } from '../../lib/tokenizer/tokenizer.js';
import { Rng } from '../../lib/util/rng.js';
import { makeTokenizerDir, removeDir } from './tokenizer-fixture.js';

let dir: string;
let tok: Emu3Tokenizer;
before(async () => {
  dir = await makeTokenizerDir();
  tok = loadTokenizer(dir);
});
after(() => removeDir(dir));

function randomGrid(height: number, width: number, seed: number): CodeGrid {
  const rng = new Rng(seed);
  return { height, width, codes: Array.from({ length: height * width }, () => rng.nextU32() % 32768) };
}

/** The reference's string form (processing_emu3.py), built with the special-token strings. */
function imageString(g: CodeGrid): string {
  let rows = '';
  for (let r = 0; r < g.height; r++) {
    for (let c = 0; c < g.width; c++) {
      rows += `<|visual token ${String(g.codes[r * g.width + c]).padStart(6, '0')}|>`;
    }
    rows += '<|extra_200|>';
  }
  return `<|image start|>${g.height}*${g.width}<|image token|>${rows}<|extra_201|><|image end|>`;
}

const TEXTS = [
  'Please describe the image.',
  'What is in this picture?',
  'Text with specials <|extra_203|> and <|image start|> inside <|visual token 000007|>.',
  'emoji 😀👨‍👩‍👧‍👦 and CJK 图片里有什么？',
  'CRLF\r\nline two\r\n',
  'digits 12345678901234567890 and 3.14159',
  '   whitespace   runs\t\t\n\n  ',
  'e\u0301 combining (NFC)',
  '',
  ' ',
  '.',
];

describe('understanding prompt (Emu3-Chat)', () => {
  const sizes: [number, number][] = [
    [1, 1],
    [3, 5],
    [8, 8],
    [16, 9],
    [64, 64],
  ];
  for (const [h, w] of sizes) {
    it(`${h}x${w} image: ids equal encode(full prompt string) for ${TEXTS.length} texts`, () => {
      const g = randomGrid(h, w, h * 100 + w);
      for (const text of TEXTS) {
        const str = `<|extra_203|>You are a helpful assistant. USER: ${imageString(g)}${text}. ASSISTANT:`;
        assert.deepEqual(understandingPromptIds(tok, text, [g]), tok.encode(str), JSON.stringify(text));
      }
    });
  }

  it('has the documented id layout: bos, text, boi 6 4 * 6 4 img, rows + eol, eof, eoi', () => {
    const g = randomGrid(2, 3, 1);
    const ids = understandingPromptIds(tok, 'Hi', [g]);
    const p = ids.indexOf(151852);
    assert.equal(ids[0], 151849);
    assert.deepEqual(ids.slice(p, p + 5), [151852, ...tok.encode('2*3'), 151851]);
    const body = ids.slice(p + 5, p + 5 + 2 * 4 + 2);
    assert.deepEqual(body, [
      ...Array.from(g.codes)
        .slice(0, 3)
        .map((c) => 151854 + c),
      151846,
      ...Array.from(g.codes)
        .slice(3)
        .map((c) => 151854 + c),
      151846,
      151847,
      151853,
    ]);
    assert.deepEqual(ids.slice(p + 15), tok.encode('Hi. ASSISTANT:'));
  });

  it('several images in order, and no image at all', () => {
    const a = randomGrid(2, 2, 5);
    const b = randomGrid(3, 1, 6);
    for (const text of TEXTS) {
      assert.deepEqual(
        understandingPromptIds(tok, text, [a, b]),
        tok.encode(
          `<|extra_203|>You are a helpful assistant. USER: ${imageString(a)}${imageString(b)}${text}. ASSISTANT:`,
        ),
      );
      assert.deepEqual(
        understandingPromptIds(tok, text, []),
        tok.encode(`<|extra_203|>You are a helpful assistant. USER: ${text}. ASSISTANT:`),
      );
    }
  });

  it('plain (Emu3-Stage1) template: bos + images + text', () => {
    const g = randomGrid(4, 4, 9);
    for (const text of TEXTS) {
      assert.deepEqual(
        understandingPromptIds(tok, text, [g], { template: 'plain' }),
        tok.encode(`<|extra_203|>${imageString(g)}${text}`),
      );
    }
  });

  it('rejects a code grid whose size or codes are wrong, naming the image', () => {
    assert.throws(
      () => understandingPromptIds(tok, 'x', [randomGrid(2, 2, 1), { height: 2, width: 2, codes: [1, 2, 3] }]),
      /image 1: 3 codes for a 2x2 grid \(need 4\)/,
    );
    assert.throws(
      () => understandingPromptIds(tok, 'x', [{ height: 1, width: 2, codes: [0, 32768] }]),
      /image 0: code 32768 at row 0, column 1 outside 0\.\.32767/,
    );
  });

  it('builds a 90x90 image prompt quickly', () => {
    const g = randomGrid(90, 90, 3);
    understandingPromptIds(tok, 'warm up', [g]);
    const t0 = performance.now();
    const ids = understandingPromptIds(tok, 'Please describe the image.', [g]);
    assert.ok(performance.now() - t0 < 50);
    const system = tok.encode('You are a helpful assistant. USER: ').length;
    const tail = tok.encode('Please describe the image.. ASSISTANT:').length;
    assert.equal(ids.length, 1 + system + 1 + 5 + 1 + 90 * 91 + 2 + tail);
  });
});

describe('generation prompt and CFG negative prompt (Emu3-Gen)', () => {
  const grids = [
    { height: 90, width: 90 },
    { height: 68, width: 120 },
    { height: 4, width: 7 },
  ];
  for (const grid of grids) {
    it(`${grid.height}x${grid.width}: ids equal encode(full prompt string)`, () => {
      const prefix = `<|image start|>${grid.height}*${grid.width}<|image token|>`;
      for (const text of TEXTS) {
        const positive = `${text} masterpiece, film grained, best quality.`;
        assert.deepEqual(generationPromptIds(tok, text, grid), tok.encode(`<|extra_203|>${positive}${prefix}`));
        assert.deepEqual(
          generationPromptIds(tok, text, grid, { qualitySuffix: false }),
          tok.encode(`<|extra_203|>${text}${prefix}`),
        );
      }
      assert.deepEqual(negativePromptIds(tok, grid), tok.encode(`<|extra_203|>${CFG_NEGATIVE_PROMPT}${prefix}`));
      const both = generationPrompts(tok, 'a cat', grid, { negativePrompt: 'ugly' });
      assert.deepEqual(both.negative, tok.encode(`<|extra_203|>ugly${prefix}`));
      const size = tok.encode(`${grid.height}*${grid.width}`);
      assert.deepEqual(both.prompt.slice(-(size.length + 2)), [151852, ...size, 151851]);
    });
  }

  it('the negative prompt text is the reference one', () => {
    assert.ok(CFG_NEGATIVE_PROMPT.startsWith('lowres, bad anatomy, bad hands, text, error, missing fingers'));
    assert.ok(CFG_NEGATIVE_PROMPT.endsWith('signature, watermark, username, blurry.'));
  });
});

describe('image-layout constraint (Emu3-Gen)', () => {
  let ids: ReturnType<typeof layoutIds>;
  before(() => {
    ids = layoutIds(tok);
  });

  /** The reference helper, verbatim in structure: returns the allowed id list for an offset. */
  function reference(h: number, w: number, offset: number): number[] | 'visual' {
    if (offset % (w + 1) === 0) return [151846];
    if (offset === (w + 1) * h + 1) return [151847];
    if (offset === (w + 1) * h + 2) return [151853];
    if (offset === (w + 1) * h + 3) return [151850];
    if (offset > (w + 1) * h + 3) return [151643];
    return 'visual';
  }

  it('allows exactly H·(W+1)+3 positions before padding, in the layout rows+eol, eof, eoi, eos', () => {
    for (const [h, w] of [
      [90, 90],
      [68, 120],
      [1, 3],
      [5, 4],
      [3, 17],
    ]) {
      const total = imageLayoutLength({ height: h, width: w });
      assert.equal(total, h * (w + 1) + 3);
      let step = 0;
      for (let r = 0; r < h; r++) {
        for (let c = 0; c < w; c++) {
          assert.deepEqual(imageLayoutAllowed({ height: h, width: w }, step++, ids), {
            kind: 'visual',
            start: 151854,
            count: 32768,
          });
        }
        assert.deepEqual(imageLayoutAllowed({ height: h, width: w }, step++, ids), { kind: 'single', id: 151846 });
      }
      for (const id of [151847, 151853, 151850]) {
        assert.deepEqual(imageLayoutAllowed({ height: h, width: w }, step++, ids), { kind: 'single', id });
      }
      assert.equal(step, total);
      const after = imageLayoutAllowed({ height: h, width: w }, step, ids);
      assert.ok(after.kind === 'single' && (after.id === 151643 || after.id === 151846));
    }
    assert.equal(imageLayoutLength({ height: 90, width: 90 }), 8193);
  });

  it('matches the reference rule order at every step, including widths 1 and 2 and past the end', () => {
    for (const [h, w] of [
      [1, 1],
      [2, 1],
      [3, 2],
      [2, 2],
      [4, 3],
      [6, 5],
    ]) {
      for (let step = 0; step < h * (w + 1) + 12; step++) {
        const got = imageLayoutAllowed({ height: h, width: w }, step, ids);
        const want = reference(h, w, step + 1);
        assert.deepEqual(got.kind === 'visual' ? 'visual' : [got.id], want, `${h}x${w} step ${step}`);
      }
    }
  });

  it('rejects bad steps and grids', () => {
    assert.throws(() => imageLayoutAllowed({ height: 2, width: 2 }, -1, ids), /layout step -1/);
    assert.throws(() => imageLayoutAllowed({ height: 0, width: 2 }, 0, ids), /layout grid 0x2/);
  });
});
