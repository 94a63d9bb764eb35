// Typed reads of a parsed JSON body's fields; every refusal is a 400 naming the OpenAI parameter. `null` and a
// missing field both mean "unset", as in OpenAI's API.
import { GatewayError } from './errors.js';

export type JsonObject = Record<string, unknown>;

export function invalid(param: string, message: string, code = 'invalid_value'): never {
  throw new GatewayError(400, `${param}: ${message}`, { param, code });
}

export function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function optionalNumber(body: JsonObject, key: string): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) invalid(key, `must be a number, got ${JSON.stringify(v)}`);
  return v;
}

export function optionalInteger(body: JsonObject, key: string, min: number, max: number): number | undefined {
  const v = optionalNumber(body, key);
  if (v === undefined) return undefined;
  if (!Number.isInteger(v) || v < min || v > max) invalid(key, `${v} must be an integer in [${min}, ${max}]`);
  return v;
}

export function optionalBoolean(body: JsonObject, key: string): boolean | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') invalid(key, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

export function optionalString(body: JsonObject, key: string): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') invalid(key, `must be a string, got ${JSON.stringify(v)}`);
  return v;
}

/** Refuses every key outside `known`, as OpenAI does ("unrecognized request argument"). */
export function refuseUnknownKeys(body: JsonObject, known: ReadonlySet<string>, where = ''): void {
  for (const key of Object.keys(body)) {
    if (!known.has(key)) {
      const param = where ? `${where}.${key}` : key;
      invalid(param, 'unrecognized request argument', 'unknown_parameter');
    }
  }
}

/**
 * A parameter the Generate API cannot express: accepted only at a value that means "off" (or unset), so a client's
 * intent is never dropped silently.
 */
export function onlyDefault(body: JsonObject, key: string, isDefault: (v: unknown) => boolean, why: string): void {
  const v = body[key];
  if (v === undefined || v === null || isDefault(v)) return;
  invalid(key, `${JSON.stringify(v)} is not supported: ${why}`, 'unsupported_parameter');
}
