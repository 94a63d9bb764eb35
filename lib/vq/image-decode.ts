// Image bytes → 8-bit RGB pixels the way the reference gets them: PIL `Image.open(f).convert("RGB")` (docs/model.md,
// "Reading the file"), decoded with sharp. The size in the header is checked against a pixel limit before any pixel is
// decoded.
//
// Deliberate choices, each matching Pillow (the reference) rather than sharp's defaults:
// * an embedded ICC profile is ignored (Pillow does not apply it);
// * the EXIF orientation is NOT applied (the reference feeds the stored pixel grid to the model);
// * alpha is dropped, not composited onto a background (`convert("RGB")`); palette and grey are expanded;
// * CMYK (JPEG, TIFF) uses Pillow's CMYK→RGB formula on the raw (Adobe-inverted, as libjpeg reports them) channels;
// * 16-bit grey without alpha is clipped at 255 like Pillow's mode "I"/"I;16" → "RGB" conversion (so it looks nearly
//   white), while 16-bit RGB(A) and grey+alpha keep the high byte, which is what both Pillow and sharp do;
// * only the first frame of an animated GIF/WebP or the first page of a TIFF is used.
// Known difference: transparent pixels of a GIF decode as black in libvips but as their palette colour in Pillow.
import sharp, { type Metadata, type OutputInfo, type Sharp } from 'sharp';

export type ImageInputErrorCode = 'NOT_AN_IMAGE' | 'UNSUPPORTED_FORMAT' | 'TRUNCATED' | 'TOO_MANY_PIXELS' | 'BAD_SIZE';

/** A client-side problem with an input image; the gRPC layer maps every code to INVALID_ARGUMENT. */
export class ImageInputError extends Error {
  override name = 'ImageInputError';
  constructor(
    readonly code: ImageInputErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** Default decoded-size limit (pixels), checked from the header: a decompression bomb is rejected unread. */
export const DEFAULT_MAX_INPUT_PIXELS = 40_000_000;

/** sharp `metadata().format` values we decode; the rest (svg, pdf, vips, raw, ...) are not images Pillow reads. */
const ACCEPTED_FORMATS = new Set(['jpeg', 'png', 'webp', 'gif', 'tiff', 'heif', 'jxl']);

export interface DecodeOptions {
  /** Reject images whose header declares more pixels than this. Default DEFAULT_MAX_INPUT_PIXELS. */
  maxPixels?: number;
  /** Called with the header's size before decoding; throw (an ImageInputError) to reject the image unread. */
  checkSize?: (height: number, width: number) => void;
}

export interface ImageHeader {
  /** sharp's format name: jpeg, png, webp, gif, tiff, heif, jxl. */
  format: string;
  width: number;
  height: number;
  /** sharp's interpretation (srgb, b-w, grey16, rgb16, cmyk, ...) and band count, alpha included. */
  space: string;
  channels: number;
}

export interface RgbImage {
  /** Interleaved RGB, row-major (HWC), `width * height * 3` bytes. */
  data: Uint8Array;
  width: number;
  height: number;
  format: string;
}

/** Formats libvips in this sharp build does not read, recognised from their first bytes for a clear message. */
function sniffUnreadableFormat(b: Uint8Array): string | undefined {
  const ascii = (start: number, s: string) =>
    b.length >= start + s.length && [...s].every((ch, i) => b[start + i] === ch.charCodeAt(0));
  if (ascii(0, 'BM')) return 'BMP';
  if (b.length >= 4 && b[0] === 0 && b[1] === 0 && (b[2] === 1 || b[2] === 2) && b[3] === 0 && !ascii(4, 'ftyp'))
    return 'ICO/CUR';
  if (
    b.length >= 3 &&
    b[0] === 0x50 &&
    /[1-7fF]/.test(String.fromCharCode(b[1])) &&
    /\s/.test(String.fromCharCode(b[2]))
  )
    return 'PNM (PBM/PGM/PPM/PAM/PFM)';
  if (ascii(4, 'jP  ') || (b.length >= 4 && b[0] === 0xff && b[1] === 0x4f && b[2] === 0xff && b[3] === 0x51))
    return 'JPEG 2000';
  if (ascii(0, '%PDF')) return 'PDF';
  if (ascii(0, '%!PS')) return 'PostScript';
  if (ascii(0, '8BPS')) return 'PSD';
  if (ascii(0, 'DDS ')) return 'DDS';
  if (ascii(0, 'qoif')) return 'QOI';
  if (ascii(0, 'II*\0') || ascii(0, 'MM\0*')) return undefined; // TIFF: readable, so a failure means corrupt data
  if (ascii(4, 'ftyp')) {
    // Major brand at 8, compatible brands from 16 to the end of the ftyp box; AVIF files may also say mif1.
    const boxEnd = Math.min(b.length, ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) >>> 0);
    const brands = String.fromCharCode(...b.subarray(8, Math.max(12, Math.min(boxEnd, 64))));
    const major = brands.slice(0, 4);
    if (!/avi[fs]/.test(brands) && /^(heic|heix|hevc|hevx|heim|heis|mif1|msf1)$/.test(major)) {
      return `HEIF/HEIC (brand ${major})`;
    }
  }
  return undefined;
}

/** Formats sharp reads, recognised from their first bytes: a header sharp rejects is then corrupt, not foreign. */
function sniffReadableFormat(b: Uint8Array): string | undefined {
  const at = (start: number, bytes: number[]) =>
    b.length >= start + bytes.length && bytes.every((v, i) => b[start + i] === v);
  if (at(0, [0x89, 0x50, 0x4e, 0x47])) return 'png';
  if (at(0, [0xff, 0xd8, 0xff])) return 'jpeg';
  if (at(0, [0x47, 0x49, 0x46, 0x38])) return 'gif';
  if (at(0, [0x52, 0x49, 0x46, 0x46]) && at(8, [0x57, 0x45, 0x42, 0x50])) return 'webp';
  if (at(0, [0x49, 0x49, 0x2a, 0]) || at(0, [0x4d, 0x4d, 0, 0x2a])) return 'tiff';
  if (at(4, [0x66, 0x74, 0x79, 0x70]) && /^avi[fs]$/.test(String.fromCharCode(...b.subarray(8, 12)))) return 'avif';
  return undefined;
}

/** `maxPixels` false: no limit inside sharp (for the header read, so that our own check reports the size). */
function sharpInput(bytes: Uint8Array, maxPixels: number | false): Sharp {
  return sharp(bytes, {
    failOn: 'warning', // truncated or CRC-broken data must fail, not decode to garbage
    limitInputPixels: maxPixels === false ? false : Math.max(1, Math.floor(maxPixels)),
    ignoreIcc: true,
    autoOrient: false,
    pages: 1,
    page: 0,
  });
}

function errorText(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).trim().replace(/\s*\n\s*/g, '; ');
}

