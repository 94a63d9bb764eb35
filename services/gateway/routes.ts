// The gateway's routes: method + path → handler name, or the status (404 unknown path, 405 wrong method). Pure.
import { GatewayError } from './errors.js';

export type RouteName = 'chat' | 'images' | 'models' | 'model' | 'health';

interface Route {
  name: RouteName;
  method: 'GET' | 'POST';
  pattern: RegExp;
}

const ROUTES: Route[] = [
  { name: 'chat', method: 'POST', pattern: /^\/v1\/chat\/completions$/ },
  { name: 'images', method: 'POST', pattern: /^\/v1\/images\/generations$/ },
  { name: 'models', method: 'GET', pattern: /^\/v1\/models$/ },
  { name: 'model', method: 'GET', pattern: /^\/v1\/models\/([^/]+)$/ },
  { name: 'health', method: 'GET', pattern: /^\/health$/ },
];

export interface RouteMatch {
  name: RouteName;
  /** The path's captured parts, URI-decoded (the model id of /v1/models/{id}). */
  params: string[];
}

/** Throws GatewayError 404 (no such path) or 405 (the path exists for other methods; `allow` lists them). */
export function matchRoute(method: string, url: string): RouteMatch {
  const path = url.split('?')[0];
  const paths = ROUTES.filter((r) => r.pattern.test(path));
  if (paths.length === 0)
    throw new GatewayError(404, `no route ${method} ${path} (see GET /v1/models, POST /v1/chat/completions)`, {
      code: 'unknown_url',
    });
  // HEAD is served as GET by node:http's semantics: the body is dropped.
  const asked = method === 'HEAD' ? 'GET' : method;
  const route = paths.find((r) => r.method === asked);
  if (!route) {
    const allow = paths.map((r) => r.method).join(', ');
    throw new MethodNotAllowed(method, path, allow);
  }
  const m = route.pattern.exec(path)!;
  let params: string[];
  try {
    params = m.slice(1).map((p) => decodeURIComponent(p));
  } catch {
    throw new GatewayError(400, `the path ${path} is not valid percent-encoding`, { code: 'invalid_url' });
  }
  return { name: route.name, params };
}

export class MethodNotAllowed extends GatewayError {
  constructor(
    method: string,
    path: string,
    readonly allow: string,
  ) {
    super(405, `${method} is not allowed on ${path} (allowed: ${allow})`, { code: 'method_not_allowed' });
  }
}
