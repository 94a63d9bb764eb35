// Typed request errors of the coordinator. They carry the gRPC status code as a plain number so these pure modules
// need no gRPC import; the server maps them to a status once, in one wrapper. Anything else that reaches a client is
// a bug and is answered INTERNAL.

/** gRPC status codes used here (values from grpc/status.proto). */
export const GrpcCode = {
  CANCELLED: 1,
  INVALID_ARGUMENT: 3,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  INTERNAL: 13,
  UNAVAILABLE: 14,
} as const;

/** A request field is missing, malformed or beyond a limit. The message names the field and the limit. */
export class InvalidArgumentError extends Error {
  override name = 'InvalidArgumentError';
  readonly code = GrpcCode.INVALID_ARGUMENT;
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}

/** The service cannot take the request now (queue full, request larger than the KV budget). */
export class ResourceExhaustedError extends Error {
  override name = 'ResourceExhaustedError';
  readonly code = GrpcCode.RESOURCE_EXHAUSTED;
}

/** The pipeline cannot serve now (a stage missing past --stage-timeout, shutting down). Retrying later may work. */
export class UnavailableError extends Error {
  override name = 'UnavailableError';
  readonly code = GrpcCode.UNAVAILABLE;
}

/** A stage refused this one sequence (StageError REFUSED); `code` is the status the stage asked for. */
export class StageRefusedError extends Error {
  override name = 'StageRefusedError';
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

/** A stage failed to run the sequence's micro-batch (StageError INTERNAL), or the coordinator hit a bug. */
export class InternalError extends Error {
  override name = 'InternalError';
  readonly code = GrpcCode.INTERNAL;
}

/** A typed coordinator error's status and message; undefined for anything else (a bug: the caller answers INTERNAL). */
export function typedStatus(err: unknown): { code: number; message: string } | undefined {
  if (
    err instanceof InvalidArgumentError ||
    err instanceof ResourceExhaustedError ||
    err instanceof UnavailableError ||
    err instanceof StageRefusedError ||
    err instanceof InternalError
  )
    return { code: err.code, message: err.message };
  return undefined;
}
