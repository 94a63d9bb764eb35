// Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the HTTP status a client expects,
// and the mapping of a gRPC status from the coordinator onto them. Pure: no I/O.

export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

/** A refusal the gateway answers itself, or a coordinator status already mapped. */
export class GatewayError extends Error {
  override name = 'GatewayError';
  readonly type: string;
  readonly param: string | null;
  readonly code: string | null;
  constructor(
    readonly status: number,
    message: string,
    opts: { param?: string | null; code?: string | null; type?: string } = {},
  ) {
    super(message);
    this.type = opts.type ?? errorTypeFor(status);
    this.param = opts.param ?? null;
    this.code = opts.code ?? null;
  }

  body(): OpenAiErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }

  /**
   * Whether a client may retry as is. The openai clients retry 408, 409, 429 and 5xx unless the response says
   * `x-should-retry: false`; a 501 (not implemented) or a 500 from a refused request would only fail again.
   */
  get retryable(): boolean {
    return this.status === 408 || this.status === 429 || this.status === 503 || this.status === 504;
  }
}

/** OpenAI's error types by status: the 4xx of a request, 401/403/429 of their own, 5xx server_error. */
export function errorTypeFor(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

/** gRPC status codes (grpc/status.proto), by number so this module needs no gRPC import. */
export const GrpcStatus = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;

/** HTTP status and OpenAI error code for each gRPC status (as grpc-gateway maps them; CANCELLED is 499). */
const grpcToHttp: Record<number, { status: number; code: string }> = {
  [GrpcStatus.CANCELLED]: { status: 499, code: 'cancelled' },
  [GrpcStatus.UNKNOWN]: { status: 500, code: 'unknown' },
  [GrpcStatus.INVALID_ARGUMENT]: { status: 400, code: 'invalid_argument' },
  [GrpcStatus.DEADLINE_EXCEEDED]: { status: 504, code: 'deadline_exceeded' },
  [GrpcStatus.NOT_FOUND]: { status: 404, code: 'not_found' },
  [GrpcStatus.ALREADY_EXISTS]: { status: 409, code: 'already_exists' },
  [GrpcStatus.PERMISSION_DENIED]: { status: 403, code: 'permission_denied' },
  [GrpcStatus.RESOURCE_EXHAUSTED]: { status: 429, code: 'resource_exhausted' },
  [GrpcStatus.FAILED_PRECONDITION]: { status: 400, code: 'failed_precondition' },
  [GrpcStatus.ABORTED]: { status: 409, code: 'aborted' },
  [GrpcStatus.OUT_OF_RANGE]: { status: 400, code: 'out_of_range' },
  [GrpcStatus.UNIMPLEMENTED]: { status: 501, code: 'not_implemented' },
  [GrpcStatus.INTERNAL]: { status: 500, code: 'internal' },
  [GrpcStatus.UNAVAILABLE]: { status: 503, code: 'unavailable' },
  [GrpcStatus.DATA_LOSS]: { status: 500, code: 'data_loss' },
  [GrpcStatus.UNAUTHENTICATED]: { status: 401, code: 'unauthenticated' },
};

/**
 * The proto field an INVALID_ARGUMENT message starts with ("sampling.top_p: 0 must be in (0, 1]" → "sampling.top_p"),
 * as the coordinator writes them; null when the message names none.
 */
export function protoFieldOf(details: string): string | null {
  const m = /^([a-z_]+(?:\[\d*\])?(?:\.[a-z_]+(?:\[\d*\])?)*): /.exec(details);
  return m ? m[1] : null;
}

/**
 * A coordinator status as an OpenAI error. `paramOf` turns the proto field the message names into the OpenAI
 * request parameter it came from (null: none).
 */
export function fromGrpcStatus(
  code: number,
  details: string,
  paramOf: (protoField: string) => string | null = () => null,
): GatewayError {
  const mapped = grpcToHttp[code] ?? { status: 500, code: 'unknown' };
  const field = code === GrpcStatus.INVALID_ARGUMENT ? protoFieldOf(details) : null;
  const message = details || `the coordinator answered gRPC status ${code} without a message`;
  return new GatewayError(mapped.status, message, { param: field ? paramOf(field) : null, code: mapped.code });
}

/** A model id other than the served one (OpenAI answers 404 model_not_found). */
export function modelNotFound(model: string, served: string): GatewayError {
  return new GatewayError(404, `The model "${model}" does not exist; this server serves "${served}" (GET /v1/models)`, {
    param: 'model',
    code: 'model_not_found',
    type: 'invalid_request_error',
  });
}

/** A call without a valid API key (OpenAI answers 401 invalid_request_error / invalid_api_key). */
export function unauthorized(message: string): GatewayError {
  return new GatewayError(401, message, { code: 'invalid_api_key', type: 'invalid_request_error' });
}
