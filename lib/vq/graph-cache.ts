// Graph cache: a built graph (`<kind>.onnx` + `<kind>.weights`) lives in a directory keyed by the VQ weights'
// fingerprint, the graph kind, its input size ("dynamic" here: one graph serves every H×W) and its form (the
// shape-free form built for webgpu gets "-shape-free"; the shaped form's key is what it was before forms existed). Built into a
// temporary directory and renamed into place, so concurrent builders never see a half-written graph.
import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { GraphBuilder } from '../onnx/graph.js';
import { resolveCacheDir } from '../onnx/graph-cache.js';
import type { VqGraphForm } from './graph-blocks.js';
import type { VqWeights } from './weights.js';

export type VqGraphKind = 'vq-encoder' | 'vq-decoder';

/** Bump when the graphs' structure changes, so stale cached graphs are not reused. */
const GRAPH_VERSION = 1;

/** The same rule as the stage graphs': $EMU3_CACHE_DIR, else `<vq dir>/.emu3-cache` if writable, else ~/.cache. */
export function defaultCacheDir(vqDir: string): string {
  return resolveCacheDir(vqDir);
}

/** The .onnx path of the cached graph; builds it first when missing. */
export function cachedGraph(
  weights: VqWeights,
  kind: VqGraphKind,
  form: VqGraphForm,
  cacheDir: string,
  build: (g: GraphBuilder) => void,
  log?: (msg: string) => void,
): string {
  const variant = form === 'shaped' ? '' : `-${form}`;
  const key = `${kind}-${weights.fingerprint().slice(0, 24)}-dynamic${variant}-v${GRAPH_VERSION}`;
  const dir = join(cacheDir, key);
  const onnx = join(dir, `${kind}.onnx`);
  if (existsSync(onnx)) {
    log?.(`reusing cached ${kind} graph ${dir}`);
    return onnx;
  }
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
  mkdirSync(tmp);
  try {
    const started = Date.now();
    const g = new GraphBuilder(tmp, kind);
    build(g);
    g.save();
    log?.(
      `built ${kind} graph (${(g.weightBytes / 2 ** 20).toFixed(1)} MiB of weights) in ${Date.now() - started} ms → ${dir}`,
    );
    try {
      renameSync(tmp, dir);
    } catch (e) {
      // Another process finished the same graph first: keep theirs.
      if (!existsSync(onnx)) throw e;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return onnx;
}
