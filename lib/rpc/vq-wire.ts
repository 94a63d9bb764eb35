// The messages of proto/emu3/internal/v1/vq.proto as @grpc/proto-loader gives them with lib/rpc's options (keepCase,
// bytes as Buffer, longs as numbers). Shared by the vq service, its clients (the coordinator) and the tests.

export const VQ_PROTO = 'emu3/internal/v1/vq.proto';
export const VQ_SERVICE = 'emu3.internal.v1.VqService';

export interface EncodeRequest {
  image: Buffer;
  mime_type: string;
}
export interface EncodeResponse {
  h: number;
  w: number;
  codes: Buffer;
  resized_height: number;
  resized_width: number;
  original_height: number;
  original_width: number;
}
export interface DecodeRequest {
  h: number;
  w: number;
  codes: Buffer;
}
export interface DecodeResponse {
  png: Buffer;
  height: number;
  width: number;
}
/** The proto's VqServiceInfoResponse (the answer to VqService.Info). */
export interface InfoResponse {
  codebook_size: number;
  spatial_factor: number;
  min_pixels: number;
  max_pixels: number;
  pixel_limit: number;
  max_codes: number;
  queue_limit: number;
  workers: number;
  fingerprint: string;
  max_message_bytes: number;
  device: string;
}
