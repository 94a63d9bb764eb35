// emu3.internal.v1.VqService handlers (proto/emu3/internal/v1/vq.proto): validate cheaply up front, then run the
// pipeline on a codec from the bounded pool.
import type * as grpc from '@grpc/grpc-js';
import { InvalidArgument } from '../../lib/rpc/errors.js';
import { implement, unary } from '../../lib/rpc/handlers.js';
import type { Logger } from '../../lib/rpc/log.js';
import type {
  DecodeRequest,
  DecodeResponse,
  EncodeRequest,
  EncodeResponse,
  InfoResponse,
} from '../../lib/rpc/vq-wire.js';
import { vqTelemetry } from '../../lib/telemetry/vq.js';
import type { VqCodec } from '../../lib/vq/codec.js';
import { codesFromBytes, codesToBytes } from './codes.js';
import { checkImage, decodeToPng, encodeImage, mapVqError, type VqModelInfo } from './pipeline.js';
import type { WorkerPool } from './pool.js';

const MAX_MIME_TYPE_LENGTH = 256;

export interface VqServiceDeps {
  info: VqModelInfo;
  pool: WorkerPool<VqCodec>;
  maxMessageBytes: number;
  /** Where the codecs run their graphs (cpu, webgpu, cuda). */
  device: string;
  log: Logger;
}

export function vqServiceImplementation(deps: VqServiceDeps): grpc.UntypedServiceImplementation {
  const { info, pool } = deps;
  return implement(
    { service: 'VqService', log: deps.log, mapError: mapVqError },
    {
      Encode: unary(async (req: EncodeRequest, ctx): Promise<EncodeResponse> => {
        let cancelledAt = 0;
        ctx.signal.addEventListener(
          'abort',
          () => {
            cancelledAt = performance.now();
          },
          { once: true },
        );
        if (req.mime_type.length > MAX_MIME_TYPE_LENGTH) {
          throw new InvalidArgument(
            `mime_type is ${req.mime_type.length} characters, more than the limit of ${MAX_MIME_TYPE_LENGTH}`,
          );
        }
        if (req.image.length === 0) throw new InvalidArgument('image is empty (0 bytes)');
        await checkImage(req.image, info);
        const started = performance.now();
        // Where the request was when its caller went away: still queued (never run), preprocessing (the model run is
        // skipped) or in the model (the ORT run cannot be interrupted: it ends in its worker, its result dropped).
        let step = 'queued' as 'queued' | 'preprocessing' | 'model';
        let r: Awaited<ReturnType<typeof encodeImage>>;
        try {
          r = await vqTelemetry().run(
            'encode',
            ctx.metadata,
            pool,
            (codec, signal) => {
              step = 'preprocessing';
              return encodeImage(codec, req.image, info, {
                signal,
                onModelStart: () => {
                  step = 'model';
                },
              }).finally(() => {
                if (signal?.aborted && step === 'model')
                  ctx.log.info('abandoned encode finished', {
                    busyMsAfterCancel: Math.round(performance.now() - cancelledAt),
                  });
              });
            },
            ctx.signal,
          );
        } catch (err) {
          if (ctx.signal.aborted) {
            ctx.log.info('encode cancelled', { step, modelSkipped: step !== 'model', ...pool.cancelled });
          }
          throw err;
        }
        ctx.log.debug('encoded', {
          bytes: req.image.length,
          mimeType: req.mime_type || undefined,
          original: `${r.originalHeight}x${r.originalWidth}`,
          grid: `${r.h}x${r.w}`,
          ms: Math.round(performance.now() - started),
        });
        return {
          h: r.h,
          w: r.w,
          codes: codesToBytes(r.codes),
          resized_height: r.resizedHeight,
          resized_width: r.resizedWidth,
          original_height: r.originalHeight,
          original_width: r.originalWidth,
        };
      }),
      Decode: unary(async (req: DecodeRequest, ctx): Promise<DecodeResponse> => {
        const codes = codesFromBytes(req.h, req.w, req.codes, info);
        return vqTelemetry().run(
          'decode',
          ctx.metadata,
          pool,
          (c) => decodeToPng(c, codes, req.h, req.w, info),
          ctx.signal,
        );
      }),
      Info: unary(
        async (): Promise<InfoResponse> => ({
          codebook_size: info.codebookSize,
          spatial_factor: info.spatialFactor,
          min_pixels: info.preprocessor.minPixels,
          max_pixels: info.preprocessor.maxPixels,
          pixel_limit: info.pixelLimit,
          max_codes: info.maxCodes,
          queue_limit: pool.queueLimit,
          workers: pool.size,
          fingerprint: info.fingerprint,
          max_message_bytes: deps.maxMessageBytes,
          device: deps.device,
        }),
      ),
    },
  );
}
