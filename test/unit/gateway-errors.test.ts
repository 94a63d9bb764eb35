import assert from 'node:assert/strict';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { validateGenerateRequest } from '../../services/coordinator/request-validation.js';
import { errorTypeFor, fromGrpcStatus, GatewayError, protoFieldOf } from '../../services/gateway/errors.js';

test('gRPC statuses map to the HTTP statuses clients expect', () => {
  const table: [number, number][] = [
    [status.INVALID_ARGUMENT, 400],
    [status.FAILED_PRECONDITION, 400],
    [status.OUT_OF_RANGE, 400],
    [status.UNAUTHENTICATED, 401],
    [status.PERMISSION_DENIED, 403],
    [status.NOT_FOUND, 404],
    [status.ALREADY_EXISTS, 409],
    [status.ABORTED, 409],
    [status.RESOURCE_EXHAUSTED, 429],
    [status.CANCELLED, 499],
    [status.INTERNAL, 500],
    [status.UNKNOWN, 500],
    [status.DATA_LOSS, 500],
    [status.UNIMPLEMENTED, 501],
    [status.UNAVAILABLE, 503],
    [status.DEADLINE_EXCEEDED, 504],
  ];
  for (const [code, http] of table) {
    const e = fromGrpcStatus(code, 'why');
    assert.equal(e.status, http, status[code]);
    assert.equal(e.message, 'why');
  }
  assert.equal(fromGrpcStatus(99, '').status, 500);
  assert.match(fromGrpcStatus(status.INTERNAL, '').message, /status 13/);
});

test("OpenAI's error shape and types", () => {
  const e = new GatewayError(400, 'bad top_p', { param: 'top_p', code: 'invalid_value' });
  assert.deepEqual(e.body(), {
    error: { message: 'bad top_p', type: 'invalid_request_error', param: 'top_p', code: 'invalid_value' },
  });
  assert.deepEqual(new GatewayError(500, 'x').body(), {
    error: { message: 'x', type: 'server_error', param: null, code: null },
  });
  assert.equal(errorTypeFor(401), 'authentication_error');
  assert.equal(errorTypeFor(403), 'permission_error');
  assert.equal(errorTypeFor(404), 'invalid_request_error');
  assert.equal(errorTypeFor(429), 'rate_limit_error');
  assert.equal(errorTypeFor(503), 'server_error');
});

test('only transient statuses are retryable (the clients retry otherwise)', () => {
  for (const s of [429, 503, 504]) assert.equal(new GatewayError(s, '').retryable, true, String(s));
  for (const s of [400, 404, 413, 500, 501]) assert.equal(new GatewayError(s, '').retryable, false, String(s));
});

test("the field named by the coordinator's INVALID_ARGUMENT messages", () => {
  const messageOf = (req: object) => {
    try {
      validateGenerateRequest(req);
    } catch (err) {
      return (err as Error).message;
    }
    assert.fail('accepted');
  };
  assert.equal(protoFieldOf(messageOf({ parts: [{ text: 'x' }], sampling: { topP: 2 } })), 'sampling.top_p');
  assert.equal(protoFieldOf(messageOf({ parts: [{ text: 'x' }], sampling: { stop: [''] } })), 'sampling.stop[0]');
  assert.equal(protoFieldOf(messageOf({ parts: [] })), 'parts');
  assert.equal(protoFieldOf(messageOf({ parts: [{ image: { data: new Uint8Array(0) } }] })), 'parts[0].image.data');
  assert.equal(protoFieldOf(messageOf({ parts: [{ text: 'x' }], task: 'TASK_GENERATE_IMAGE' })), 'task');
  assert.equal(protoFieldOf('the queue is full'), null);
  // the param is only looked up for INVALID_ARGUMENT
  assert.equal(fromGrpcStatus(status.RESOURCE_EXHAUSTED, 'parts: too big', () => 'messages').param, null);
  assert.equal(fromGrpcStatus(status.INVALID_ARGUMENT, 'parts: too big', () => 'messages').param, 'messages');
});
