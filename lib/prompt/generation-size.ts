// Size in tokens of an image to generate, from a "W:H" ratio and a pixel area (upstream calculate_generate_size), with
// Python's round-half-to-even (docs/model.md, "Generated image size").
import { pythonRound } from './smart-resize.js';

export interface TokenGrid {
  /** Rows of visual tokens (pixel height / 8). */
  height: number;
  /** Visual tokens per row (pixel width / 8). */
  width: number;
}

export class RatioError extends Error {
  override name = 'RatioError';
}

/** Parses "W:H" (e.g. "16:9") into positive integers; errors name the ratio. */
export function parseRatio(ratio: string): { w: number; h: number } {
  const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(ratio);
  if (!m) throw new RatioError(`ratio "${ratio}" must be "W:H" with positive integers, e.g. "16:9"`);
  const w = Number(m[1]);
  const h = Number(m[2]);
  if (w <= 0 || h <= 0) throw new RatioError(`ratio "${ratio}": W and H must be at least 1`);
  return { w, h };
}

/** "1:1", 518400 → 90×90 tokens; "16:9", 518400 → 68×120. `factor` is the VQ spatial factor (8). */
export function generationGrid(ratio: string, imageArea: number, factor = 8): TokenGrid {
  if (!Number.isFinite(imageArea) || imageArea <= 0) {
    throw new RatioError(`image area ${imageArea} must be a positive number of pixels`);
  }
  const { w, h } = parseRatio(ratio);
  const s = Math.sqrt(imageArea / (w * h));
  const grid = { height: pythonRound((h * s) / factor), width: pythonRound((w * s) / factor) };
  if (grid.height < 1 || grid.width < 1) {
    throw new RatioError(
      `ratio "${ratio}" with image area ${imageArea} gives ${grid.height}x${grid.width} tokens; each side must be ≥ 1`,
    );
  }
  return grid;
}
