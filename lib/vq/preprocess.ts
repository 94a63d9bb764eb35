import { join } from 'node:path';
import { readJsonFile } from '../model/json-file.js';
import { ImageSizeError, smartResize } from '../prompt/smart-resize.js';
import { type DecodeOptions, decodeToRgb, ImageInputError, type RgbImage } from './image-decode.js';
import { resizeBicubic } from './resize.js';

/**
 * The fields of preprocessor_config.json this implementation uses (docs/model.md, "preprocessor_config.json"; names in
 * camelCase).
 */
export interface PreprocessorConfig {
  minPixels: number;
  maxPixels: number;
  imageMean: [number, number, number];
  imageStd: [number, number, number];
  rescaleFactor: number;
  spatialFactor: number;
}

/**
 * Emu3VisionVQImageProcessor's defaults (docs/model.md, "preprocessor_config.json"), used for keys the file leaves out.
 */
export const PREPROCESSOR_DEFAULTS: Readonly<PreprocessorConfig> = Object.freeze<PreprocessorConfig>({
  minPixels: 512 * 512,
  maxPixels: 1024 * 1024,
  imageMean: [0.5, 0.5, 0.5],
  imageStd: [0.5, 0.5, 0.5],
  rescaleFactor: 1 / 255,
  spatialFactor: 8,
});

const PIL_BICUBIC = 3;

export class PreprocessorConfigError extends Error {
  override name = 'PreprocessorConfigError';
}

export function parsePreprocessorConfig(json: unknown, source: string): PreprocessorConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new PreprocessorConfigError(`${source}: preprocessor config must be a JSON object`);
  }
  const raw = json as Record<string, unknown>;
  const fail = (key: string, why: string): never => {
    throw new PreprocessorConfigError(`${source}: field ${key} ${why} (got ${JSON.stringify(raw[key])})`);
  };
  const posInt = (key: string, fallback: number): number => {
    const v = raw[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) fail(key, 'must be an integer >= 1');
    return v as number;
  };
  const posNumber = (key: string, fallback: number): number => {
    const v = raw[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) fail(key, 'must be a finite number > 0');
    return v as number;
  };
  const triple = (key: string, fallback: [number, number, number], positive: boolean): [number, number, number] => {
    let v = raw[key] ?? fallback;
    if (typeof v === 'number') v = [v, v, v]; // transformers accepts one float for all channels
    if (
      !Array.isArray(v) ||
      v.length !== 3 ||
      !v.every((x) => typeof x === 'number' && Number.isFinite(x) && (!positive || x > 0))
    ) {
      fail(key, `must be 3 finite numbers${positive ? ' > 0' : ''} (R, G, B)`);
    }
    const [r, g, b] = v as number[];
    return [r, g, b];
  };
  for (const flag of ['do_resize', 'do_rescale', 'do_normalize', 'do_convert_rgb']) {
    if (flag in raw && raw[flag] !== true) fail(flag, 'must be true (the only mode implemented)');
  }
  if ('resample' in raw && raw.resample !== PIL_BICUBIC) fail('resample', `must be ${PIL_BICUBIC} (PIL BICUBIC)`);
  const d = PREPROCESSOR_DEFAULTS;
  const cfg: PreprocessorConfig = {
    minPixels: posInt('min_pixels', d.minPixels),
    maxPixels: posInt('max_pixels', d.maxPixels),
    imageMean: triple('image_mean', d.imageMean, false),
    imageStd: triple('image_std', d.imageStd, true),
    rescaleFactor: posNumber('rescale_factor', d.rescaleFactor),
    spatialFactor: posInt('spatial_factor', d.spatialFactor),
  };
  return cfg;
}

/** Reads DIR/preprocessor_config.json (required: it is part of every Emu3-VisionTokenizer directory). */
export function loadPreprocessorConfig(dir: string): PreprocessorConfig {
  const file = join(dir, 'preprocessor_config.json');
  const json = readJsonFile(file, 'the VQ preprocessor config', (m) => new PreprocessorConfigError(m));
  return parsePreprocessorConfig(json, file);
}

export interface PreprocessedImage {
  /** float32 [3, height, width], RGB planes, normalised (≈[-1, 1] with the default mean/std). */
  pixels: Float32Array;
  height: number;
  width: number;
  originalHeight: number;
  originalWidth: number;
}

/** The size smartResize picks for this config; throws ImageInputError BAD_SIZE where the reference raises. */
export function targetSize(height: number, width: number, cfg: PreprocessorConfig): { height: number; width: number } {
  try {
    return smartResize(height, width, {
      factor: cfg.spatialFactor,
      minPixels: cfg.minPixels,
      maxPixels: cfg.maxPixels,
    });
  } catch (e) {
    if (e instanceof ImageSizeError) throw new ImageInputError('BAD_SIZE', e.message);
    throw e;
  }
}

/** Resize, rescale, normalise and transpose an already decoded RGB image. */
export function preprocessRgb(image: RgbImage, cfg: PreprocessorConfig): PreprocessedImage {
  const { height, width } = targetSize(image.height, image.width, cfg);
  const rgb = resizeBicubic(image.data, image.width, image.height, width, height, 3);
  const plane = height * width;
  const pixels = new Float32Array(3 * plane);
  for (let ch = 0; ch < 3; ch++) {
    // Per channel, a u8 maps to one float32: tabulate the 256 values with the reference's exact roundings.
    const mean = Math.fround(cfg.imageMean[ch]);
    const std = Math.fround(cfg.imageStd[ch]);
    const table = new Float32Array(256);
    for (let v = 0; v < 256; v++) {
      const rescaled = Math.fround(v * cfg.rescaleFactor);
      table[v] = Math.fround(Math.fround(rescaled - mean) / std);
    }
    const base = ch * plane;
    for (let i = 0; i < plane; i++) pixels[base + i] = table[rgb[i * 3 + ch]];
  }
  return { pixels, height, width, originalHeight: image.height, originalWidth: image.width };
}

export interface PreprocessOptions {
  /** Decoded-size limit checked from the header (default DEFAULT_MAX_INPUT_PIXELS, 40 MP). */
  maxInputPixels?: number;
}

/**
 * Image bytes → encoder input. Throws ImageInputError (NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, TOO_MANY_PIXELS,
 * BAD_SIZE); the size rules are checked from the header, before any pixel is decoded.
 */
export async function preprocessImage(
  bytes: Uint8Array,
  cfg: PreprocessorConfig,
  opts: PreprocessOptions = {},
): Promise<PreprocessedImage> {
  const decodeOpts: DecodeOptions = {
    maxPixels: opts.maxInputPixels,
    checkSize: (h, w) => {
      targetSize(h, w, cfg);
    },
  };
  return preprocessRgb(await decodeToRgb(bytes, decodeOpts), cfg);
}
