// A renderer for the subset of kustomize that deploy/k8s uses, so CI can render every overlay with nothing but
// Node (no kubectl, no network): kustomization files and resources are JSON (YAML's subset, which kustomize and
// kubectl read as they read YAML), and the features are `resources` (files and directories), `components`,
// `patches` given as JSON 6902 patch files with a kind/name target, and `images` (newName/newTag). Anything else in
// a kustomization is refused by name, so a manifest cannot silently depend on a feature rendered differently here.
// `kubectl kustomize` renders the same objects (docs/deploy.md says how that was checked).
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

export type K8sObject = Record<string, unknown> & {
  apiVersion: string;
  kind: string;
  metadata: { name: string } & Record<string, unknown>;
};

const KUSTOMIZATION_FIELDS = new Set(['apiVersion', 'kind', 'resources', 'components', 'patches', 'images']);

interface Kustomization {
  kind?: string;
  resources?: string[];
  components?: string[];
  patches?: { path: string; target: { kind: string; name: string } }[];
  images?: { name: string; newName?: string; newTag?: string }[];
}

export class KustomizeError extends Error {}

/** Renders the kustomization in `dir`, like `kubectl kustomize dir`. */
export function render(dir: string): K8sObject[] {
  return renderDir(resolve(dir), 'Kustomization');
}

function readKustomization(dir: string): Kustomization {
  const path = join(dir, 'kustomization.yaml');
  if (!existsSync(path)) throw new KustomizeError(`${dir}: no kustomization.yaml`);
  const k = readJson(path) as Kustomization & Record<string, unknown>;
  for (const key of Object.keys(k))
    if (!KUSTOMIZATION_FIELDS.has(key)) throw new KustomizeError(`${path}: field "${key}" is not supported here`);
  return k;
}

function renderDir(dir: string, expectedKind: 'Kustomization' | 'Component', into?: K8sObject[]): K8sObject[] {
  const k = readKustomization(dir);
  if ((k.kind ?? 'Kustomization') !== expectedKind)
    throw new KustomizeError(`${dir}: expected kind ${expectedKind}, got ${k.kind}`);
  const objects: K8sObject[] = into ?? [];
  for (const r of k.resources ?? []) {
    const path = join(dir, r);
    if (existsSync(path) && statSync(path).isDirectory()) {
      for (const o of renderDir(path, 'Kustomization')) add(objects, o, path);
    } else {
      add(objects, readJson(path) as K8sObject, path);
    }
  }
  // Components are applied after this kustomization's resources, to the objects accumulated so far, as kustomize does.
  for (const c of k.components ?? []) renderDir(join(dir, c), 'Component', objects);
  for (const p of k.patches ?? []) {
    const ops = readJson(join(dir, p.path));
    if (!Array.isArray(ops)) throw new KustomizeError(`${join(dir, p.path)}: a JSON 6902 patch must be an array`);
    const targets = objects.filter((o) => o.kind === p.target.kind && o.metadata.name === p.target.name);
    if (targets.length === 0)
      throw new KustomizeError(`${dir}: patch ${p.path} matches no ${p.target.kind}/${p.target.name}`);
    for (const t of targets) {
      const patched = applyJsonPatch(t, ops as JsonPatchOp[], `${join(dir, p.path)}`) as K8sObject;
      objects[objects.indexOf(t)] = patched;
    }
  }
  for (const image of k.images ?? []) for (const o of objects) setImages(o, image);
  return objects;
}

function add(objects: K8sObject[], o: K8sObject, source: string): void {
  if (typeof o.kind !== 'string' || typeof o.apiVersion !== 'string' || typeof o.metadata?.name !== 'string')
    throw new KustomizeError(`${source}: not a Kubernetes object (apiVersion, kind, metadata.name)`);
  if (objects.some((x) => x.kind === o.kind && x.metadata.name === o.metadata.name))
    throw new KustomizeError(`${source}: ${o.kind}/${o.metadata.name} is defined twice`);
  objects.push(o);
}

function readJson(path: string): unknown {
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new KustomizeError(`${path}: ${(err as Error).message}`);
  }
}

export interface JsonPatchOp {
  op: 'add' | 'replace' | 'remove';
  path: string;
  value?: unknown;
}

/** RFC 6902 add / replace / remove on a copy of `doc`; a path that does not exist is an error, as in kustomize. */
export function applyJsonPatch(doc: unknown, ops: JsonPatchOp[], source = 'patch'): unknown {
  const root = structuredClone(doc);
  for (const op of ops) {
    if (!['add', 'replace', 'remove'].includes(op.op))
      throw new KustomizeError(`${source}: op "${op.op}" is not supported here`);
    const tokens = op.path
      .split('/')
      .slice(1)
      .map((t) => t.replaceAll('~1', '/').replaceAll('~0', '~'));
    if (!op.path.startsWith('/') || tokens.length === 0)
      throw new KustomizeError(`${source}: path "${op.path}" must start with / and name a member`);
    let parent: unknown = root;
    for (const t of tokens.slice(0, -1)) {
      parent = child(parent, t);
      if (parent === undefined) throw new KustomizeError(`${source}: ${op.op} ${op.path}: "${t}" does not exist`);
    }
    const last = tokens[tokens.length - 1];
    if (Array.isArray(parent)) {
      const index = last === '-' ? parent.length : Number(last);
      const bound = op.op === 'add' ? parent.length : parent.length - 1;
      if (!/^(\d+|-)$/.test(last) || index > bound || (last === '-' && op.op !== 'add'))
        throw new KustomizeError(`${source}: ${op.op} ${op.path}: index ${last} is out of range`);
      if (op.op === 'add') parent.splice(index, 0, structuredClone(op.value));
      else if (op.op === 'replace') parent[index] = structuredClone(op.value);
      else parent.splice(index, 1);
    } else if (parent !== null && typeof parent === 'object') {
      const obj = parent as Record<string, unknown>;
      if (op.op !== 'add' && !(last in obj))
        throw new KustomizeError(`${source}: ${op.op} ${op.path}: "${last}" does not exist`);
      if (op.op === 'remove') delete obj[last];
      else obj[last] = structuredClone(op.value);
    } else {
      throw new KustomizeError(`${source}: ${op.op} ${op.path}: the parent is not an object or array`);
    }
  }
  return root;
}

function child(node: unknown, token: string): unknown {
  if (Array.isArray(node)) return /^\d+$/.test(token) ? node[Number(token)] : undefined;
  if (node !== null && typeof node === 'object') return (node as Record<string, unknown>)[token];
  return undefined;
}

/** Every container and init container of every pod template in `o`, wherever it sits. */
export function podSpecs(o: K8sObject): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  const visit = (node: unknown) => {
    if (Array.isArray(node)) node.forEach(visit);
    else if (node !== null && typeof node === 'object') {
      const rec = node as Record<string, unknown>;
      if (Array.isArray(rec.containers)) out.push(rec);
      Object.values(rec).forEach(visit);
    }
  };
  visit(o.spec);
  return out;
}

function setImages(o: K8sObject, image: { name: string; newName?: string; newTag?: string }): void {
  for (const spec of podSpecs(o)) {
    for (const list of [spec.containers, spec.initContainers]) {
      if (!Array.isArray(list)) continue;
      for (const c of list as { image?: string }[]) {
        if (!c.image) continue;
        const m = /^([^:@]+(?::\d+\/[^:@]+)?)(?::([^@]+))?$/.exec(c.image);
        if (!m || m[1] !== image.name) continue;
        c.image = `${image.newName ?? image.name}:${image.newTag ?? m[2] ?? 'latest'}`;
      }
    }
  }
}
