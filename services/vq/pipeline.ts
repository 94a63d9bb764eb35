// The VQ pipeline as plain functions, shared by the gRPC server and the `emu3 vq encode|decode` CLI:
//   image bytes → preprocess (lib/vq/preprocess) → codec.encode → code grid
//   code grid → codec.decode → postprocess (lib/vq/postprocess) → PNG
// plus what a server must know about a VQ directory (limits, fingerprint) and how its input errors map to statuses.

import { ImageSizeError } from '../../lib/prompt/smart-resize.js';
import { InvalidArgument, type RpcError } from '../../lib/rpc/errors.js';
import { type VqCodec, VqInputError } from '../../lib/vq/codec.js';
import { loadVqConfig, spatialFactor } from '../../lib/vq/config.js';
import { DEFAULT_MAX_INPUT_PIXELS, ImageInputError, readImageHeader } from '../../lib/vq/image-decode.js';
import { postprocessToPng } from '../../lib/vq/postprocess.js';
import {
  loadPreprocessorConfig,
  type PreprocessorConfig,
  preprocessImage,
  targetSize,
} from '../../lib/vq/preprocess.js';
import { VqWeights } from '../../lib/vq/weights.js';
import type { CodeLimits } from './codes.js';

export interface VqModelInfo extends CodeLimits {
  dir: string;
  preprocessor: PreprocessorConfig;
  spatialFactor: number;
  /** Largest input image, width × height from its header. */
  pixelLimit: number;
  fingerprint: string;
}

/** Reads DIR/config.json, DIR/preprocessor_config.json and the weights' fingerprint; checks they agree. */
export function loadVqModelInfo(dir: string, pixelLimit = DEFAULT_MAX_INPUT_PIXELS): VqModelInfo {
  const config = loadVqConfig(dir);
  const preprocessor = loadPreprocessorConfig(dir);
  const factor = spatialFactor(config);
  if (preprocessor.spatialFactor !== factor) {
    throw new Error(
      `${dir}: preprocessor_config.json spatial_factor ${preprocessor.spatialFactor} does not match the VQ model's ` +
        `spatial factor ${factor} (config.json ch_mult has ${config.chMult.length} levels)`,
    );
  }
  const weights = VqWeights.open(dir);
  let fingerprint: string;
  try {
    fingerprint = weights.fingerprint();
  } finally {
    weights.close();
  }
  return {
    dir,
    preprocessor,
    spatialFactor: factor,
    codebookSize: config.codebookSize,
    maxCodes: Math.floor(preprocessor.maxPixels / (factor * factor)),
    pixelLimit,
    fingerprint,
  };
}

export interface EncodedImage {
  h: number;
  w: number;
  codes: Int32Array;
  resizedHeight: number;
  resizedWidth: number;
  originalHeight: number;
  originalWidth: number;
}

/**
 * The cheap checks, from the header only: format, pixel limit, the reference's size rules. A server runs this before
 * queueing so a bad image is refused at once, whatever the load.
 */
export async function checkImage(bytes: Uint8Array, info: VqModelInfo): Promise<void> {
  const header = await readImageHeader(bytes, { maxPixels: info.pixelLimit });
  targetSize(header.height, header.width, info.preprocessor);
}

export interface EncodeSteps {
  /** Checked after preprocessing: once aborted, the model is not run (its reason is thrown). */
  signal?: AbortSignal;
  /** Called as the model run starts (it cannot be interrupted once started). */
  onModelStart?: () => void;
}

export async function encodeImage(
  codec: VqCodec,
  bytes: Uint8Array,
  info: VqModelInfo,
  steps: EncodeSteps = {},
): Promise<EncodedImage> {
  const image = await preprocessImage(bytes, info.preprocessor, { maxInputPixels: info.pixelLimit });
  if (steps.signal?.aborted) throw steps.signal.reason;
  steps.onModelStart?.();
  const { h, w, codes } = await codec.encode(image.pixels, image.height, image.width);
  return {
    h,
    w,
    codes,
    resizedHeight: image.height,
    resizedWidth: image.width,
    originalHeight: image.originalHeight,
    originalWidth: image.originalWidth,
  };
}

export interface DecodedImage {
  png: Buffer;
  height: number;
  width: number;
}

/** codes: a validated grid (codes.ts). */
export async function decodeToPng(
  codec: VqCodec,
  codes: Int32Array,
  h: number,
  w: number,
  info: VqModelInfo,
): Promise<DecodedImage> {
  const pixels = await codec.decode(codes, h, w);
  const height = h * info.spatialFactor;
  const width = w * info.spatialFactor;
  return { png: await postprocessToPng(pixels, height, width, info.preprocessor), height, width };
}

/** The pipeline's input errors are the client's mistakes: INVALID_ARGUMENT with the pipeline's message. */
export function mapVqError(err: unknown): RpcError | undefined {
  if (err instanceof ImageInputError) return new InvalidArgument(`image: ${err.message}`);
  if (err instanceof ImageSizeError) return new InvalidArgument(`image: ${err.message}`);
  if (err instanceof VqInputError) return new InvalidArgument(err.message);
  return undefined;
}
