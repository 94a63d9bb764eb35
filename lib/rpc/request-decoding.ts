// Request messages decoded in the handler instead of inside grpc-js. grpc-js answers a request it cannot deserialize
// with INTERNAL ("Error deserializing request") before any handler runs; decoded here, a malformed message is
// INVALID_ARGUMENT naming its type ("GenerateRequest: index out of range …").
//
// 32-bit integer fields (int32, uint32, sint32 and enums, also as map values) are read as their 64-bit kinds. A varint
// may be up to 10 bytes long whatever the field's width, and protobufjs's 32-bit reader misreads 6–9-byte ones (it
// skips 10 bytes, throwing or eating the next field) and truncates wider values (seed 2^32 → 0). Read as 64 bits,
// the value reaches the handler as sent, so the handler must range-check these fields (request validation does).
import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import descriptor from 'protobufjs/ext/descriptor/index.js';
import type { ServiceBinding } from './serve.js';

/**
 * How decoded messages become plain objects (protobufjs toObject): longs as numbers, enums by name (an unknown value
 * stays a number), bytes as Buffer, unset fields absent (proto3 `optional` reads as undefined), oneofs named. Field
 * names are those of the service definition (camelCase when it was loaded with keepCase false).
 */
export const requestObjectOptions: protobuf.IConversionOptions = {
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: false,
  oneofs: true,
};

const wider: Record<string, string> = { int32: 'int64', uint32: 'uint64', sint32: 'sint64' };

type Json = { nested?: Record<string, Json>; fields?: Record<string, { type: string }> };

/** Enum-typed fields of the widened types, by type full name then field name. */
type EnumFields = Map<string, Map<string, protobuf.Enum>>;

interface WideRoot {
  root: protobuf.Root;
  enums: EnumFields;
}

/** The schema with every 32-bit varint field turned into its 64-bit kind (enums into int64, remembered). */
function widenedRoot(files: readonly Buffer[]): WideRoot {
  const set = descriptor.FileDescriptorSet.fromObject({
    file: files.map((b) => descriptor.FileDescriptorProto.decode(b)),
  });
  // fromDescriptor is added to Root by protobufjs/ext/descriptor; its typings do not say so.
  const fromDescriptor = (protobuf.Root as unknown as { fromDescriptor(s: unknown): protobuf.Root }).fromDescriptor;
  const original = fromDescriptor(set).resolveAll();
  const json = original.toJSON() as Json;
  const enums: EnumFields = new Map();
  const visit = (ns: protobuf.NamespaceBase, node: Json) => {
    for (const child of ns.nestedArray) {
      const childJson = node.nested?.[child.name];
      if (!childJson) continue;
      if (child instanceof protobuf.Type) {
        for (const field of child.fieldsArray) {
          const target = childJson.fields?.[field.name];
          if (!target) continue;
          if (field.resolvedType instanceof protobuf.Enum) {
            target.type = 'int64';
            const byField = enums.get(child.fullName) ?? new Map<string, protobuf.Enum>();
            byField.set(field.name, field.resolvedType);
            enums.set(child.fullName, byField);
          } else if (wider[field.type]) target.type = wider[field.type];
        }
      }
      if (child instanceof protobuf.Namespace || child instanceof protobuf.Type) visit(child, childJson);
    }
  };
  visit(original, json);
  const root = protobuf.Root.fromJSON(json as protobuf.INamespace);
  root.resolveAll();
  return { root, enums };
}

/** Enum fields back to names (as toObject's `enums: String` would), through nested, repeated and map fields. */
function renameEnums(type: protobuf.Type, obj: Record<string, unknown>, enums: EnumFields, byName: boolean): void {
  const enumFields = enums.get(type.fullName);
  for (const field of type.fieldsArray) {
    const value = obj[field.name];
    if (value === undefined || value === null) continue;
    const asEnum = enumFields?.get(field.name);
    const each = (v: unknown): unknown => {
      if (asEnum)
        return byName && typeof v === 'number' && asEnum.valuesById[v] !== undefined ? asEnum.valuesById[v] : v;
      if (field.resolvedType instanceof protobuf.Type && v && typeof v === 'object')
        renameEnums(field.resolvedType, v as Record<string, unknown>, enums, byName);
      return v;
    };
    if (field.map) {
      const m = value as Record<string, unknown>;
      for (const k of Object.keys(m)) m[k] = each(m[k]);
    } else if (field.repeated) obj[field.name] = (value as unknown[]).map(each);
    else obj[field.name] = each(value);
  }
}

export type RequestDecoder = (buffer: Buffer) => unknown;

export class RequestDecodeError extends Error {
  override name = 'RequestDecodeError';
}

const roots = new WeakMap<readonly Buffer[], WideRoot>();

/** A decoder for the request messages of `method` (a proto-loader method definition); throws RequestDecodeError. */
export function requestDecoder(
  method: grpc.MethodDefinition<unknown, unknown>,
  options: protobuf.IConversionOptions = requestObjectOptions,
): RequestDecoder {
  const files = (method as { requestType?: { fileDescriptorProtos?: Buffer[] } }).requestType?.fileDescriptorProtos;
  if (!files) throw new Error(`${method.path}: not a proto-loader method definition (no request descriptors)`);
  let wide = roots.get(files);
  if (!wide) {
    wide = widenedRoot(files);
    roots.set(files, wide);
  }
  const [, serviceName, methodName] = method.path.split('/');
  const service = wide.root.lookupService(serviceName);
  const type = (service.methods[methodName].resolve() as protobuf.Method).resolvedRequestType as protobuf.Type;
  const { enums } = wide;
  return (buffer) => {
    let object: Record<string, unknown>;
    try {
      object = type.toObject(type.decode(buffer), options);
    } catch (err) {
      throw new RequestDecodeError(`${type.name}: not a valid protobuf message: ${(err as Error).message}`);
    }
    renameEnums(type, object, enums, options.enums === String);
    return object;
  };
}

type AnyHandler = (call: grpc.ServerUnaryCall<unknown, unknown>, callback?: grpc.sendUnaryData<unknown>) => void;

/**
 * The same service with its unary and server-streaming requests decoded in the handler (grpc-js hands over the raw
 * Buffer): a malformed request is answered INVALID_ARGUMENT naming its message type, and the implementation gets the
 * decoded object as `call.request`. Methods with a request stream keep grpc-js's own decoding.
 */
export function decodeRequestsInHandlers(
  binding: ServiceBinding,
  options: protobuf.IConversionOptions = requestObjectOptions,
): ServiceBinding {
  const definition: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  const implementation: grpc.UntypedServiceImplementation = { ...binding.implementation };
  for (const [name, method] of Object.entries(binding.definition)) {
    if (method.requestStream) {
      definition[name] = method;
      continue;
    }
    const decode = requestDecoder(method, options);
    definition[name] = { ...method, requestDeserialize: (buffer: Buffer) => buffer };
    const key = name in implementation ? name : (method.originalName ?? name);
    const inner = implementation[key] as AnyHandler | undefined;
    if (!inner) continue; // grpc-js reports the missing method itself
    const outer: AnyHandler = (call, callback) => {
      try {
        call.request = decode(call.request as Buffer);
      } catch (err) {
        const status = { code: grpc.status.INVALID_ARGUMENT, details: (err as Error).message };
        if (callback) callback(status);
        else (call as unknown as grpc.ServerWritableStream<unknown, unknown>).emit('error', status);
        return;
      }
      inner(call, callback);
    };
    implementation[key] = outer as grpc.UntypedHandleCall;
  }
  return { ...binding, definition, implementation };
}
