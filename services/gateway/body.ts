// Request bodies: read up to a limit (413 beyond it, before parsing), then parsed as JSON (400 when malformed).
import type { Readable } from 'node:stream';
import { GatewayError } from './errors.js';

export function tooLarge(limit: number): GatewayError {
  return new GatewayError(413, `the request body is larger than the limit of ${limit} bytes (--max-body-bytes)`, {
    code: 'request_too_large',
  });
}

/**
 * The whole body, or GatewayError 413 as soon as it passes `limit` bytes (a Content-Length above it is refused
 * before any byte is read). The rest of an over-limit body is not read.
 */
export function readBody(req: Readable & { headers?: Record<string, unknown> }, limit: number): Promise<Buffer> {
  const declared = Number(req.headers?.['content-length']);
  if (Number.isFinite(declared) && declared > limit) return Promise.reject(tooLarge(limit));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        req.off('data', onData);
        req.pause();
        reject(tooLarge(limit));
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    let ended = false;
    req.once('end', () => {
      ended = true;
      resolve(Buffer.concat(chunks));
    });
    req.once('error', reject);
    req.once('close', () => {
      if (!ended) reject(new GatewayError(400, 'the request body ended early (the client closed the connection)'));
    });
  });
}

/** The body as a JSON value; malformed JSON (or an empty body) is 400 naming the parse error. */
export function parseJson(body: Buffer): unknown {
  const text = body.toString('utf8');
  if (text.trim() === '')
    throw new GatewayError(400, 'the request body is empty; send a JSON object', { code: 'invalid_json' });
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new GatewayError(400, `the request body is not valid JSON: ${(err as Error).message}`, {
      code: 'invalid_json',
    });
  }
}
