// deploy/k8s rendered by the kustomize subset (test/deploy/kustomize.ts): every overlay renders, every object
// validates against the vendored schema (deploy/schemas, written from the documented APIs), and the rendered objects
// mean what docs/deploy.md says: hardened pods, the LeaderWorkerSet's shape and restart policy, probes on the right
// ports within the right windows, flags the commands know, every $(VAR) defined, and the NetworkPolicies' reach.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { test } from 'node:test';
import { command as coordinatorCommand } from '../../cli/coordinator.js';
import { command as makeTinyCommand } from '../../cli/make-tiny.js';
import { command as shardCommand } from '../../cli/shard.js';
import { command as vqCommand } from '../../cli/vq.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { execForm, parseDockerfile } from '../deploy/dockerfile.js';
import { type Schema, validate } from '../deploy/json-schema.js';
import { applyJsonPatch, type K8sObject, KustomizeError, render } from '../deploy/kustomize.js';
import {
  type Container,
  configMapsOf,
  containerArgv,
  containerEnv,
  type PodTemplate,
  podTemplates,
} from '../deploy/pods.js';

const repo = join(protoRoot(), '..');
const k8s = join(repo, 'deploy/k8s');
const schema = JSON.parse(readFileSync(join(repo, 'deploy/schemas/kubernetes.json'), 'utf8')) as Schema;
const runtime = parseDockerfile(readFileSync(join(repo, 'Dockerfile'), 'utf8')).at(-1)!;
const image = {
  entrypoint: execForm(runtime.instructions.find((i) => i.keyword === 'ENTRYPOINT')!),
  cmd: execForm(runtime.instructions.find((i) => i.keyword === 'CMD')!),
};
const COMMANDS = new Map([
  ['coordinator', coordinatorCommand.spec],
  ['shard', shardCommand.spec],
  ['vq', vqCommand.spec],
  ['make-tiny', makeTinyCommand.spec],
]);

