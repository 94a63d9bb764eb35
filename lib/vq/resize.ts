// Pillow-compatible BICUBIC resize: `Image.resize((W, H), Image.BICUBIC, reducing_gap=None)` on an 8-bit image,
// bit for bit. Pillow (libImaging/Resample.c) resamples separably: a horizontal pass into an 8-bit intermediate
// image, then a vertical pass; a pass whose size does not change is skipped, and an unchanged size is a plain copy.
// Each output sample is a fixed-point dot product with coefficients of the Keys cubic (a = -0.5), whose support is
// widened by the scale when downscaling (antialiasing), normalised to sum 1, then rounded to PRECISION_BITS bits.

/** 32 bits minus 8 for the sample minus 2 for the sign and the overshoot of the negative lobes (as in Pillow). */
const PRECISION_BITS = 22;
const ONE = 1 << PRECISION_BITS;
const HALF = 1 << (PRECISION_BITS - 1);
const BICUBIC_SUPPORT = 2;

/** Keys' cubic convolution kernel with a = -0.5, evaluated in the same operation order as Pillow (double). */
function keysCubic(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** Per output sample: the first input index, the number of taps, and `taps` fixed-point weights (zero padded). */
export interface ResampleCoefficients {
  taps: number;
  first: Int32Array;
  count: Int32Array;
  weights: Int32Array;
}

/** Coefficients for resampling one axis from `inSize` to `outSize` samples (Pillow's box = the whole axis). */
export function bicubicCoefficients(inSize: number, outSize: number): ResampleCoefficients {
  const scale = inSize / outSize;
  const filterScale = scale < 1 ? 1 : scale;
  const support = BICUBIC_SUPPORT * filterScale;
  const taps = Math.ceil(support) * 2 + 1;
  const invFilterScale = 1 / filterScale;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * taps);
  const w = new Float64Array(taps);
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    // C's (int) cast truncates toward zero; the bounds are then clamped to the axis.
    let lo = Math.trunc(center - support + 0.5);
    if (lo < 0) lo = 0;
    let hi = Math.trunc(center + support + 0.5);
    if (hi > inSize) hi = inSize;
    const n = hi - lo;
    let sum = 0;
    for (let j = 0; j < n; j++) {
      w[j] = keysCubic((j + lo - center + 0.5) * invFilterScale);
      sum += w[j];
    }
    const row = i * taps;
    for (let j = 0; j < n; j++) {
      const v = sum !== 0 ? w[j] / sum : w[j];
      // Round half away from zero into fixed point.
      weights[row + j] = v < 0 ? Math.trunc(-0.5 + v * ONE) : Math.trunc(0.5 + v * ONE);
    }
    first[i] = lo;
    count[i] = n;
  }
  return { taps, first, count, weights };
}