/** Reads and checks the header only: format, size, pixel limit. No pixel is decoded. */
export async function readImageHeader(bytes: Uint8Array, opts: DecodeOptions = {}): Promise<ImageHeader> {
  const maxPixels = opts.maxPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  if (bytes.length === 0) throw new ImageInputError('NOT_AN_IMAGE', 'image is empty (0 bytes)');
  const unreadable = sniffUnreadableFormat(bytes);
  if (unreadable) {
    throw new ImageInputError(
      'UNSUPPORTED_FORMAT',
      `image format ${unreadable} is not supported; send PNG, JPEG, WebP, GIF, TIFF or AVIF`,
    );
  }
  let meta: Metadata;
  try {
    meta = await sharpInput(bytes, false).metadata();
  } catch (e) {
    const readable = sniffReadableFormat(bytes);
    if (readable) {
      throw new ImageInputError('TRUNCATED', `${readable} image header is truncated or corrupt: ${errorText(e)}`);
    }
    throw new ImageInputError(
      'NOT_AN_IMAGE',
      `data (${bytes.length} bytes) is not an image in a supported format (PNG, JPEG, WebP, GIF, TIFF, AVIF): ${errorText(e)}`,
    );
  }
  const format = String(meta.format);
  if (!ACCEPTED_FORMATS.has(format)) {
    throw new ImageInputError(
      'UNSUPPORTED_FORMAT',
      `image format ${format} is not supported; send PNG, JPEG, WebP, GIF, TIFF or AVIF`,
    );
  }
  const width = meta.width;
  const height = meta.pageHeight ?? meta.height;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new ImageInputError('TRUNCATED', `${format} image header declares an invalid size ${width}x${height}`);
  }
  if (width * height > maxPixels) {
    throw new ImageInputError(
      'TOO_MANY_PIXELS',
      `${format} image is ${width}x${height} = ${width * height} pixels, more than the limit of ${maxPixels} pixels`,
    );
  }
  return { format, width, height, space: String(meta.space), channels: meta.channels };
}

