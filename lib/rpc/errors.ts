// Typed errors a handler throws; the handler wrappers turn them into gRPC statuses. Anything else is a bug and becomes
// INTERNAL (stack logged, only the message sent) so the process never crashes on a bad request.
import { Metadata, type ServiceError, status } from '@grpc/grpc-js';
import type { Logger } from './log.js';

export class RpcError extends Error {
  override name = 'RpcError';
  constructor(
    readonly code: status,
    message: string,
  ) {
    super(message);
  }
}

export class InvalidArgument extends RpcError {
  override name = 'InvalidArgument';
  constructor(message: string) {
    super(status.INVALID_ARGUMENT, message);
  }
}

export class ResourceExhausted extends RpcError {
  override name = 'ResourceExhausted';
  constructor(message: string) {
    super(status.RESOURCE_EXHAUSTED, message);
  }
}

export class NotFound extends RpcError {
  override name = 'NotFound';
  constructor(message: string) {
    super(status.NOT_FOUND, message);
  }
}

export class FailedPrecondition extends RpcError {
  override name = 'FailedPrecondition';
  constructor(message: string) {
    super(status.FAILED_PRECONDITION, message);
  }
}

export class Unavailable extends RpcError {
  override name = 'Unavailable';
  constructor(message: string) {
    super(status.UNAVAILABLE, message);
  }
}

export class DeadlineExceeded extends RpcError {
  override name = 'DeadlineExceeded';
  constructor(message: string) {
    super(status.DEADLINE_EXCEEDED, message);
  }
}

export class Cancelled extends RpcError {
  override name = 'Cancelled';
  constructor(message: string) {
    super(status.CANCELLED, message);
  }
}

export class Aborted extends RpcError {
  override name = 'Aborted';
  constructor(message: string) {
    super(status.ABORTED, message);
  }
}

export class OutOfRange extends RpcError {
  override name = 'OutOfRange';
  constructor(message: string) {
    super(status.OUT_OF_RANGE, message);
  }
}

export class Unimplemented extends RpcError {
  override name = 'Unimplemented';
  constructor(message: string) {
    super(status.UNIMPLEMENTED, message);
  }
}

/** Maps a service's own error types (for example ImageInputError) to an RpcError; undefined = not one of ours. */
export type ErrorMapper = (err: unknown) => RpcError | undefined;

/**
 * The status a failed call ends with. RpcErrors (directly or via `map`) keep their code and message; anything else is
 * logged with its stack and answered INTERNAL with a message that names the method (the stack stays in the log).
 */
export function toServiceError(err: unknown, method: string, log: Logger, map?: ErrorMapper): Partial<ServiceError> {
  const typed = err instanceof RpcError ? err : map?.(err);
  if (typed) {
    log.info('call refused', { method, code: status[typed.code], error: typed.message });
    return { code: typed.code, details: typed.message, metadata: new Metadata() };
  }
  log.error('unexpected error in handler', { method, error: err });
  const brief = err instanceof Error ? err.message : String(err);
  return { code: status.INTERNAL, details: `${method}: internal error (${brief})`, metadata: new Metadata() };
}
