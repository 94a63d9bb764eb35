// What the kubelet would run for each pod template of a rendered kustomization: the workloads' pod templates (a
// LeaderWorkerSet's leader and worker templates, a Deployment's template), and for a container its argv (command or
// the image ENTRYPOINT, then args) and environment (envFrom, then env, with `$(VAR)` references expanded as
// Kubernetes expands them).
import type { K8sObject } from './kustomize.js';

export interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: {
    name: string;
    value?: string;
    valueFrom?: Record<string, { name?: string; key?: string; fieldPath?: string }>;
  }[];
  envFrom?: { configMapRef?: { name: string }; secretRef?: { name: string } }[];
  ports?: { name?: string; containerPort: number }[];
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean }[];
  startupProbe?: Record<string, unknown>;
  readinessProbe?: Record<string, unknown>;
  livenessProbe?: Record<string, unknown>;
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  securityContext?: Record<string, unknown>;
}

export interface PodSpec {
  containers: Container[];
  initContainers?: Container[];
  volumes?: Record<string, unknown>[];
  securityContext?: Record<string, unknown>;
  [k: string]: unknown;
}

export interface PodTemplate {
  /** e.g. "LeaderWorkerSet/emu3 leader", "Deployment/emu3-vq". */
  where: string;
  workload: K8sObject;
  role: 'leader' | 'worker' | 'pod';
  labels: Record<string, string>;
  annotations: Record<string, string>;
  spec: PodSpec;
}

export function podTemplates(objects: K8sObject[]): PodTemplate[] {
  const out: PodTemplate[] = [];
  // biome-ignore lint/suspicious/noExplicitAny: walking plain JSON
  const take = (o: K8sObject, role: PodTemplate['role'], t: any, what: string) =>
    out.push({
      where: `${o.kind}/${o.metadata.name}${what}`,
      workload: o,
      role,
      labels: t?.metadata?.labels ?? {},
      annotations: t?.metadata?.annotations ?? {},
      spec: t.spec,
    });
  for (const o of objects) {
    // biome-ignore lint/suspicious/noExplicitAny: walking plain JSON
    const spec = o.spec as any;
    if (o.kind === 'LeaderWorkerSet') {
      if (spec.leaderWorkerTemplate.leaderTemplate)
        take(o, 'leader', spec.leaderWorkerTemplate.leaderTemplate, ' leader');
      take(o, 'worker', spec.leaderWorkerTemplate.workerTemplate, ' worker');
    } else if (['Deployment', 'StatefulSet', 'DaemonSet', 'Job'].includes(o.kind)) {
      take(o, 'pod', spec.template, '');
    }
  }
  return out;
}

/** Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` is a literal `$`, anything else stays as written. */
export function expand(s: string, env: ReadonlyMap<string, string>): string {
  return s.replace(/\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)/g, (m, name: string | undefined) => {
    if (m === '$$') return '$';
    return env.has(name as string) ? (env.get(name as string) as string) : m;
  });
}

export interface EnvSources {
  configMaps: ReadonlyMap<string, Record<string, string>>;
  /** Values of fieldRef paths, e.g. metadata.name. */
  fields: Record<string, string>;
  /** Variables the platform adds (a LeaderWorkerSet's LWS_*), below the container's own. */
  injected?: Record<string, string>;
}

/** The container's environment as the kubelet builds it (image ENV not included). Throws for a missing reference. */
export function containerEnv(c: Container, src: EnvSources): Map<string, string> {
  const env = new Map<string, string>(Object.entries(src.injected ?? {}));
  for (const from of c.envFrom ?? []) {
    if (from.secretRef) continue; // secrets are not part of what deploy/k8s renders
    const name = from.configMapRef?.name as string;
    const data = src.configMaps.get(name);
    if (!data) throw new Error(`${c.name}: envFrom configMap ${name} is not rendered`);
    for (const [k, v] of Object.entries(data)) env.set(k, v);
  }
  for (const e of c.env ?? []) {
    if (e.value !== undefined) env.set(e.name, expand(e.value, env));
    else if (e.valueFrom?.configMapKeyRef) {
      const ref = e.valueFrom.configMapKeyRef;
      const v = src.configMaps.get(ref.name as string)?.[ref.key as string];
      if (v === undefined) throw new Error(`${c.name}: env ${e.name}: configMap ${ref.name} has no key ${ref.key}`);
      env.set(e.name, v);
    } else if (e.valueFrom?.fieldRef) {
      const v = src.fields[e.valueFrom.fieldRef.fieldPath as string];
      if (v === undefined) throw new Error(`${c.name}: env ${e.name}: no value for ${e.valueFrom.fieldRef.fieldPath}`);
      env.set(e.name, v);
    } else throw new Error(`${c.name}: env ${e.name} has neither value nor a known valueFrom`);
  }
  return env;
}

/** argv: `command` (else the image ENTRYPOINT), then `args` (else, only without `command`, the image CMD). */
export function containerArgv(
  c: Container,
  image: { entrypoint: string[]; cmd: string[] },
  env: ReadonlyMap<string, string>,
): string[] {
  const command = c.command ?? image.entrypoint;
  const args = c.args ?? (c.command ? [] : image.cmd);
  return [...command, ...args].map((a) => expand(a, env));
}

export function configMapsOf(objects: K8sObject[]): Map<string, Record<string, string>> {
  return new Map(
    objects
      .filter((o) => o.kind === 'ConfigMap')
      .map((o) => [o.metadata.name, (o.data ?? {}) as Record<string, string>]),
  );
}
