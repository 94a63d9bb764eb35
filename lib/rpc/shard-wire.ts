// The messages of proto/emu3/internal/v1/shard.proto as @grpc/proto-loader gives them with lib/rpc's options
// (keepCase: snake_case fields; longs as numbers; enums as names; bytes as Buffer; defaults filled in). Shared by
// the coordinator (which sends micro-batches and reads results) and the shards (which do the opposite).

export const SHARD_PROTO = 'emu3/internal/v1/shard.proto';
export const SHARD_SERVICE = 'emu3.internal.v1.Shard';
export const RESULT_SINK_SERVICE = 'emu3.internal.v1.ResultSink';

export type DTypeName = 'DTYPE_UNSPECIFIED' | 'DTYPE_FLOAT32' | 'DTYPE_FLOAT16' | 'DTYPE_BFLOAT16' | 'DTYPE_INT32';
export type MaskKindName = 'MASK_KIND_UNSPECIFIED' | 'MASK_KIND_TEXT' | 'MASK_KIND_IMAGE_LAYOUT';

export interface Tensor {
  data: Buffer;
  dtype: DTypeName;
  shape: number[];
}

export interface ShardInfo {
  layer_begin: number;
  layer_end: number;
  num_layers: number;
  is_first: boolean;
  is_last: boolean;
  precision: string;
  model_fingerprint: string;
  hidden_size: number;
  vocab_size: number;
  hidden_dtype: DTypeName;
  kv_slots: number;
  kv_slot_tokens: number;
  kv_capacity_tokens: number;
  kv_tokens_in_use: number;
  kv_slots_in_use: number;
  kv_bytes_per_token: number;
  visual_token_begin: number;
  visual_token_end: number;
  max_top_k: number;
  lease_ms: number;
  epoch: number;
  device: string;
  adapter: string;
}

export interface KvCopy {
  from_slot: number;
  length: number;
}

export interface BatchItem {
  sequence_id: number;
  slot: number;
  start_position: number;
  token_count: number;
  sample: boolean;
  copy_prefix?: KvCopy | null;
}

export interface SamplingSide {
  sequence_id: number;
  mask: MaskKindName;
  temperature: number;
  repetition_penalty: number;
  penalised_ids: number[];
  top_k: number;
  full_row: boolean;
  penalty_reset: boolean;
  /** MASK_KIND_IMAGE_LAYOUT: the ids that may be drawn, [allow_begin, allow_end). */
  allow_begin?: number;
  allow_end?: number;
  /** Classifier-free guidance: the unconditional partner's sequence_id (0 = none) and the scale. */
  cfg_uncond_sequence_id?: number;
  guidance_scale?: number;
}

export interface MicroBatch {
  micro_batch_id: number;
  items: BatchItem[];
  token_ids: number[];
  /** Set by stages after the first (the previous stage's output). */
  hidden_states?: Tensor | null;
  sampling: SamplingSide[];
  reply_to: string;
  traceparent: string;
  /** Compute ms of the stages so far, each appending its own (for StepResult.stage_compute_ms). */
  stage_compute_ms?: number[];
  /** Items refused by earlier stages (removed from the batch before it went on). */
  refusals?: StageError[];
}

export type StageErrorKindName =
  | 'STAGE_ERROR_KIND_UNSPECIFIED'
  | 'STAGE_ERROR_KIND_REFUSED'
  | 'STAGE_ERROR_KIND_STAGE_LOST'
  | 'STAGE_ERROR_KIND_INTERNAL'
  | 'STAGE_ERROR_KIND_STALE_EPOCH';

export interface StageError {
  kind: StageErrorKindName;
  message: string;
  /** REFUSED: the sequence; 0 for a whole-batch error. */
  sequence_id: number;
  /** REFUSED: the gRPC status code the request ends with; 0 otherwise. */
  status_code: number;
}

export interface KvCopyTo {
  from_slot: number;
  to_slot: number;
  length: number;
}

export interface KvCommand {
  free_slots: number[];
  copies: KvCopyTo[];
}

/** What a sender writes on a Forward stream: one of batch, kv, heartbeat, and the coordinator's epoch. */
export type ForwardRequest = ({ batch: MicroBatch } | { kv: KvCommand } | { heartbeat: Record<string, never> }) & {
  epoch: number;
};

/** What a Forward stream's receiver gets (proto-loader fills the oneof's name in `kind`). */
export interface ReceivedForwardRequest {
  batch?: MicroBatch | null;
  kv?: KvCommand | null;
  heartbeat?: Record<string, never> | null;
  kind?: 'batch' | 'kv' | 'heartbeat';
  epoch: number;
}

export interface ForwardResponse {
  micro_batch_id: number;
  /** null (unset) when the stage ran it. */
  error: StageError | null;
  compute_ms: number;
  queue_ms: number;
}

export interface SequenceResult {
  sequence_id: number;
  candidate_ids: Tensor | null;
  logprobs: Tensor | null;
}

export interface StepResult {
  micro_batch_id: number;
  results: SequenceResult[];
  stage_compute_ms: number[];
  /** null (unset) on success. */
  error: StageError | null;
  refusals: StageError[];
}

/** A little-endian int32 tensor's values (copied: received buffers need not be 4-byte aligned). */
export function int32Values(t: Tensor, what: string): Int32Array {
  if (t.dtype !== 'DTYPE_INT32') throw new Error(`${what}: dtype ${t.dtype}, expected DTYPE_INT32`);
  if (t.data.length % 4 !== 0) throw new Error(`${what}: ${t.data.length} bytes is not a whole number of int32`);
  const out = new Int32Array(t.data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = t.data.readInt32LE(i * 4);
  return out;
}

/** A little-endian float32 tensor's values, widened to float64. */
export function float32Values(t: Tensor, what: string): Float64Array {
  if (t.dtype !== 'DTYPE_FLOAT32') throw new Error(`${what}: dtype ${t.dtype}, expected DTYPE_FLOAT32`);
  if (t.data.length % 4 !== 0) throw new Error(`${what}: ${t.data.length} bytes is not a whole number of float32`);
  const out = new Float64Array(t.data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = t.data.readFloatLE(i * 4);
  return out;
}

/** Little-endian element bytes of a typed array, without copying. */
export function bytesOf(a: Float32Array | Int32Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

/** A float32 tensor's values, copied into an aligned array (received bytes need not be 4-byte aligned). */
export function float32Of(data: Buffer): Float32Array {
  const out = new Float32Array(data.length / 4);
  new Uint8Array(out.buffer).set(data);
  return out;
}
