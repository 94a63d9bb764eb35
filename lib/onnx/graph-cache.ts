// Built stage graphs on disk: `<cache>/<key>/stage.onnx` + `stage.weights` + `meta.json`, keyed by (checkpoint
// fingerprint, layer range, precision, graph version). A graph is built in a temporary directory and renamed into
// place, so a crash never leaves a half-written entry; a later start finds the entry and loads it by path.
import { createHash } from 'node:crypto';
import { accessSync, constants, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Checkpoint } from '../model/checkpoint.js';
import { GraphBuilder } from './graph.js';
import { buildKvCopyGraph, buildKvInitGraph, buildKvReadGraph } from './kv-graphs.js';
import { buildStageGraph, checkStageSpec, kvElemType, type StageShape, type StageSpec } from './stage-graph.js';

/** Bump when the graph layout changes, so old cache entries are not reused. */
export const STAGE_GRAPH_VERSION = 10;

export interface CachedStage {
  onnxPath: string;
  dir: string;
  reused: boolean;
  /** Bytes of the external weight file. */
  weightBytes: number;
  shape: StageShape;
  /** With spec.kvOnDevice: the arena's init and copy graphs (kv-graphs.ts), beside the stage graph. */
  kvGraphs?: { init: string; copy: string; read: string };
}

/** `explicit`, else $EMU3_CACHE_DIR, else `<model dir>/.emu3-cache` if writable, else ~/.cache/emu3-serve. */
export function resolveCacheDir(modelDir: string, explicit?: string): string {
  if (explicit) return explicit;
  if (process.env.EMU3_CACHE_DIR) return process.env.EMU3_CACHE_DIR;
  const beside = join(modelDir, '.emu3-cache');
  try {
    mkdirSync(beside, { recursive: true });
    accessSync(beside, constants.W_OK);
    return beside;
  } catch {
    return join(homedir(), '.cache', 'emu3-serve');
  }
}

export function stageCacheKey(fingerprint: string, spec: StageSpec): string {
  // A CPU graph's key is what it was before devices existed, so existing caches stay valid.
  const device = `${spec.device && spec.device !== 'cpu' ? spec.device : ''}${spec.kvOnDevice ? '-kvdev' : ''}`;
  const noInt8 = spec.precision === 'int4' && spec.int8Prefill === false ? '\0no-int8-prefill' : '';
  const hash = createHash('sha256')
    .update(
      `${fingerprint}\0${spec.first}\0${spec.end}\0${spec.precision}\0v${STAGE_GRAPH_VERSION}${device ? `\0${device}` : ''}${noInt8}`,
    )
    .digest('hex')
    .slice(0, 16);
  return `stage-${spec.first}-${spec.end}-${spec.precision}${device ? `-${device}` : ''}-${hash}`;
}

/** Returns the cached graph of the stage, building it first if the cache has none. */
export function ensureStageGraph(
  ckpt: Checkpoint,
  spec: StageSpec,
  opts: { cacheDir?: string; log?: (msg: string) => void } = {},
): CachedStage {
  checkStageSpec(ckpt.config, spec);
  const log = opts.log ?? (() => {});
  const root = resolveCacheDir(ckpt.dir, opts.cacheDir);
  const dir = join(root, stageCacheKey(ckpt.fingerprint(), spec));
  const metaPath = join(dir, 'meta.json');
  if (existsSync(metaPath)) {
    const meta = JSON.parse(readFileSync(metaPath, 'utf8')) as { weightBytes: number; shape: StageShape };
    log(`stage graph: reusing cached ${dir}`);
    return {
      onnxPath: join(dir, 'stage.onnx'),
      dir,
      reused: true,
      weightBytes: meta.weightBytes,
      shape: meta.shape,
      ...kvGraphPaths(dir, spec),
    };
  }
  try {
    mkdirSync(root, { recursive: true });
  } catch (e) {
    throw new Error(
      `graph cache directory ${root}: cannot create it (${(e as NodeJS.ErrnoException).code ?? e}); set --cache-dir or EMU3_CACHE_DIR`,
    );
  }
  const tmp = join(root, `.tmp-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`);
  mkdirSync(tmp);
  const started = Date.now();
  try {
    log(`stage graph: building layers [${spec.first}, ${spec.end}) ${spec.precision} into ${dir}`);
    const g = new GraphBuilder(tmp, 'stage');
    const shape = buildStageGraph(g, ckpt, spec);
    g.save();
    if (spec.kvOnDevice) {
      for (const [name, build] of [
        ['kv-init', buildKvInitGraph],
        ['kv-copy', buildKvCopyGraph],
        ['kv-read', (g: GraphBuilder) => buildKvReadGraph(g)],
      ] as const) {
        const kv = new GraphBuilder(tmp, name);
        build(kv, kvElemType(spec.precision));
        kv.save();
      }
    }
    writeFileSync(
      join(tmp, 'meta.json'),
      `${JSON.stringify({ spec, fingerprint: ckpt.fingerprint(), weightBytes: g.weightBytes, shape }, null, 2)}\n`,
    );
    try {
      renameSync(tmp, dir);
    } catch (e) {
      // Another process finished the same entry first: use theirs.
      if (!existsSync(metaPath)) throw e;
      rmSync(tmp, { recursive: true, force: true });
    }
    log(
      `stage graph: built in ${((Date.now() - started) / 1000).toFixed(1)} s (${(g.weightBytes / 2 ** 20).toFixed(1)} MiB of weights)`,
    );
    return {
      onnxPath: join(dir, 'stage.onnx'),
      dir,
      reused: false,
      weightBytes: g.weightBytes,
      shape,
      ...kvGraphPaths(dir, spec),
    };
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

function kvGraphPaths(dir: string, spec: StageSpec): Pick<CachedStage, 'kvGraphs'> {
  return spec.kvOnDevice
    ? {
        kvGraphs: {
          init: join(dir, 'kv-init.onnx'),
          copy: join(dir, 'kv-copy.onnx'),
          read: join(dir, 'kv-read.onnx'),
        },
      }
    : {};
}
