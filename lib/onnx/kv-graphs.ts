// The two small graphs that manage a device-resident KV arena (lib/runtime/device-kv.ts) besides the stage graph:
//
//   kv-init  shape int64 [4] → cache float [shape]: a zero-filled arena tensor, made on the device (the node binding
//            cannot create a device buffer from JS, but keeps a session's outputs there on request) by Expand of a
//            zero (ConstantOfShape has no WebGPU kernel: it would fill the arena in host memory and copy it over)
//   kv-copy  cache float [slots, kvHeads, maxLen, headDim], from / to int64 [n, 3] (slot, head, position)
//            → cache_out: the arena with the K or V at `to` replaced by the values at `from` (GatherND reads them
//            all before ScatterND writes, so overlapping moves read the old values)
//   kv-read  x float [a, b] → y: a device tensor (logits, a full row) brought to host memory
import type { GraphBuilder } from './graph.js';

/** The arena's element type: float, or float16 with fp16 weights (stage-graph.ts kvElemType). */
export type KvElem = 'float' | 'float16';

export const kvGraphIo = {
  shape: 'shape',
  cache: 'cache',
  from: 'from',
  to: 'to',
  cacheOut: 'cache_out',
  x: 'x',
  y: 'y',
};

export function buildKvReadGraph(g: GraphBuilder): void {
  g.input(kvGraphIo.x, 'float', ['a', 'b']);
  g.op('Identity', [kvGraphIo.x], kvGraphIo.y);
  g.output(kvGraphIo.y, 'float', ['a', 'b']);
}

export function buildKvInitGraph(g: GraphBuilder, type: KvElem): void {
  g.input(kvGraphIo.shape, 'int64', [4]);
  const zero = g.weight('zero', type, [], new Uint8Array(type === 'float' ? 4 : 2));
  g.op('Expand', [zero, kvGraphIo.shape], kvGraphIo.cache);
  g.output(kvGraphIo.cache, type, ['slots', 'kv_heads', 'max_len', 'head_dim']);
}

export function buildKvCopyGraph(g: GraphBuilder, type: KvElem): void {
  const dims = ['slots', 'kv_heads', 'max_len', 'head_dim'];
  g.input(kvGraphIo.cache, type, dims);
  g.input(kvGraphIo.from, 'int64', ['n', 3]);
  g.input(kvGraphIo.to, 'int64', ['n', 3]);
  const moved = g.op('GatherND', [kvGraphIo.cache, kvGraphIo.from], 'moved');
  g.op('ScatterND', [kvGraphIo.cache, kvGraphIo.to, moved], kvGraphIo.cacheOut);
  g.output(kvGraphIo.cacheOut, type, dims);
}
