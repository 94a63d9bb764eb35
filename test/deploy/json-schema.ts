// A small JSON Schema validator for the keywords deploy/schemas uses (draft-07 meanings): $ref to #/definitions,
// type, const, enum, properties, required, additionalProperties, propertyNames, items, minItems, minLength, maxLength,
// pattern, minimum, maximum, allOf, anyOf, oneOf, not. A keyword it does not know is an error, so a schema can never
// look stricter than it is checked.
export type Schema = Record<string, unknown>;

const KNOWN = new Set([
  '$ref',
  '$comment',
  'type',
  'const',
  'enum',
  'properties',
  'required',
  'additionalProperties',
  'propertyNames',
  'items',
  'minItems',
  'minLength',
  'maxLength',
  'pattern',
  'minimum',
  'maximum',
  'allOf',
  'anyOf',
  'oneOf',
  'not',
]);

/** The problems of `value` against `schema` (resolving $ref in `root`), each "path: what"; empty when valid. */
export function validate(value: unknown, schema: Schema, root: Schema, path = '$'): string[] {
  const errors: string[] = [];
  for (const key of Object.keys(schema)) if (!KNOWN.has(key)) throw new Error(`schema keyword "${key}" at ${path}`);
  if (typeof schema.$ref === 'string') errors.push(...validate(value, resolveRef(schema.$ref, root), root, path));
  if (schema.type !== undefined && !hasType(value, schema.type as string)) {
    errors.push(`${path}: expected ${schema.type}, got ${describe(value)}`);
    return errors;
  }
  if ('const' in schema && value !== schema.const)
    errors.push(`${path}: must be ${JSON.stringify(schema.const)}, got ${JSON.stringify(value)}`);
  if (Array.isArray(schema.enum) && !schema.enum.includes(value))
    errors.push(
      `${path}: must be one of ${schema.enum.map((e) => JSON.stringify(e)).join(', ')}, got ${JSON.stringify(value)}`,
    );
  if (typeof value === 'string') {
    if (typeof schema.pattern === 'string' && !new RegExp(schema.pattern, 'u').test(value))
      errors.push(`${path}: "${value}" does not match ${schema.pattern}`);
    if (typeof schema.minLength === 'number' && value.length < schema.minLength)
      errors.push(`${path}: shorter than ${schema.minLength}`);
    if (typeof schema.maxLength === 'number' && value.length > schema.maxLength)
      errors.push(`${path}: longer than ${schema.maxLength}`);
  }
  if (typeof value === 'number') {
    if (typeof schema.minimum === 'number' && value < schema.minimum)
      errors.push(`${path}: ${value} is below ${schema.minimum}`);
    if (typeof schema.maximum === 'number' && value > schema.maximum)
      errors.push(`${path}: ${value} is above ${schema.maximum}`);
  }
  if (Array.isArray(value)) {
    if (typeof schema.minItems === 'number' && value.length < schema.minItems)
      errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (schema.items)
      value.forEach((v, i) => errors.push(...validate(v, schema.items as Schema, root, `${path}[${i}]`)));
  }
  if (isObject(value)) {
    const props = (schema.properties ?? {}) as Record<string, Schema>;
    for (const r of (schema.required ?? []) as string[]) if (!(r in value)) errors.push(`${path}: "${r}" is required`);
    for (const [k, v] of Object.entries(value)) {
      const at = `${path}.${k}`;
      if (schema.propertyNames)
        errors.push(...validate(k, schema.propertyNames as Schema, root, `${path} (key "${k}")`));
      if (k in props) errors.push(...validate(v, props[k], root, at));
      else if (schema.additionalProperties === false) errors.push(`${path}: unknown field "${k}"`);
      else if (isObject(schema.additionalProperties))
        errors.push(...validate(v, schema.additionalProperties as Schema, root, at));
    }
  }
  for (const s of (schema.allOf ?? []) as Schema[]) errors.push(...validate(value, s, root, path));
  if (Array.isArray(schema.anyOf) && !schema.anyOf.some((s) => validate(value, s, root, path).length === 0))
    errors.push(`${path}: matches none of anyOf`);
  if (Array.isArray(schema.oneOf)) {
    const n = schema.oneOf.filter((s) => validate(value, s, root, path).length === 0).length;
    if (n !== 1) errors.push(`${path}: must match exactly one of oneOf, matches ${n}`);
  }
  if (schema.not && validate(value, schema.not as Schema, root, path).length === 0)
    errors.push(`${path}: matches a schema it must not (${JSON.stringify(schema.not)})`);
  return errors;
}

function resolveRef(ref: string, root: Schema): Schema {
  const m = /^#\/definitions\/([^/]+)$/.exec(ref);
  const target = m ? (root.definitions as Record<string, Schema> | undefined)?.[m[1]] : undefined;
  if (!target) throw new Error(`unresolved $ref ${ref}`);
  return target;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function hasType(v: unknown, type: string): boolean {
  switch (type) {
    case 'object':
      return isObject(v);
    case 'array':
      return Array.isArray(v);
    case 'string':
      return typeof v === 'string';
    case 'boolean':
      return typeof v === 'boolean';
    case 'number':
      return typeof v === 'number' && Number.isFinite(v);
    case 'integer':
      return Number.isInteger(v);
    default:
      throw new Error(`schema type "${type}"`);
  }
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v;
}
