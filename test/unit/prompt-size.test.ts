// smartResize (docs/model.md, "Smart resize") and the generated-image grid ("Generated image size"). Expected values
// were computed with the reference's Python formulas (Python 3 round = half to even).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { generationGrid, parseRatio, RatioError } from '../../lib/prompt/generation-size.js';
import { ImageSizeError, pythonRound, smartResize } from '../../lib/prompt/smart-resize.js';

describe('pythonRound', () => {
  it('rounds halves to even like Python 3', () => {
    const cases: [number, number][] = [
      [0.5, 0],
      [1.5, 2],
      [2.5, 2],
      [66.5, 66],
      [67.5, 68],
      [-0.5, 0],
      [-1.5, -2],
      [2.4999, 2],
      [66.50000000000001, 67],
      [7, 7],
    ];
    for (const [x, want] of cases) assert.equal(pythonRound(x), want, `round(${x})`);
  });
});

describe('smartResize', () => {
  const cases: [number, number, number, number, string][] = [
    [720, 720, 720, 720, 'already a multiple of 8, inside the bounds'],
    [532, 532, 528, 528, '66.5 → 66 (tie to even, JS Math.round would give 67)'],
    [540, 540, 544, 544, '67.5 → 68 (tie to even, upward)'],
    [516, 516, 512, 512, '64.5 → 64, lands exactly on min_pixels (not below)'],
    [508, 516, 512, 512, '63.5 → 64 and 64.5 → 64'],
    [504, 504, 512, 512, 'just below min_pixels: scaled up with ceil'],
    [256, 256, 512, 512, 'far below min_pixels'],
    [8, 8, 512, 512, 'smallest allowed side'],
    [8, 40, 232, 1152, 'aspect exactly 5 is allowed'],
    [500, 100, 1152, 232, 'aspect 5, portrait'],
    [1024, 1024, 1024, 1024, 'exactly max_pixels'],
    [1028, 1028, 1024, 1024, '128.5 → 128: rounding keeps it at max_pixels'],
    [1020, 1028, 1024, 1024, '127.5 → 128 and 128.5 → 128'],
    [1032, 1024, 1024, 1016, 'just above max_pixels: scaled down with floor'],
    [1036, 1036, 1024, 1024, 'above max_pixels, square'],
    [1080, 1920, 768, 1360, 'full HD'],
    [3000, 4000, 880, 1176, 'large photo'],
    [480, 640, 480, 640, 'VGA inside the bounds'],
    [767, 1023, 768, 1024, 'odd sizes'],
    [600, 3000, 456, 2288, 'aspect 5, above max_pixels'],
    [300, 1500, 304, 1504, 'aspect 5, above min_pixels after rounding'],
    [333, 777, 336, 784, 'odd sizes round up'],
  ];
  for (const [h, w, wantH, wantW, why] of cases) {
    it(`${h}x${w} → ${wantH}x${wantW} (${why})`, () => {
      assert.deepEqual(smartResize(h, w), { height: wantH, width: wantW });
    });
  }

  it('honours factor, minPixels and maxPixels options', () => {
    assert.deepEqual(smartResize(64, 64, { minPixels: 32 * 32, maxPixels: 64 * 64 }), { height: 64, width: 64 });
    assert.deepEqual(smartResize(100, 100, { factor: 16, minPixels: 0, maxPixels: 1e9 }), { height: 96, width: 96 });
  });

  it('rejects sides below 8 px, naming the limit', () => {
    for (const [h, w] of [
      [7, 100],
      [100, 7],
      [4, 4],
      [1, 1],
    ]) {
      assert.throws(
        () => smartResize(h, w),
        (e: unknown) => e instanceof ImageSizeError && /at least 8 px/.test(e.message),
      );
    }
  });

  it('rejects aspect ratio above 5, naming the limit', () => {
    for (const [h, w] of [
      [8, 41],
      [100, 501],
      [5001, 1000],
    ]) {
      assert.throws(
        () => smartResize(h, w),
        (e: unknown) => e instanceof ImageSizeError && /limit 5/.test(e.message),
      );
    }
  });

  it('rejects non-integer sizes and a maxPixels that leaves nothing', () => {
    assert.throws(() => smartResize(10.5, 20), ImageSizeError);
    assert.throws(() => smartResize(8, 40, { maxPixels: 64 }), ImageSizeError);
  });
});

describe('generationGrid (ratio "W:H" + area → tokens)', () => {
  const cases: [string, number, number, number][] = [
    ['1:1', 518400, 90, 90],
    ['16:9', 518400, 68, 120], // s = 60: h = round(67.5) = 68 (tie to even)
    ['9:16', 518400, 120, 68],
    ['4:3', 518400, 78, 104],
    ['3:2', 518400, 73, 110],
    ['2:1', 518400, 64, 127],
    ['21:9', 518400, 59, 137],
    ['5:4', 518400, 80, 101],
    ['1:1', 262144, 64, 64],
    ['1:1', 1048576, 128, 128],
    [' 16 : 9 ', 518400, 68, 120],
  ];
  for (const [ratio, area, h, w] of cases) {
    it(`"${ratio}", ${area} → ${h}x${w}`, () => {
      assert.deepEqual(generationGrid(ratio, area), { height: h, width: w });
    });
  }

  it('parses W first, then H', () => {
    assert.deepEqual(parseRatio('16:9'), { w: 16, h: 9 });
  });

  it('rejects malformed ratios and areas', () => {
    for (const bad of ['16x9', '16:', ':9', '0:1', '1:0', '-1:1', '1.5:1', '']) {
      assert.throws(() => generationGrid(bad, 518400), RatioError, bad);
    }
    assert.throws(() => generationGrid('1:1', 0), RatioError);
    assert.throws(() => generationGrid('1:1', Number.NaN), RatioError);
    assert.throws(() => generationGrid('1:1', 10), /each side must be ≥ 1/);
  });
});
