// Typed request errors of the coordinator. They carry the gRPC status code as a plain number so these pure modules
// need no gRPC import; the server maps them to a status once, in one wrapper.

/** gRPC status codes used here (values from grpc/status.proto). */
export const GrpcCode = { INVALID_ARGUMENT: 3, RESOURCE_EXHAUSTED: 8 } as const;

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
