// Loading the .proto contracts with @grpc/proto-loader, the same options for every service and client.
import { existsSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/**
 * keepCase: field names as written in the proto (snake_case); longs as JS numbers; bytes as Buffer;
 * enums as their string names; defaults filled in, so a missing field reads as its proto3 default.
 */
export const protoLoaderOptions: protoLoader.Options = {
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
};

/**
 * The repository's proto/ directory, found by walking up from this module to the package root (the folder with
 * package.json and proto/), so it works both from the sources and from the compiled dist/lib/rpc.
 */
export function protoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'proto'))) return join(dir, 'proto');
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`proto directory not found above ${fileURLToPath(import.meta.url)}`);
    dir = parent;
  }
}

const cache = new Map<string, grpc.GrpcObject>();

/** Loads proto files given relative to proto/ (for example 'emu3/internal/v1/vq.proto') or as absolute paths; cached. */
export function loadProto(...files: string[]): grpc.GrpcObject {
  const key = files.join('\n');
  let loaded = cache.get(key);
  if (!loaded) {
    const root = protoRoot();
    const definition = protoLoader.loadSync(
      files.map((f) => (isAbsolute(f) ? f : join(root, f))),
      { ...protoLoaderOptions, includeDirs: [root] },
    );
    loaded = grpc.loadPackageDefinition(definition);
    cache.set(key, loaded);
  }
  return loaded;
}

/** A service constructor by its fully qualified name, e.g. 'emu3.internal.v1.VqService'. */
export function serviceClient(files: string | string[], fullName: string): grpc.ServiceClientConstructor {
  let node: unknown = loadProto(...(Array.isArray(files) ? files : [files]));
  for (const part of fullName.split('.')) {
    node = (node as Record<string, unknown> | undefined)?.[part];
  }
  if (typeof node !== 'function' || !('service' in node)) {
    throw new Error(`service ${fullName} not found in ${Array.isArray(files) ? files.join(', ') : files}`);
  }
  return node as grpc.ServiceClientConstructor;
}

/** The service definition to pass to Server.addService. */
export function serviceDefinition(files: string | string[], fullName: string): grpc.ServiceDefinition {
  return serviceClient(files, fullName).service;
}
