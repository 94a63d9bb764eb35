// The image-layout constraint of generation (docs/model.md, "Image layout constraint"; upstream
// Emu3PrefixConstrainedLogitsHelper): which ids may be sampled at each step after the prompt's img token. A pure
// function of the grid and the step.
import type { TokenGrid } from './generation-size.js';

export interface LayoutIds {
  eol: number;
  eof: number;
  eoi: number;
  eos: number;
  pad: number;
  /** First visual id and how many there are (151854, 32768). */
  visualStart: number;
  visualCount: number;
}

export type AllowedTokens = { kind: 'visual'; start: number; count: number } | { kind: 'single'; id: number };

/** Number of tokens generated for an H×W image: H rows of W visual ids + eol, then eof, eoi, eos. */
export function imageLayoutLength(grid: TokenGrid): number {
  return grid.height * (grid.width + 1) + 3;
}

/**
 * Allowed ids for the token generated at `step` (0 = the first token after the prompt's img token).
 * The rules are checked in the reference's order, so for widths 1 and 2 the eol rule wins where it collides with
 * the eoi / eos positions, and past the end eol still wins every (W+1)-th step — as in the reference.
 */
export function imageLayoutAllowed(grid: TokenGrid, step: number, ids: LayoutIds): AllowedTokens {
  if (!Number.isInteger(step) || step < 0) throw new RangeError(`layout step ${step} must be an integer ≥ 0`);
  const { height: h, width: w } = grid;
  if (!Number.isInteger(h) || !Number.isInteger(w) || h < 1 || w < 1) {
    throw new RangeError(`layout grid ${h}x${w} must have positive integer sides`);
  }
  const offset = step + 1;
  const end = (w + 1) * h;
  if (offset % (w + 1) === 0) return { kind: 'single', id: ids.eol };
  if (offset === end + 1) return { kind: 'single', id: ids.eof };
  if (offset === end + 2) return { kind: 'single', id: ids.eoi };
  if (offset === end + 3) return { kind: 'single', id: ids.eos };
  if (offset > end + 3) return { kind: 'single', id: ids.pad };
  return { kind: 'visual', start: ids.visualStart, count: ids.visualCount };
}

/** LayoutIds from a tokenizer's roles. */
export function layoutIds(tok: {
  roles: { eol: number; eof: number; eoi: number; eos: number; pad: number };
  visual: { start: number; count: number };
}): LayoutIds {
  const { eol, eof, eoi, eos, pad } = tok.roles;
  return { eol, eof, eoi, eos, pad, visualStart: tok.visual.start, visualCount: tok.visual.count };
}
