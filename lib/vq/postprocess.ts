// VQ decoder output → PNG (docs/model.md, "Postprocess"): un-normalise (x - (-m/s)) / (1/s) in float32, rescale by
// 1 / rescale_factor via float64 then float32 (transformers' rescale), clip to [0, 255], truncate to uint8, HWC, PNG.
import sharp from 'sharp';
import { PREPROCESSOR_DEFAULTS, type PreprocessorConfig } from './preprocess.js';

type Normalisation = Pick<PreprocessorConfig, 'imageMean' | 'imageStd' | 'rescaleFactor'>;

/** float32 [3, height, width] decoder output → interleaved RGB bytes (HWC). */
export function pixelsToRgb(
  pixels: Float32Array,
  height: number,
  width: number,
  cfg: Normalisation = PREPROCESSOR_DEFAULTS,
): Uint8Array {
  const plane = height * width;
  if (!Number.isInteger(height) || !Number.isInteger(width) || height < 1 || width < 1) {
    throw new RangeError(`pixelsToRgb: size ${height}x${width} must be positive integers`);
  }
  if (pixels.length !== 3 * plane) {
    throw new RangeError(`pixelsToRgb: got ${pixels.length} values, expected 3x${height}x${width} = ${3 * plane}`);
  }
  const scale = 1 / cfg.rescaleFactor;
  const out = new Uint8Array(3 * plane);
  for (let ch = 0; ch < 3; ch++) {
    const mean = Math.fround(-cfg.imageMean[ch] / cfg.imageStd[ch]);
    const std = Math.fround(1 / cfg.imageStd[ch]);
    const base = ch * plane;
    for (let i = 0; i < plane; i++) {
      const unnormalised = Math.fround(Math.fround(pixels[base + i] - mean) / std);
      const v = Math.fround(unnormalised * scale);
      // clip then astype(uint8): truncation; NaN (never expected) becomes 0.
      out[i * 3 + ch] = v >= 255 ? 255 : v > 0 ? Math.trunc(v) : 0;
    }
  }
  return out;
}

/** Interleaved RGB bytes → PNG file bytes. */
export async function rgbToPng(rgb: Uint8Array, height: number, width: number): Promise<Buffer> {
  if (rgb.length !== height * width * 3) {
    throw new RangeError(`rgbToPng: got ${rgb.length} bytes, expected ${height}x${width}x3 = ${height * width * 3}`);
  }
  return sharp(rgb, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
}

/** float32 [3, height, width] decoder output → PNG bytes. */
export async function postprocessToPng(
  pixels: Float32Array,
  height: number,
  width: number,
  cfg: Normalisation = PREPROCESSOR_DEFAULTS,
): Promise<Buffer> {
  return rgbToPng(pixelsToRgb(pixels, height, width, cfg), height, width);
}
