// Target pixel size of an image before VQ encoding (docs/model.md, "Smart resize"), with Python's rounding.

export class ImageSizeError extends Error {
  override name = 'ImageSizeError';
}

/** Python 3 `round(x)`: nearest integer, ties to even (66.5 → 66, 67.5 → 68). */
export function pythonRound(x: number): number {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff < 0.5) return floor;
  if (diff > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}

export interface SmartResizeOptions {
  /** Both output sides are multiples of this (the VQ spatial factor). Default 8. */
  factor?: number;
  /** Default 512×512. */
  minPixels?: number;
  /** Default 1024×1024. */
  maxPixels?: number;
}

const MAX_ASPECT = 5;

export function smartResize(
  height: number,
  width: number,
  opts: SmartResizeOptions = {},
): { height: number; width: number } {
  const factor = opts.factor ?? 8;
  const minPixels = opts.minPixels ?? 512 * 512;
  const maxPixels = opts.maxPixels ?? 1024 * 1024;
  if (!Number.isInteger(height) || !Number.isInteger(width)) {
    throw new ImageSizeError(`image size ${height}x${width} (HxW) must be whole pixels`);
  }
  if (height < factor || width < factor) {
    throw new ImageSizeError(`image size ${height}x${width} (HxW): both sides must be at least ${factor} px`);
  }
  const aspect = Math.max(height, width) / Math.min(height, width);
  if (aspect > MAX_ASPECT) {
    throw new ImageSizeError(
      `image size ${height}x${width} (HxW): aspect ratio ${aspect.toFixed(3)} exceeds the limit ${MAX_ASPECT}`,
    );
  }
  let h = pythonRound(height / factor) * factor;
  let w = pythonRound(width / factor) * factor;
  if (h * w > maxPixels) {
    const beta = Math.sqrt((height * width) / maxPixels);
    h = Math.floor(height / beta / factor) * factor;
    w = Math.floor(width / beta / factor) * factor;
  } else if (h * w < minPixels) {
    const beta = Math.sqrt(minPixels / (height * width));
    h = Math.ceil((height * beta) / factor) * factor;
    w = Math.ceil((width * beta) / factor) * factor;
  }
  if (h < factor || w < factor) {
    throw new ImageSizeError(
      `image size ${height}x${width} (HxW) resizes to ${h}x${w}, below ${factor} px (maxPixels ${maxPixels} too small)`,
    );
  }
  return { height: h, width: w };
}