// Sums stay within int32 as in Pillow: |weights| sum to < 2 (in fixed point 2^23) and samples are < 2^8.
function clip8(acc: number): number {
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** Horizontal pass over rows [rowStart, rowStart + rows) of `src` (interleaved, `channels` per pixel). */
function resampleRows(
  src: Uint8Array,
  srcWidth: number,
  rowStart: number,
  rows: number,
  channels: number,
  c: ResampleCoefficients,
  outWidth: number,
): Uint8Array {
  if (channels === 3) return resampleRowsRgb(src, srcWidth, rowStart, rows, c, outWidth);
  const out = new Uint8Array(outWidth * rows * channels);
  const { taps, first, count, weights } = c;
  const srcStride = srcWidth * channels;
  let o = 0;
  for (let y = 0; y < rows; y++) {
    const rowBase = (rowStart + y) * srcStride;
    for (let x = 0; x < outWidth; x++) {
      const k0 = x * taps;
      const n = count[x];
      const p0 = rowBase + first[x] * channels;
      for (let ch = 0; ch < channels; ch++) {
        let acc = HALF;
        for (let j = 0, p = p0 + ch; j < n; j++, p += channels) acc = (acc + Math.imul(src[p], weights[k0 + j])) | 0;
        out[o++] = clip8(acc);
      }
    }
  }
  return out;
}

/** The 3-channel horizontal pass, unrolled over the channels (the hot path: every RGB resize). */
function resampleRowsRgb(
  src: Uint8Array,
  srcWidth: number,
  rowStart: number,
  rows: number,
  c: ResampleCoefficients,
  outWidth: number,
): Uint8Array {
  const out = new Uint8Array(outWidth * rows * 3);
  const { taps, first, count, weights } = c;
  const srcStride = srcWidth * 3;
  let o = 0;
  for (let y = 0; y < rows; y++) {
    const rowBase = (rowStart + y) * srcStride;
    for (let x = 0; x < outWidth; x++) {
      const k0 = x * taps;
      const n = count[x];
      let p = rowBase + first[x] * 3;
      let r = HALF;
      let g = HALF;
      let b = HALF;
      for (let j = 0; j < n; j++, p += 3) {
        const k = weights[k0 + j];
        r = (r + Math.imul(src[p], k)) | 0;
        g = (g + Math.imul(src[p + 1], k)) | 0;
        b = (b + Math.imul(src[p + 2], k)) | 0;
      }
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
      o += 3;
    }
  }
  return out;
}

/** Vertical pass: every output row is a weighted sum of `count` consecutive input rows. */
function resampleColumns(
  src: Uint8Array,
  rowLength: number,
  rowOffset: number,
  c: ResampleCoefficients,
  outHeight: number,
): Uint8Array {
  const out = new Uint8Array(rowLength * outHeight);
  const { taps, first, count, weights } = c;
  for (let y = 0; y < outHeight; y++) {
    const n = count[y];
    const k0 = y * taps;
    const base = (first[y] - rowOffset) * rowLength;
    const o = y * rowLength;
    for (let i = 0; i < rowLength; i++) {
      let acc = HALF;
      for (let j = 0, p = base + i; j < n; j++, p += rowLength) acc = (acc + Math.imul(src[p], weights[k0 + j])) | 0;
      out[o + i] = clip8(acc);
    }
  }
  return out;
}

/**
 * Resizes an interleaved 8-bit image (`channels` samples per pixel, row-major) like Pillow's BICUBIC resize.
 * Returns a new buffer of `width * height * channels` bytes (a copy when the size is unchanged).
 */
export function resizeBicubic(
  src: Uint8Array,
  srcWidth: number,
  srcHeight: number,
  width: number,
  height: number,
  channels = 3,
): Uint8Array {
  for (const [name, v] of [
    ['source width', srcWidth],
    ['source height', srcHeight],
    ['target width', width],
    ['target height', height],
  ] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`resizeBicubic: ${name} must be an integer >= 1, got ${v}`);
  }
  if (!Number.isInteger(channels) || channels < 1 || channels > 4) {
    throw new RangeError(`resizeBicubic: channels must be 1..4, got ${channels}`);
  }
  const expected = srcWidth * srcHeight * channels;
  if (src.length !== expected) {
    throw new RangeError(
      `resizeBicubic: source has ${src.length} bytes, expected ${srcWidth}x${srcHeight}x${channels} = ${expected}`,
    );
  }
  const needHorizontal = width !== srcWidth;
  const needVertical = height !== srcHeight;
  if (!needHorizontal && !needVertical) return src.slice();
  if (!needVertical)
    return resampleRows(src, srcWidth, 0, srcHeight, channels, bicubicCoefficients(srcWidth, width), width);

  const vertical = bicubicCoefficients(srcHeight, height);
  if (!needHorizontal) return resampleColumns(src, srcWidth * channels, 0, vertical, height);
  // Like Pillow, the horizontal pass only covers the rows the vertical pass reads.
  const firstRow = vertical.first[0];
  const lastRow = vertical.first[height - 1] + vertical.count[height - 1];
  const horizontal = bicubicCoefficients(srcWidth, width);
  const mid = resampleRows(src, srcWidth, firstRow, lastRow - firstRow, channels, horizontal, width);
  return resampleColumns(mid, width * channels, firstRow, vertical, height);
}