/** Pillow's CMYK → RGB: channel = (255 - k) - round((255 - k) * c / 255), the rounding done as in its MULDIV255. */
export function cmykToRgb(cmyk: Uint8Array, pixels: number, stride: number): Uint8Array {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0, p = 0, o = 0; i < pixels; i++, p += stride) {
    const nk = 255 - cmyk[p + 3];
    for (let ch = 0; ch < 3; ch++) {
      const t = cmyk[p + ch] * nk + 128;
      out[o++] = nk - (((t >> 8) + t) >> 8);
    }
  }
  return out;
}

/** Band 0 of `stride`-interleaved samples, each mapped through `level`, repeated into R, G and B. */
function greyToRgb(samples: ArrayLike<number>, pixels: number, stride: number, level: (v: number) => number) {
  const out = new Uint8Array(pixels * 3);
  for (let i = 0, o = 0; i < pixels; i++, o += 3) {
    const v = level(samples[i * stride]);
    out[o] = v;
    out[o + 1] = v;
    out[o + 2] = v;
  }
  return out;
}

/** The first three bands of `stride`-interleaved samples (alpha, if any, dropped). */
function firstThreeBands(samples: Uint8Array, pixels: number, stride: number): Uint8Array {
  if (stride === 3) return new Uint8Array(samples.buffer, samples.byteOffset, samples.length);
  const out = new Uint8Array(pixels * 3);
  for (let i = 0, p = 0, o = 0; i < pixels; i++, p += stride, o += 3) {
    out[o] = samples[p];
    out[o + 1] = samples[p + 1];
    out[o + 2] = samples[p + 2];
  }
  return out;
}

async function decodePixels(bytes: Uint8Array, header: ImageHeader, maxPixels: number): Promise<Uint8Array> {
  const pixels = header.width * header.height;
  const input = sharpInput(bytes, maxPixels);
  if (header.space === 'cmyk') {
    // No colour management: the raw CMYK samples, then Pillow's own formula.
    const { data, info } = await input
      .pipelineColourspace('cmyk')
      .toColourspace('cmyk')
      .raw()
      .toBuffer({ resolveWithObject: true });
    checkDecodedSize(info, header);
    return cmykToRgb(data, pixels, info.channels);
  }
  if (header.space === 'grey16' && header.channels === 1) {
    const { data, info } = await input
      .toColourspace('grey16')
      .raw({ depth: 'ushort' })
      .toBuffer({ resolveWithObject: true });
    checkDecodedSize(info, header);
    const samples = new Uint16Array(data.buffer, data.byteOffset, data.length >> 1);
    return greyToRgb(samples, pixels, info.channels, (v) => (v > 255 ? 255 : v));
  }
  if (header.space === 'b-w') {
    const { data, info } = await input.toColourspace('b-w').raw().toBuffer({ resolveWithObject: true });
    checkDecodedSize(info, header);
    return greyToRgb(data, pixels, info.channels, (v) => v);
  }
  const { data, info } = await input.toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
  checkDecodedSize(info, header);
  return firstThreeBands(data, pixels, info.channels);
}

function checkDecodedSize(info: OutputInfo, header: ImageHeader): void {
  if (info.width !== header.width || info.height !== header.height) {
    throw new Error(`decoded ${info.width}x${info.height}, header said ${header.width}x${header.height}`);
  }
}

/**
 * Decodes image bytes to 8-bit RGB like PIL `Image.open(f).convert("RGB")`.
 * Throws ImageInputError: NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TRUNCATED, TOO_MANY_PIXELS, or whatever checkSize throws.
 */
export async function decodeToRgb(bytes: Uint8Array, opts: DecodeOptions = {}): Promise<RgbImage> {
  const maxPixels = opts.maxPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  const header = await readImageHeader(bytes, { maxPixels });
  opts.checkSize?.(header.height, header.width);
  let data: Uint8Array;
  try {
    data = await decodePixels(bytes, header, maxPixels);
  } catch (e) {
    throw new ImageInputError(
      'TRUNCATED',
      `${header.format} image ${header.width}x${header.height} is truncated or corrupt: ${errorText(e)}`,
    );
  }
  return { data, width: header.width, height: header.height, format: header.format };
}
