// Trace context in gRPC metadata (unary calls): the caller's client span goes out as `traceparent`; the server starts
// its span with that as parent.
import { Metadata } from '@grpc/grpc-js';
import { type SpanHandle, tracing } from './tracing.js';

/** The incoming call's traceparent ('' when there is none). */
export function traceparentOf(metadata: Metadata | undefined): string {
  const v = metadata?.get('traceparent')[0];
  return typeof v === 'string' ? v : '';
}

/**
 * Runs a unary call under a client span, child of `parent`, with the span's traceparent in the metadata it is given.
 * When `parent` is not recording, no span is made and the call gets empty metadata.
 */
export async function tracedCall<T>(
  parent: SpanHandle | undefined,
  method: string,
  call: (metadata: Metadata) => Promise<T>,
): Promise<T> {
  const metadata = new Metadata();
  if (!parent?.recording) return call(metadata);
  const [service, name] = method.split('/');
  const span = tracing().start(method, {
    parent,
    kind: 'client',
    attributes: { 'rpc.system': 'grpc', 'rpc.service': service, 'rpc.method': name },
  });
  metadata.set('traceparent', span.traceparent);
  try {
    return await call(metadata);
  } catch (err) {
    span.fail(err);
    throw err;
  } finally {
    span.end();
  }
}
