// Messages between StageRuntime (main thread) and its worker thread.
import type { Precision, StageShape } from '../onnx/stage-graph.js';

export interface ForwardItem {
  /** KV slot of the sequence, in [0, maxSequences). */
  slot: number;
  /** Tokens already in that slot's cache (the position of the first new token). */
  start: number;
  /** New tokens of this item in this call. */
  length: number;
}

export type ForwardInput = { tokens: Int32Array } | { hidden: Float32Array };
export type ForwardOutput = { hidden: Float32Array } | { logits: Float32Array };

export interface WorkerInit {
  modelDir: string;
  first: number;
  end: number;
  precision: Precision;
  maxSequences: number;
  maxSequenceLength: number;
  cacheDir?: string;
  threads?: number;
}

export interface ReadyInfo {
  shape: StageShape;
  kvBytes: number;
  weightBytes: number;
  reusedGraph: boolean;
  onnxPath: string;
}

export type Request =
  | { id: number; type: 'forward'; items: ForwardItem[]; input: ForwardInput }
  | { id: number; type: 'copyKv'; from: number; to: number; length: number }
  | { id: number; type: 'free'; slot: number }
  | { id: number; type: 'close' };

export type Reply =
  | { type: 'log'; message: string }
  | { type: 'ready'; info: ReadyInfo }
  | { type: 'failed'; error: string }
  | { type: 'result'; id: number; output?: ForwardOutput }
  | { type: 'error'; id: number; error: string };
