// The shard's view of proto/emu3/internal/v1/shard.proto as @grpc/proto-loader gives it with lib/rpc's options
// (keepCase, longs as numbers, enums as names, bytes as Buffer, defaults filled in).

export const SHARD_PROTO = 'emu3/internal/v1/shard.proto';
export const SHARD_SERVICE = 'emu3.internal.v1.Shard';
export const RESULT_SINK_SERVICE = 'emu3.internal.v1.ResultSink';

export type DTypeName = 'DTYPE_UNSPECIFIED' | 'DTYPE_FLOAT32' | 'DTYPE_FLOAT16' | 'DTYPE_BFLOAT16' | 'DTYPE_INT32';
export type MaskKindName = 'MASK_KIND_UNSPECIFIED' | 'MASK_KIND_TEXT' | 'MASK_KIND_IMAGE_LAYOUT';

export interface WireTensor {
  data: Buffer;
  dtype: DTypeName;
  shape: number[];
}

export interface WireBatchItem {
  sequence_id: number;
  slot: number;
  start_position: number;
  token_count: number;
  sample: boolean;
  copy_prefix?: { from_slot: number; length: number } | null;
}

export interface WireSamplingSide {
  sequence_id: number;
  mask: MaskKindName;
  temperature: number;
  repetition_penalty: number;
  penalised_ids: number[];
  top_k: number;
  full_row: boolean;
}

export interface WireMicroBatch {
  micro_batch_id: number;
  items: WireBatchItem[];
  token_ids: number[];
  hidden_states?: WireTensor | null;
  sampling: WireSamplingSide[];
  reply_to: string;
  traceparent: string;
  stage_compute_ms?: number[];
}

export interface WireKvCommand {
  free_slots: number[];
  copies: { from_slot: number; to_slot: number; length: number }[];
}

export interface WireForwardRequest {
  batch?: WireMicroBatch | null;
  kv?: WireKvCommand | null;
  kind?: 'batch' | 'kv';
}

export interface WireForwardResponse {
  micro_batch_id: number;
  error: string;
  compute_ms: number;
  queue_ms: number;
}

export interface WireSequenceResult {
  sequence_id: number;
  candidate_ids: WireTensor | null;
  logprobs: WireTensor | null;
}

export interface WireStepResult {
  micro_batch_id: number;
  results: WireSequenceResult[];
  stage_compute_ms: number[];
  error: string;
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
