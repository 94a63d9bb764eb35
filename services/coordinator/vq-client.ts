// The coordinator's client of the VQ service: an image part → its code grid, and a generated code grid → its PNG. The VQ service's refusals of the image
// (INVALID_ARGUMENT, RESOURCE_EXHAUSTED for a full queue) are passed on naming the request's part; anything else
// means the VQ service is unreachable or broken (UNAVAILABLE).
import { createHash } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import type { CodeGrid } from '../../lib/prompt/prompt.js';
import { type ClientCredentials, createClient, unaryCall } from '../../lib/rpc/client.js';
import { InvalidArgument, ResourceExhausted, Unavailable } from '../../lib/rpc/errors.js';
import {
  type DecodeResponse,
  type EncodeResponse,
  type InfoResponse,
  VQ_PROTO,
  VQ_SERVICE,
} from '../../lib/rpc/vq-wire.js';
import { tracedCall } from '../../lib/telemetry/grpc.js';
import type { SpanHandle } from '../../lib/telemetry/tracing.js';

export type VqInfo = Pick<InfoResponse, 'codebook_size' | 'fingerprint' | 'max_message_bytes' | 'max_codes'>;

export class VqClient {
  private readonly client: grpc.Client;
  /**
   * Code grids of recently seen images, by SHA-256 of the bytes (LRU, Map insertion order): a repeated image is not
   * sent to the VQ service again, so with the prefix cache its whole prompt costs one token of prefill.
   */
  private readonly grids = new Map<string, CodeGrid>();

  constructor(
    readonly address: string,
    private readonly timeoutMs = 120_000,
    private readonly cacheEntries = 64,
    credentials?: ClientCredentials,
  ) {
    this.client = createClient(VQ_PROTO, VQ_SERVICE, address, { credentials });
  }

  info(deadlineMs = 5000): Promise<VqInfo> {
    return unaryCall<object, VqInfo>(this.client, 'Info', {}, { deadlineMs });
  }

  /** `field` names the part in errors, e.g. "parts[0].image". */
  async encode(
    data: Uint8Array,
    mimeType: string,
    field: string,
    signal?: AbortSignal,
    trace?: SpanHandle,
  ): Promise<CodeGrid> {
    const key = createHash('sha256').update(data).digest('hex');
    const cached = this.grids.get(key);
    if (cached) {
      this.grids.delete(key);
      this.grids.set(key, cached);
      return cached;
    }
    const grid = await this.encodeRemote(data, mimeType, field, signal, trace);
    if (this.cacheEntries > 0) {
      this.grids.set(key, grid);
      if (this.grids.size > this.cacheEntries) this.grids.delete(this.grids.keys().next().value as string);
    }
    return grid;
  }

  private async encodeRemote(
    data: Uint8Array,
    mimeType: string,
    field: string,
    signal?: AbortSignal,
    trace?: SpanHandle,
  ): Promise<CodeGrid> {
    let res: EncodeResponse;
    try {
      res = await tracedCall(trace, `${VQ_SERVICE}/Encode`, (metadata) =>
        this.encodeCall(
          { image: Buffer.from(data.buffer, data.byteOffset, data.byteLength), mime_type: mimeType },
          signal,
          metadata,
        ),
      );
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      const e = err as grpc.ServiceError;
      if (e.code === grpc.status.INVALID_ARGUMENT) throw new InvalidArgument(`${field}: ${e.details}`);
      if (e.code === grpc.status.RESOURCE_EXHAUSTED) throw new ResourceExhausted(`${field}: ${e.details}`);
      throw new Unavailable(`${field}: the VQ service at ${this.address} failed: ${e.details ?? e.message}`);
    }
    const n = res.h * res.w;
    if (res.codes.length !== n * 4)
      throw new Unavailable(`${field}: the VQ service returned ${res.codes.length} bytes for a ${res.h}x${res.w} grid`);
    const codes = new Int32Array(n);
    for (let i = 0; i < n; i++) codes[i] = res.codes.readInt32LE(i * 4);
    return { height: res.h, width: res.w, codes };
  }

  /** A generated grid → its PNG; cancelled with `signal`. Any failure is UNAVAILABLE (the grid is the server's own). */
  async decode(
    grid: { height: number; width: number; codes: ArrayLike<number> },
    signal?: AbortSignal,
    trace?: SpanHandle,
  ): Promise<{ png: Buffer; width: number; height: number }> {
    const codes = Buffer.alloc(grid.codes.length * 4);
    for (let i = 0; i < grid.codes.length; i++) codes.writeInt32LE(grid.codes[i], i * 4);
    try {
      const res = await tracedCall(trace, `${VQ_SERVICE}/Decode`, (metadata) =>
        this.call<DecodeResponse>('Decode', { h: grid.height, w: grid.width, codes }, signal, metadata),
      );
      return { png: res.png, width: res.width, height: res.height };
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      const e = err as grpc.ServiceError;
      throw new Unavailable(`decoding the image: the VQ service at ${this.address} failed: ${e.details ?? e.message}`);
    }
  }

  private encodeCall(request: object, signal?: AbortSignal, metadata = new grpc.Metadata()): Promise<EncodeResponse> {
    return this.call<EncodeResponse>('Encode', request, signal, metadata);
  }

  /**
   * One call, cancelled when `signal` aborts (the Generate call was cancelled or passed its deadline), so the
   * VQ service drops the request from its queue, or stops it after preprocessing, instead of encoding for nobody.
   */
  private call<T>(
    method: 'Encode' | 'Decode',
    request: object,
    signal?: AbortSignal,
    metadata = new grpc.Metadata(),
  ): Promise<T> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<T>((resolve, reject) => {
      type Method = (
        req: object,
        metadata: grpc.Metadata,
        options: grpc.CallOptions,
        callback: grpc.requestCallback<T>,
      ) => grpc.ClientUnaryCall;
      const fn = (this.client as unknown as Record<string, Method>)[method];
      const onAbort = () => call.cancel();
      const call = fn.call(this.client, request, metadata, { deadline: Date.now() + this.timeoutMs }, (err, res) => {
        signal?.removeEventListener('abort', onAbort);
        if (err) reject(err);
        else resolve(res as T);
      });
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  close(): void {
    this.client.close();
  }
}
