// The OpenAI-compatible HTTP gateway: plain node:http in front of the coordinator's public gRPC API. Thin wiring:
// the request and response mappings are the pure modules beside this one.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type * as grpc from '@grpc/grpc-js';
import { bearerToken, type TokenFile, tokenMatches } from '../../lib/rpc/auth.js';
import type { ClientCredentials } from '../../lib/rpc/client.js';
import type { Logger } from '../../lib/rpc/log.js';
import { parseAddress } from '../../lib/rpc/serve.js';
import { loadTokenizer } from '../../lib/tokenizer/load.js';
import { parseJson, readBody } from './body.js';
import { type ChatPlan, mapChatRequest } from './chat-request.js';
import { ChatAnswer, ChatChunks, type CompletionMeta, type LogprobOptions, type TokenText } from './chat-response.js';
import { CoordinatorClient } from './coordinator-client.js';
import { fromGrpcStatus, GatewayError, unauthorized } from './errors.js';
import type { GenerateFinal, GenerateResponseMessage, ModelInfoMessage } from './generate-request.js';
import { generationNotAvailable, imagesResponse, mapImageRequest, noImageInAnswer } from './images.js';
import { modelById, modelList } from './models.js';
import { MethodNotAllowed, matchRoute } from './routes.js';
import { SSE_DONE, SSE_HEADERS, sseEvent } from './sse.js';

export interface GatewayOptions {
  /** host:port to listen on (port 0 picks a free one). */
  listen: string;
  /** The coordinator's public gRPC address. */
  coordinator: string;
  /** A model directory (config.json + tokenizer files) for the token texts of logprobs; without it they are refused. */
  modelDir?: string;
  /** Largest request body; larger ones are answered 413. Default 64 MiB. */
  maxBodyBytes?: number;
  /** On close, how long running answers may go on before their connections are closed. Default 10 s. */
  drainTimeoutMs?: number;
  log: Logger;
  /** API keys (--auth-token-file): every route but /health needs "authorization: Bearer <key>". Unset: none. */
  authTokens?: TokenFile;
  /** What the gateway presents to the coordinator (its public API token, the CA of its TLS certificate). */
  coordinatorCredentials?: ClientCredentials;
  /** Serve HTTPS with this PEM certificate and key (default: HTTP). */
  tls?: { cert: string; key: string };
}

export interface RunningGateway {
  /** The bound address, host:port, with the real port. */
  address: string;
  /** The OpenAI base URL clients are given: http://host:port/v1. */
  baseUrl: string;
  /** Stops accepting, lets running answers finish for drainTimeoutMs, then closes; idempotent. */
  close(): Promise<void>;
  /** Resolves once the server and its gRPC client are closed. */
  closed: Promise<void>;
}

export const DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024;
/** How long a GetModelInfo answer is reused for the model check of chat requests. */
const MODEL_INFO_TTL_MS = 5000;
const UNARY_DEADLINE_MS = 10_000;

function isServiceError(err: unknown): err is grpc.ServiceError {
  return (
    typeof err === 'object' && err !== null && typeof (err as grpc.ServiceError).code === 'number' && 'details' in err
  );
}