/** gpu with every optional component, rendered from a kustomization in a temporary directory. */
function renderEverything(): K8sObject[] {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-kustomize-'));
  try {
    const rel = (p: string) => relative(dir, join(k8s, p));
    writeFileSync(
      join(dir, 'kustomization.yaml'),
      JSON.stringify({
        apiVersion: 'kustomize.config.k8s.io/v1beta1',
        kind: 'Kustomization',
        resources: [rel('overlays/gpu')],
        components: ['security', 'webgpu-device', 'podmonitor', 'otel'].map((c) => rel(`components/${c}`)),
      }),
    );
    return render(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const variants: [string, () => K8sObject[]][] = [
  ['cpu-tiny', () => render(join(k8s, 'overlays/cpu-tiny'))],
  ['gpu', () => render(join(k8s, 'overlays/gpu'))],
  ['gpu + every component', renderEverything],
];

const lwsEnv = (t: PodTemplate, w: number) => {
  // biome-ignore lint/suspicious/noExplicitAny: plain JSON
  const size = (t.workload.spec as any).leaderWorkerTemplate.size;
  return {
    LWS_LEADER_ADDRESS: 'emu3-0.emu3.default',
    LWS_GROUP_SIZE: String(size),
    LWS_WORKER_INDEX: String(w),
  };
};

/** The emu3 command a container runs and its flags (for lws-entry.sh: the role, with the flags it adds itself). */
function emu3Invocation(c: Container, env: Map<string, string>): { cmd: string; flags: string[] } {
  const argv = containerArgv(c, image, env);
  assert.deepEqual(argv.slice(0, 2), ['/usr/bin/tini', '--'], `${c.name}: tini is PID 1`);
  let rest: string[];
  if (argv[2] === '/app/deploy/lws-entry.sh') rest = argv.slice(3);
  else {
    assert.deepEqual(argv.slice(2, 4), ['node', '/app/bin/emu3.js'], `${c.name}: runs emu3`);
    rest = argv.slice(4);
  }
  const flags = rest.filter((a) => a.startsWith('--')).map((a) => a.slice(2).split('=')[0]);
  return { cmd: rest[0], flags };
}

for (const [name, renderIt] of variants) {
  test(`${name}: renders, and every object validates against deploy/schemas`, () => {
    const objects = renderIt();
    assert.ok(objects.length >= 10);
    const kinds = schema.kinds as Record<string, string>;
    for (const o of objects) {
      const ref = kinds[`${o.apiVersion} ${o.kind}`];
      assert.ok(ref, `${o.apiVersion} ${o.kind} has no schema`);
      assert.deepEqual(validate(o, { $ref: ref }, schema), [], `${o.kind}/${o.metadata.name}`);
    }
  });

  test(`${name}: pods are non-root, read-only, unprivileged; writable paths are volumes; models read-only`, () => {
    const objects = renderIt();
    const templates = podTemplates(objects);
    assert.equal(templates.length, 3, 'coordinator (leader), shard (worker), vq');
    for (const t of templates) {
      const pod = t.spec.securityContext as Record<string, unknown>;
      assert.equal(pod.runAsNonRoot, true, t.where);
      assert.deepEqual(pod.seccompProfile, { type: 'RuntimeDefault' }, t.where);
      assert.equal(t.spec.automountServiceAccountToken, false, t.where);
      for (const c of [...t.spec.containers, ...(t.spec.initContainers ?? [])]) {
        const sc = c.securityContext as Record<string, unknown>;
        assert.equal(sc.readOnlyRootFilesystem, true, `${t.where} ${c.name}`);
        assert.equal(sc.allowPrivilegeEscalation, false, `${t.where} ${c.name}`);
        assert.deepEqual(sc.capabilities, { drop: ['ALL'] }, `${t.where} ${c.name}`);
        assert.ok(c.resources?.requests?.cpu && c.resources?.limits?.memory, `${t.where} ${c.name}: resources`);
        const mounts = new Map((c.volumeMounts ?? []).map((m) => [m.mountPath, m]));
        for (const m of mounts.values())
          assert.ok(
            t.spec.volumes?.some((v) => v.name === m.name),
            `${t.where} ${c.name}: volume ${m.name}`,
          );
        assert.ok(mounts.has('/tmp'), `${t.where} ${c.name}: HOME (/tmp) is a volume`);
      }
      const main = t.spec.containers[0];
      const env = containerEnv(main, {
        configMaps: configMapsOf(objects),
        fields: { 'metadata.name': 'pod' },
        injected: t.role === 'pod' ? {} : lwsEnv(t, t.role === 'leader' ? 0 : 1),
      });
      const mounts = new Map((main.volumeMounts ?? []).map((m) => [m.mountPath, m]));
      assert.equal(mounts.get(env.get('EMU3_CACHE_DIR') as string)?.name, 'cache', `${t.where}: EMU3_CACHE_DIR`);
      assert.equal(mounts.get('/models')?.readOnly, true, `${t.where}: models read-only`);
      assert.ok((env.get('EMU3_MODEL_DIR') as string).startsWith('/models/'));
      assert.equal(env.get('OTEL_SERVICE_NAME'), `emu3-${t.labels['app.kubernetes.io/component']}`);
    }
  });

  test(`${name}: the pipeline is one LeaderWorkerSet: coordinator leader, shard workers, one group per node`, () => {
    const objects = renderIt();
    const lws = objects.filter((o) => o.kind === 'LeaderWorkerSet');
    assert.equal(lws.length, 1);
    // biome-ignore lint/suspicious/noExplicitAny: plain JSON
    const spec = lws[0].spec as any;
    // One dead shard is restarted alone; the coordinator prefills its requests again (docs/architecture.md).
    assert.equal(spec.leaderWorkerTemplate.restartPolicy, 'None');
    assert.ok(spec.leaderWorkerTemplate.size >= 2, 'size = stages + 1');
    assert.equal(
      (lws[0].metadata.annotations as Record<string, string>)['leaderworkerset.sigs.k8s.io/exclusive-topology'],
      'kubernetes.io/hostname',
      "a group's pods share one node, and a node holds one group",
    );
    const [leader, worker] = podTemplates(objects).filter((t) => t.workload === lws[0]);
    assert.equal(leader.labels['app.kubernetes.io/component'], 'coordinator');
    assert.equal(worker.labels['app.kubernetes.io/component'], 'shard');
    const gpus = (t: PodTemplate) => t.spec.containers[0].resources?.limits?.['nvidia.com/gpu'];
    if (name.startsWith('gpu')) {
      assert.equal(gpus(worker), '1');
      assert.equal(worker.spec.containers[0].resources?.requests?.['nvidia.com/gpu'], '1');
    } else assert.equal(gpus(worker), undefined);
    assert.equal(gpus(leader), undefined, 'the coordinator needs no GPU');
  });

  test(`${name}: every flag is one the command knows; every $(VAR) is defined`, () => {
    const objects = renderIt();
    for (const t of podTemplates(objects)) {
      for (const c of [...t.spec.containers, ...(t.spec.initContainers ?? [])]) {
        const env = containerEnv(c, {
          configMaps: configMapsOf(objects),
          fields: { 'metadata.name': 'pod' },
          injected: t.role === 'pod' ? {} : lwsEnv(t, t.role === 'leader' ? 0 : 1),
        });
        const argv = containerArgv(c, image, env);
        for (const a of [...argv, ...env.values()]) assert.doesNotMatch(a, /\$\(/, `${t.where} ${c.name}: ${a}`);
        const { cmd, flags } = emu3Invocation(c, env);
        const spec = COMMANDS.get(cmd);
        assert.ok(spec, `${t.where} ${c.name}: command ${cmd}`);
        for (const f of flags) assert.ok(f in spec.flags, `${t.where} ${c.name}: emu3 ${cmd} has no --${f}`);
      }
    }
  });

  test(`${name}: probes: startup and readiness are gRPC health on the service port, liveness TCP; windows fit`, () => {
    const objects = renderIt();
    const config = configMapsOf(objects).get('emu3-config') as Record<string, string>;
    for (const t of podTemplates(objects)) {
      const c = t.spec.containers[0];
      const grpcPort = c.ports?.find((p) => p.name === 'grpc')?.containerPort;
      assert.ok(grpcPort, t.where);
      // biome-ignore lint/suspicious/noExplicitAny: plain JSON
      const p = (k: 'startupProbe' | 'readinessProbe' | 'livenessProbe') => c[k] as any;
      assert.deepEqual(p('startupProbe').grpc, { port: grpcPort }, t.where);
      assert.deepEqual(p('readinessProbe').grpc, { port: grpcPort }, t.where);
      assert.deepEqual(p('livenessProbe').tcpSocket, { port: grpcPort }, t.where);
      const startupWindowMs = p('startupProbe').periodSeconds * p('startupProbe').failureThreshold * 1000;
      if (t.role === 'leader')
        assert.ok(
          startupWindowMs >= Number(config.EMU3_START_TIMEOUT_MS),
          `${t.where}: the startup probe (${startupWindowMs} ms) must not cut the wait for the shards short`,
        );
      assert.ok(startupWindowMs >= 300_000, `${t.where}: at least 5 min to build graphs`);
      const grace = t.spec.terminationGracePeriodSeconds as number;
      assert.ok(grace * 1000 > Number(config.EMU3_DRAIN_TIMEOUT_MS), `${t.where}: grace period covers the drain`);
      assert.equal(
        t.annotations['prometheus.io/port'],
        String(c.ports?.find((q) => q.name === 'metrics')?.containerPort),
      );
    }
  });

  test(`${name}: Services and PodDisruptionBudgets select the pods they mean`, () => {
    const objects = renderIt();
    const templates = podTemplates(objects);
    const selects = (sel: Record<string, string>, t: PodTemplate) =>
      Object.entries(sel).every(([k, v]) => t.labels[k] === v);
    const comp = (t: PodTemplate) => t.labels['app.kubernetes.io/component'];
    for (const s of objects.filter((o) => o.kind === 'Service')) {
      // biome-ignore lint/suspicious/noExplicitAny: plain JSON
      const spec = s.spec as any;
      const hit = templates.filter((t) => selects(spec.selector, t));
      assert.equal(hit.length, 1, `Service/${s.metadata.name}`);
      for (const port of spec.ports)
        assert.ok(
          hit[0].spec.containers[0].ports?.some((p) => p.name === port.targetPort),
          `${s.metadata.name}`,
        );
    }
    const api = objects.find((o) => o.kind === 'Service' && o.metadata.name === 'emu3-api');
    // biome-ignore lint/suspicious/noExplicitAny: plain JSON
    assert.equal((api?.spec as any).selector['app.kubernetes.io/component'], 'coordinator');
    // LeaderWorkerSet makes a headless Service named after itself for the pods' DNS names: no Service may take it.
    assert.ok(!objects.some((o) => o.kind === 'Service' && o.metadata.name === 'emu3'));
    const pdbs = objects.filter((o) => o.kind === 'PodDisruptionBudget');
    // biome-ignore lint/suspicious/noExplicitAny: plain JSON
    const pdbSelects = (pdb: K8sObject, t: PodTemplate) => matchSelector((pdb.spec as any).selector, t.labels);
    for (const t of templates)
      assert.equal(pdbs.filter((p) => pdbSelects(p, t)).length, 1, `${t.where}: exactly one PodDisruptionBudget`);
    assert.deepEqual(
      templates.filter((t) => pdbSelects(pdbs.find((p) => p.metadata.name === 'emu3-pipeline')!, t)).map(comp),
      ['coordinator', 'shard'],
    );
  });

  test(`${name}: NetworkPolicy: clients reach only the coordinator; only the coordinator reaches shards and vq`, () => {
    const objects = renderIt();
    const pods = new Map(podTemplates(objects).map((t) => [t.labels['app.kubernetes.io/component'], t.labels]));
    const outside = { labels: { app: 'client' }, ns: {} };
    const prometheus = { labels: { 'app.kubernetes.io/name': 'prometheus' }, ns: { team: 'monitoring' } };
    const from = (c: string) => ({ labels: pods.get(c) as Record<string, string>, ns: {} });
    const reach = (src: { labels: Record<string, string>; ns: Record<string, string> }, dst: string, port: number) =>
      allowed(objects, src, pods.get(dst) as Record<string, string>, port);
    assert.equal(reach(outside, 'coordinator', 50051), true);
    for (const [dst, port] of [
      ['coordinator', 50060],
      ['coordinator', 9464],
      ['shard', 50061],
      ['shard', 9464],
      ['vq', 50052],
      ['vq', 9464],
    ] as const)
      assert.equal(reach(outside, dst, port), false, `client → ${dst}:${port}`);
    assert.equal(reach(from('coordinator'), 'shard', 50061), true);
    assert.equal(reach(from('coordinator'), 'vq', 50052), true);
    assert.equal(reach(from('shard'), 'shard', 50061), true, 'a stage forwards to the next');
    assert.equal(reach(from('shard'), 'coordinator', 50060), true, "the last stage delivers to the coordinator's sink");
    assert.equal(reach(from('shard'), 'vq', 50052), false);
    assert.equal(reach(from('vq'), 'shard', 50061), false);
    assert.equal(reach(from('vq'), 'coordinator', 50060), false);
    for (const dst of ['coordinator', 'shard', 'vq']) assert.equal(reach(prometheus, dst, 9464), true, `scrape ${dst}`);
  });
}

function matchSelector(
  sel: {
    matchLabels?: Record<string, string>;
    matchExpressions?: { key: string; operator: string; values?: string[] }[];
  },
  labels: Record<string, string>,
): boolean {
  const ok = Object.entries(sel.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
  return (
    ok &&
    (sel.matchExpressions ?? []).every((e) => {
      const has = e.key in labels;
      switch (e.operator) {
        case 'In':
          return has && (e.values ?? []).includes(labels[e.key]);
        case 'NotIn':
          return !has || !(e.values ?? []).includes(labels[e.key]);
        case 'Exists':
          return has;
        case 'DoesNotExist':
          return !has;
        default:
          throw new Error(`operator ${e.operator}`);
      }
    })
  );
}

/** NetworkPolicy ingress semantics (same namespace unless a namespaceSelector says otherwise): isolated pods admit
 * only what some policy selecting them allows; a pod no policy selects admits everything. */
function allowed(
  objects: K8sObject[],
  src: { labels: Record<string, string>; ns: Record<string, string> },
  dstLabels: Record<string, string>,
  port: number,
): boolean {
  // biome-ignore lint/suspicious/noExplicitAny: plain JSON
  const policies = objects.filter((o) => o.kind === 'NetworkPolicy').map((o) => o.spec as any);
  const selecting = policies.filter(
    (p) => matchSelector(p.podSelector, dstLabels) && p.policyTypes.includes('Ingress'),
  );
  if (selecting.length === 0) return true;
  const sameNamespace = Object.keys(src.ns).length === 0;
  // biome-ignore lint/suspicious/noExplicitAny: plain JSON
  const peerMatches = (peer: any) => {
    if (peer.ipBlock) return false;
    const nsOk = peer.namespaceSelector ? matchSelector(peer.namespaceSelector, src.ns) : sameNamespace;
    const podOk = peer.podSelector ? matchSelector(peer.podSelector, src.labels) : true;
    return nsOk && podOk;
  };
  return selecting.some((p) =>
    (p.ingress ?? []).some(
      // biome-ignore lint/suspicious/noExplicitAny: plain JSON
      (rule: any) =>
        (!rule.from || rule.from.length === 0 || rule.from.some(peerMatches)) &&
        // biome-ignore lint/suspicious/noExplicitAny: plain JSON
        (!rule.ports || rule.ports.some((q: any) => q.port === port)),
    ),
  );
}

test('the validator refuses misspelt fields, wrong types, two probe handlers, and patterns it should', () => {
  const container = { $ref: '#/definitions/Container' };
  assert.deepEqual(validate({ name: 'a', image: 'x' }, container, schema), []);
  assert.match(
    validate({ name: 'a', image: 'x', imagePullPolicey: 'Always' }, container, schema).join(),
    /unknown field "imagePullPolicey"/,
  );
  assert.match(validate({ name: 'a' }, container, schema).join(), /"image" is required/);
  assert.match(validate({ name: 'A_b', image: 'x' }, container, schema).join(), /does not match/);
  assert.match(
    validate({ name: 'a', image: 'x', ports: [{ containerPort: '80' }] }, container, schema).join(),
    /expected integer/,
  );
  const probe = { $ref: '#/definitions/Probe' };
  assert.deepEqual(validate({ grpc: { port: 1 } }, probe, schema), []);
  assert.match(validate({ grpc: { port: 1 }, tcpSocket: { port: 1 } }, probe, schema).join(), /exactly one of oneOf/);
  const cm = { $ref: '#/definitions/ConfigMap' };
  assert.match(
    validate({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'c' }, data: { N: 64 } }, cm, schema).join(),
    /expected string/,
    'a ConfigMap value must be a string',
  );
  const pdb = { $ref: '#/definitions/PodDisruptionBudget' };
  const budget = { apiVersion: 'policy/v1', kind: 'PodDisruptionBudget', metadata: { name: 'p' } };
  assert.match(validate({ ...budget, spec: { minAvailable: 1, maxUnavailable: 1 } }, pdb, schema).join(), /must not/);
  const lws = { $ref: '#/definitions/LeaderWorkerSet' };
  const set = { apiVersion: 'leaderworkerset.x-k8s.io/v1', kind: 'LeaderWorkerSet', metadata: { name: 'l' } };
  const template = { spec: { containers: [{ name: 'a', image: 'x' }] } };
  assert.deepEqual(validate({ ...set, spec: { leaderWorkerTemplate: { workerTemplate: template } } }, lws, schema), []);
  assert.match(
    validate(
      { ...set, spec: { leaderWorkerTemplate: { workerTemplate: template, restartPolicy: 'Always' } } },
      lws,
      schema,
    ).join(),
    /must be one of/,
  );
});

test('JSON 6902 patches: add (incl. -), replace, remove; a missing path is an error, as in kustomize', () => {
  const doc = { a: { list: [1, 2] }, b: 'x' };
  assert.deepEqual(
    applyJsonPatch(doc, [
      { op: 'add', path: '/a/list/-', value: 3 },
      { op: 'add', path: '/a/list/0', value: 0 },
      { op: 'replace', path: '/b', value: 'y' },
      { op: 'remove', path: '/a/list/1' },
      { op: 'add', path: '/c~1d', value: true },
    ]),
    { a: { list: [0, 2, 3] }, b: 'y', 'c/d': true },
  );
  assert.deepEqual(doc, { a: { list: [1, 2] }, b: 'x' }, 'the input is not modified');
  assert.throws(() => applyJsonPatch(doc, [{ op: 'replace', path: '/nope', value: 1 }]), KustomizeError);
  assert.throws(() => applyJsonPatch(doc, [{ op: 'add', path: '/x/y', value: 1 }]), KustomizeError);
  assert.throws(() => applyJsonPatch(doc, [{ op: 'replace', path: '/a/list/2', value: 1 }]), KustomizeError);
});

test('the renderer refuses kustomize features it does not implement, and patches that match nothing', () => {
  const dir = mkdtempSync(join(tmpdir(), 'emu3-kustomize-'));
  try {
    const write = (k: object) => writeFileSync(join(dir, 'kustomization.yaml'), JSON.stringify(k));
    write({ resources: [], namePrefix: 'x-' });
    assert.throws(() => render(dir), /field "namePrefix" is not supported/);
    write({
      resources: [relative(dir, join(k8s, 'base'))],
      patches: [{ path: 'p.json', target: { kind: 'Service', name: 'nope' } }],
    });
    writeFileSync(join(dir, 'p.json'), '[]');
    assert.throws(() => render(dir), /matches no Service\/nope/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
