// Client side of the same contracts: a client for a service by its full name, and a promise-returning unary call.
import * as grpc from '@grpc/grpc-js';
import { bearerInterceptor } from './auth.js';
import { serviceClient } from './proto.js';
import { DEFAULT_MAX_MESSAGE_BYTES } from './serve.js';
import { channelCredentials, type TlsFiles } from './tls.js';

/**
 * Reconnect backoff for links inside the system (coordinator → shards and vq, shard → next shard): grpc-js's default
 * grows exponentially to 120 s, so a stage restarted after a minute would wait for the next retry. Internal peers
 * are retried at most a second apart, so recovery starts within 1 s of a peer listening again.
 */
export const INTERNAL_RECONNECT: grpc.ChannelOptions = {
  'grpc.initial_reconnect_backoff_ms': 200,
  'grpc.min_reconnect_backoff_ms': 200,
  'grpc.max_reconnect_backoff_ms': 1000,
};

export interface ClientOptions {
  /** grpc.max_receive_message_length and max_send_message_length. Default 64 MiB. */
  maxMessageBytes?: number;
  channelOptions?: grpc.ChannelOptions;
  /** How this client proves itself; default: nothing sent, plaintext. */
  credentials?: ClientCredentials;
}

/** What a client sends to be let in: a bearer token on every call and stream, and/or TLS (mTLS with cert/key). */
export interface ClientCredentials {
  /** The token sent as `authorization: Bearer <token>` on every call; called per call (a re-read file). */
  token?: () => string | undefined;
  /** TLS: the CA the server must chain to, and this client's certificate and key for mTLS. */
  tls?: TlsFiles;
}

/** The grpc-js credentials and client options of `creds`, for clients not made by createClient. */
export function clientSecurity(creds: ClientCredentials | undefined): {
  channel: grpc.ChannelCredentials;
  options: grpc.ClientOptions;
} {
  const token = creds?.token;
  return {
    channel: channelCredentials(creds?.tls),
    options: token ? { interceptors: [bearerInterceptor(token)] } : {},
  };
}

export function createClient(
  files: string | string[],
  fullName: string,
  address: string,
  opts: ClientOptions = {},
): grpc.Client {
  const Client = serviceClient(files, fullName);
  const max = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const security = clientSecurity(opts.credentials);
  return new Client(address, security.channel, {
    'grpc.max_receive_message_length': max,
    'grpc.max_send_message_length': max,
    ...INTERNAL_RECONNECT,
    ...opts.channelOptions,
    ...security.options,
  });
}

export interface CallOptions {
  /** Milliseconds from now. Default: none. */
  deadlineMs?: number;
  metadata?: grpc.Metadata;
}

/** Calls a unary method; rejects with the grpc ServiceError (its .code is the status). */
export function unaryCall<Req, Res>(
  client: grpc.Client,
  method: string,
  request: Req,
  opts: CallOptions = {},
): Promise<Res> {
  const fn = (client as unknown as Record<string, unknown>)[method];
  if (typeof fn !== 'function') return Promise.reject(new Error(`client has no method ${method}`));
  const callOptions: grpc.CallOptions = {};
  if (opts.deadlineMs !== undefined) callOptions.deadline = Date.now() + opts.deadlineMs;
  return new Promise<Res>((resolve, reject) => {
    fn.call(
      client,
      request,
      opts.metadata ?? new grpc.Metadata(),
      callOptions,
      (err: grpc.ServiceError | null, res: Res) => (err ? reject(err) : resolve(res)),
    );
  });
}