function tokenTextOf(modelDir: string): TokenText {
  const tok = loadTokenizer(modelDir);
  const utf8 = new TextDecoder('utf-8', { fatal: false });
  return (id) => {
    const bytes = tok.decodeBytes([id]);
    return { token: utf8.decode(bytes), bytes: [...bytes] };
  };
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function sendError(res: ServerResponse, err: GatewayError): void {
  const headers: Record<string, string> = {};
  if (!err.retryable) headers['x-should-retry'] = 'false';
  if (err instanceof MethodNotAllowed) headers.allow = err.allow;
  sendJson(res, err.status, err.body(), headers);
}

export async function startGateway(opts: GatewayOptions): Promise<RunningGateway> {
  const log = opts.log;
  const { host, port } = parseAddress(opts.listen);
  const maxBody = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const tokenText = opts.modelDir ? tokenTextOf(opts.modelDir) : null;
  // Room for a body of maxBody bytes decoded from base64, plus the answer.
  const client = new CoordinatorClient(opts.coordinator, {
    maxMessageBytes: Math.max(maxBody, 4 * 1024 * 1024) + 65536,
    credentials: opts.coordinatorCredentials,
  });
  const authTokens = opts.authTokens;
  /** Refuses a request without one of the API keys (constant-time comparison; the key is never logged). */
  const checkKey = (req: IncomingMessage): void => {
    if (!authTokens) return;
    const header = req.headers.authorization;
    if (header === undefined)
      throw unauthorized(
        'You did not provide an API key: send "Authorization: Bearer <key>" (the gateway runs with --auth-token-file)',
      );
    const key = bearerToken(header);
    if (key === null) throw unauthorized('The Authorization header must be "Bearer <key>"');
    if (!tokenMatches(key, authTokens.tokens())) throw unauthorized('Incorrect API key provided');
  };
  const startedAt = Math.floor(Date.now() / 1000);
  let cachedInfo: { at: number; info: ModelInfoMessage } | null = null;

  const grpcError = (err: unknown, paramOf?: (f: string) => string | null): GatewayError => {
    if (err instanceof GatewayError) return err;
    if (isServiceError(err)) return fromGrpcStatus(err.code, err.details, paramOf);
    throw err;
  };

  const modelInfo = async (fresh: boolean): Promise<ModelInfoMessage> => {
    if (!fresh && cachedInfo && Date.now() - cachedInfo.at < MODEL_INFO_TTL_MS) return cachedInfo.info;
    try {
      const info = await client.modelInfo(UNARY_DEADLINE_MS);
      cachedInfo = { at: Date.now(), info };
      return info;
    } catch (err) {
      throw grpcError(err);
    }
  };

  const completionMeta = (id: string, info: ModelInfoMessage): CompletionMeta => ({
    id,
    created: Math.floor(Date.now() / 1000),
    model: info.modelName,
    systemFingerprint: `fp_${info.modelFingerprint.slice(0, 16)}`,
  });

  /**
   * Runs Generate for `res`: a client disconnect (the response closing before it is complete) cancels the call, and
   * a slow reader pauses it. `onMessage` returns false to stop early (the call is then cancelled).
   */
  const runGenerate = (
    call: grpc.ClientReadableStream<GenerateResponseMessage>,
    res: ServerResponse,
    onMessage: (m: GenerateResponseMessage) => boolean,
  ): Promise<void> =>
    new Promise((resolve, reject) => {
      let settled = false;
      const settle = (err?: unknown) => {
        if (settled) return;
        settled = true;
        res.off('close', onClose);
        if (err === undefined) resolve();
        else reject(err);
      };
      const onClose = () => {
        // 'close' also follows a complete response: only an unfinished one means the client went away.
        if (settled || res.writableFinished) return;
        log.info('client went away; cancelling its Generate call');
        call.cancel();
        settle(new ClientGone());
      };
      res.on('close', onClose);
      // The client may have gone while the body was read or the model checked, before this listener existed.
      if (res.destroyed || res.socket?.destroyed) onClose();
      call.on('data', (m: GenerateResponseMessage) => {
        if (settled) return;
        let more: boolean;
        try {
          more = onMessage(m);
        } catch (err) {
          call.cancel();
          settle(err);
          return;
        }
        if (!more) {
          call.cancel();
          settle();
        } else if (res.writableNeedDrain) {
          call.pause();
          res.once('drain', () => call.resume());
        }
      });
      call.on('error', (err) => settle(err));
      call.on('end', () => settle());
    });

  const chatCompletions = async (req: IncomingMessage, res: ServerResponse): Promise<number> => {
    const body = parseJson(await readBody(req, maxBody));
    const info = await modelInfo(false);
    const id = `chatcmpl-${randomBytes(12).toString('hex')}`;
    const plan = mapChatRequest(body, { servedModel: info.modelName, requestId: id });
    let lp: LogprobOptions | null = null;
    if (plan.logprobs) {
      if (!tokenText)
        throw new GatewayError(
          400,
          'logprobs: token texts need the tokenizer, and this gateway was started without --model DIR',
          { param: 'logprobs', code: 'unsupported_parameter' },
        );
      lp = { top: plan.logprobs.top, tokenText };
    }
    const meta = completionMeta(id, info);
    const call = client.generate(plan.request);
    return plan.stream ? streamChat(plan, call, res, meta, lp) : wholeChat(plan, call, res, meta, lp);
  };

  const wholeChat = async (
    plan: ChatPlan,
    call: grpc.ClientReadableStream<GenerateResponseMessage>,
    res: ServerResponse,
    meta: CompletionMeta,
    lp: LogprobOptions | null,
  ): Promise<number> => {
    const answer = new ChatAnswer(meta, lp);
    let final: GenerateFinal | null = null;
    try {
      await runGenerate(call, res, (m) => {
        if (m.delta) answer.add(m.delta);
        if (m.final) final = m.final;
        return true;
      });
    } catch (err) {
      if (err instanceof ClientGone) return 499;
      throw grpcError(err, plan.paramOf);
    }
    if (!final) throw endedWithoutFinal();
    sendJson(res, 200, answer.finish(final), { 'x-request-id': meta.id });
    return 200;
  };

  const streamChat = async (
    plan: ChatPlan,
    call: grpc.ClientReadableStream<GenerateResponseMessage>,
    res: ServerResponse,
    meta: CompletionMeta,
    lp: LogprobOptions | null,
  ): Promise<number> => {
    const chunks = new ChatChunks(meta, lp, plan.includeUsage);
    let finished = false;
    // The status line waits for the first message: a refusal (bad image, too many tokens) is still an HTTP error.
    const begin = () => {
      if (res.headersSent) return;
      res.writeHead(200, { ...SSE_HEADERS, 'x-request-id': meta.id });
      res.write(sseEvent(chunks.first()));
    };
    try {
      await runGenerate(call, res, (m) => {
        if (m.delta) {
          const c = chunks.delta(m.delta);
          if (c) {
            begin();
            res.write(sseEvent(c));
          }
        }
        if (m.final) {
          const last = chunks.final(m.final);
          begin();
          for (const c of last) res.write(sseEvent(c));
          res.end(SSE_DONE);
          finished = true;
        }
        return true;
      });
    } catch (err) {
      if (err instanceof ClientGone) return 499;
      const mapped = grpcError(err, plan.paramOf);
      if (!res.headersSent) throw mapped;
      res.end(sseEvent(mapped.body()));
      log.warn('stream ended with an error', { requestId: meta.id, status: mapped.status, error: mapped.message });
      return 200;
    }
    if (!finished) {
      if (!res.headersSent) throw endedWithoutFinal();
      res.end(sseEvent(endedWithoutFinal().body()));
    }
    return 200;
  };

  const imageGenerations = async (req: IncomingMessage, res: ServerResponse): Promise<number> => {
    const body = parseJson(await readBody(req, maxBody));
    const info = await modelInfo(false);
    const plan = mapImageRequest(body, {
      servedModel: info.modelName,
      requestId: `img-${randomBytes(12).toString('hex')}`,
    });
    let final: GenerateResponseMessage['final'] = null;
    try {
      await runGenerate(client.generate(plan.request), res, (m) => {
        if (m.final) final = m.final;
        return true;
      });
    } catch (err) {
      if (err instanceof ClientGone) return 499;
      if (isServiceError(err)) {
        const unavailable = generationNotAvailable(err.code, err.details, plan.size);
        if (unavailable) throw unavailable;
      }
      throw grpcError(err, (field) =>
        field.startsWith('parts') ? 'prompt' : field.startsWith('image') ? 'size' : null,
      );
    }
    const done = final as GenerateResponseMessage['final'];
    if (!done) throw endedWithoutFinal();
    if (!done.image?.png?.length) throw noImageInAnswer(done.finishReason);
    sendJson(res, 200, imagesResponse(done.image.png, Math.floor(Date.now() / 1000)), {
      'x-request-id': plan.request.requestId,
    });
    return 200;
  };

  const health = async (res: ServerResponse): Promise<number> => {
    let status: string;
    try {
      status = await client.healthStatus(2000);
    } catch (err) {
      status = isServiceError(err) ? `UNREACHABLE (${err.details})` : 'UNREACHABLE';
    }
    const code = status === 'SERVING' ? 200 : 503;
    sendJson(res, code, { status, coordinator: opts.coordinator });
    return code;
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<number> => {
    const route = matchRoute(req.method ?? 'GET', req.url ?? '/');
    if (route.name !== 'health') checkKey(req);
    switch (route.name) {
      case 'chat':
        return chatCompletions(req, res);
      case 'images':
        return imageGenerations(req, res);
      case 'models':
        sendJson(res, 200, modelList(await modelInfo(true), startedAt));
        return 200;
      case 'model':
        sendJson(res, 200, modelById(await modelInfo(true), route.params[0], startedAt));
        return 200;
      case 'health':
        return health(res);
    }
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    const started = performance.now();
    const done = (status: number) =>
      log.info('request', { method: req.method, path: req.url, status, ms: Math.round(performance.now() - started) });
    handle(req, res).then(done, (err: unknown) => {
      let mapped: GatewayError;
      if (err instanceof GatewayError) mapped = err;
      else if (isServiceError(err)) mapped = fromGrpcStatus(err.code, err.details);
      else {
        log.error('unexpected error in the gateway', { method: req.method, path: req.url, error: err });
        mapped = new GatewayError(500, `internal error in the gateway (${(err as Error)?.message ?? String(err)})`, {
          code: 'internal',
        });
      }
      if (res.headersSent) res.destroy();
      else {
        if (mapped.status === 401) res.setHeader('www-authenticate', 'Bearer');
        // A body left unread (413, 401) would otherwise keep the connection busy: close it after the answer.
        if (mapped.status === 413 || mapped.status === 401) res.setHeader('connection', 'close');
        sendError(res, mapped);
      }
      done(mapped.status);
    });
  };
  const server = opts.tls
    ? createHttpsServer({ cert: readFileSync(opts.tls.cert), key: readFileSync(opts.tls.key) }, onRequest)
    : createServer(onRequest);
  server.on('clientError', (err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n');
    log.debug('malformed HTTP request', { error: err.message });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host.replace(/^\[|\]$/g, ''), () => {
      server.off('error', reject);
      resolve();
    });
  });
  const bound = server.address() as AddressInfo;
  const address = `${host}:${bound.port}`;
  const baseUrl = `${opts.tls ? 'https' : 'http'}://${address}/v1`;
  log.info('listening', {
    address,
    baseUrl,
    coordinator: opts.coordinator,
    logprobs: tokenText !== null,
    auth: authTokens ? '--auth-token-file' : 'none',
  });

  const closed = new Promise<void>((resolve) => {
    server.once('close', () => {
      client.close();
      log.info('closed');
      resolve();
    });
  });
  let closing = false;
  const close = () => {
    if (!closing) {
      closing = true;
      server.close();
      server.closeIdleConnections();
      const timer = setTimeout(() => server.closeAllConnections(), opts.drainTimeoutMs ?? 10_000);
      timer.unref();
      void closed.then(() => clearTimeout(timer));
    }
    return closed;
  };
  return { address, baseUrl, close, closed };
}

/** The HTTP client closed the connection before the answer was complete (its call was cancelled). */
class ClientGone extends Error {
  override name = 'ClientGone';
}

function endedWithoutFinal(): GatewayError {
  return new GatewayError(502, 'the coordinator ended the Generate stream without its final message', {
    code: 'bad_gateway',
  });
}
