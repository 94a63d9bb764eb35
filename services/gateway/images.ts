// POST /v1/images/generations → Generate with TASK_GENERATE_IMAGE. Pure: no I/O.
//
// The mapping, documented in docs/openai.md: `size` "WxH" → GenerateRequest.image width and height, which the
// coordinator turns into the ratio W:H in lowest terms and the pixel area W·H, hence the token grid as Emu3-Gen sizes
// it (lib/prompt generationGrid); `response_format` "b64_json" (the default: the gateway stores nothing it could serve
// by URL). A model that does not generate images (its config has no image_area) refuses the task: 501.
import { generationGrid, type TokenGrid } from '../../lib/prompt/generation-size.js';
import { checkModel } from './chat-request.js';
import { GatewayError, protoFieldOf } from './errors.js';
import type { GenerateRequestMessage } from './generate-request.js';
import { invalid, isObject, optionalInteger, optionalString, refuseUnknownKeys } from './json-fields.js';

/** What a size becomes: "W:H" in lowest terms, the pixel area and the token grid. */
export interface IntendedSize {
  ratio: string;
  area: number;
  grid: TokenGrid;
  /** The size asked for. */
  pixels: { width: number; height: number };
}

export interface ImagePlan {
  request: GenerateRequestMessage;
  /** null for size "auto" or unset (Emu3-Gen's default, 1:1 at 720×720). */
  size: IntendedSize | null;
  responseFormat: 'b64_json';
}

const KNOWN = new Set(['prompt', 'model', 'n', 'size', 'response_format', 'user', 'quality', 'style']);

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

/** "1024x768" → ratio "4:3", area 786432, and its grid; "auto" → null. Each side 8 to 4096 pixels. */
export function intendedSize(size: string): IntendedSize | null {
  if (size === 'auto') return null;
  const m = /^(\d{1,5})x(\d{1,5})$/.exec(size);
  if (!m) invalid('size', `"${size}" must be "WIDTHxHEIGHT" in pixels (e.g. "1024x1024") or "auto"`);
  const w = Number(m[1]);
  const h = Number(m[2]);
  if (w < 8 || h < 8 || w > 4096 || h > 4096) invalid('size', `"${size}": each side must be 8 to 4096 pixels`);
  const g = gcd(w, h);
  const ratio = `${w / g}:${h / g}`;
  return { ratio, area: w * h, grid: generationGrid(ratio, w * h), pixels: { width: w, height: h } };
}

export function mapImageRequest(body: unknown, ctx: { servedModel: string; requestId: string }): ImagePlan {
  if (!isObject(body)) invalid('body', 'must be a JSON object');
  refuseUnknownKeys(body, KNOWN);
  checkModel(optionalString(body, 'model'), ctx.servedModel);
  const prompt = optionalString(body, 'prompt');
  if (prompt === undefined || prompt === '') invalid('prompt', 'is required (the description of the image)');
  const n = optionalInteger(body, 'n', 1, 2 ** 31 - 1);
  if (n !== undefined && n !== 1) invalid('n', `${n} is not supported: one image per request (n = 1)`);
  const format = optionalString(body, 'response_format') ?? 'b64_json';
  if (format === 'url')
    invalid('response_format', '"url" is not supported: the gateway stores nothing it could serve; use "b64_json"');
  if (format !== 'b64_json') invalid('response_format', `"${format}" must be "b64_json"`);
  const quality = optionalString(body, 'quality');
  if (quality !== undefined && quality !== 'auto' && quality !== 'standard')
    invalid('quality', `"${quality}" is not supported (only "auto" or "standard")`);
  const style = optionalString(body, 'style');
  if (style !== undefined) invalid('style', 'is not supported: Emu3-Gen has no style presets');
  const size = intendedSize(optionalString(body, 'size') ?? 'auto');
  return {
    request: {
      parts: [{ text: prompt }],
      task: 'TASK_GENERATE_IMAGE',
      sampling: {},
      requestId: ctx.requestId,
      returnTokenIds: false,
      topLogprobs: 0,
      ...(size ? { image: { width: Number(size.pixels.width), height: Number(size.pixels.height) } } : {}),
    },
    size,
    responseFormat: 'b64_json',
  };
}

/**
 * The coordinator's refusal of the task itself (INVALID_ARGUMENT naming "task": the model does not generate images)
 * is 501.
 * Any other refusal keeps its mapping (a bad prompt is still a 400). Returns null when `details` is not about the task.
 */
export function generationNotAvailable(
  grpcCode: number,
  details: string,
  size: IntendedSize | null,
): GatewayError | null {
  if (grpcCode !== 3 || protoFieldOf(details) !== 'task') return null;
  const would = size
    ? ` (size ${size.grid.width * 8}x${size.grid.height * 8}: ratio ${size.ratio}, a ${size.grid.height}×${size.grid.width} token grid)`
    : '';
  return new GatewayError(
    501,
    `image generation is not available: the Generate API refuses TASK_GENERATE_IMAGE${would}. The coordinator said: ${details}`,
    { code: 'image_generation_not_available', param: null },
  );
}

/** An answer that ended without an image (the server stopped it: drain) cannot be mapped. */
export function noImageInAnswer(finishReason: string): GatewayError {
  return new GatewayError(503, `the image was not finished (${finishReason}); retry`, {
    code: 'server_shutting_down',
  });
}

/** OpenAI's ImagesResponse for one generated PNG. */
export function imagesResponse(png: Buffer, created: number) {
  return { created, data: [{ b64_json: Buffer.from(png).toString('base64') }] };
}
