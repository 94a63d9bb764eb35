// Messages between StageRuntime (main thread) and its worker thread.
import type { SamplingRow } from '../onnx/sampling-head.js';
import type { StageShape } from '../onnx/stage-graph.js';
import type { StageRuntimeOptions } from './stage-runtime.js';

export interface ForwardItem {
  /** KV slot of the sequence, in [0, maxSequences). */
  slot: number;
  /** Tokens already in that slot's cache (the position of the first new token). */
  start: number;
  /** New tokens of this item in this call. */
  length: number;
}

export type ForwardInput = { tokens: Int32Array } | { hidden: Float32Array };
export type ForwardOutput = { hidden: Float32Array } | { logits: Float32Array } | SampledOutput;

/** The last stage with `sampling` rows: the in-graph head's results (sampling-head.ts); full logits stay in ORT. */
export interface SampledOutput {
  /** Candidates per item (the largest topK of the call's rows; an item uses its own first topK). */
  k: number;
  /** [items, k] most likely first, ties by lower id. */
  topIds: Int32Array;
  /** [items, k] logprobs normalised over the whole vocabulary (after mask, penalty, temperature). */
  topLogprobs: Float32Array;
  /** Per item: the whole row of logprobs [vocab] when its row asked for fullRow, else null. */
  fullRows: (Float32Array | null)[];
}

/**
 * Bytes of host memory fed to a stage's session runs and returned from them (on a device these cross the bus; on the
 * cpu they are the same counts, of memory that stays put), since the stage started, and of its last run.
 */
export interface TransferStats {
  runs: number;
  hostToDevice: number;
  deviceToHost: number;
  last: { hostToDevice: number; deviceToHost: number } | null;
}

/** Host↔device bytes of one request (a forward's run, a copyKv's copies). */
export interface HostTransfer {
  hostToDevice: number;
  deviceToHost: number;
}

/** What the worker is started with: the runtime's options less the log callback (which cannot cross threads). */
export type WorkerInit = Omit<StageRuntimeOptions, 'log'>;

export interface ReadyInfo {
  shape: StageShape;
  kvBytes: number;
  weightBytes: number;
  reusedGraph: boolean;
  onnxPath: string;
  /** The webgpu adapter's name ('' on cpu): gpu-adapter.ts. */
  adapter: string;
  kv: 'host' | 'device';
}

export type Request =
  | { id: number; type: 'forward'; items: ForwardItem[]; input: ForwardInput; sampling?: SamplingRow[] }
  | { id: number; type: 'copyKv'; from: number; to: number; length: number }
  | { id: number; type: 'free'; slot: number }
  | { id: number; type: 'stats' }
  | { id: number; type: 'close' };

export type Reply =
  | { type: 'log'; message: string }
  | { type: 'ready'; info: ReadyInfo }
  | { type: 'failed'; error: string }
  | { type: 'result'; id: number; output?: ForwardOutput; stats?: TransferStats; transfer?: HostTransfer }
  | { type: 'error'; id: number; error: string };

/**
 * Posts `message`, moving the `transfer` buffers. A buffer that cannot move (Node marks its pooled Buffer memory so)
 * is copied instead: Node 20 does that by itself, later versions throw DataCloneError, and then this posts a copy.
 */
export function postTransferring(
  port: { postMessage(value: unknown, transfer?: readonly ArrayBuffer[]): void },
  message: unknown,
  transfer: ArrayBuffer[],
): void {
  try {
    port.postMessage(message, transfer);
  } catch (e) {
    if (transfer.length === 0 || (e as Error).name !== 'DataCloneError') throw e;
    port.postMessage(message);
  }
}
