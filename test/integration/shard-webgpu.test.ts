// A real `emu3 shard --device webgpu` process over gRPC (lavapipe without a GPU, as stage-webgpu.test.ts): its Info
// names the device, the default precision there (fp16), the KV capacity of a half device arena, and the adapter,
// which must be the Vulkan device that `vulkaninfo --summary` lists (parsed here independently of the shard), as the
// start-up log says too.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { createClient, unaryCall } from '../../lib/rpc/client.js';
import { protoRoot } from '../../lib/rpc/proto.js';
import { SHARD_PROTO, SHARD_SERVICE, type ShardInfo } from '../../lib/rpc/shard-wire.js';
import { type SpawnedService, spawnService } from './spawn-service.js';

const work = mkdtempSync(join(tmpdir(), 'emu3-shard-webgpu-it-'));
const modelDir = join(work, 'tiny');
let shard: SpawnedService | undefined;

before(() => {
  process.env.XDG_RUNTIME_DIR ??= mkdtempSync(join(tmpdir(), 'xdg-'));
  // emu3-tiny with its tokenizer files (a last stage reads the visual ids from them)
  execFileSync(process.execPath, ['bin/emu3.js', 'make-tiny', '--out', modelDir], { cwd: dirname(protoRoot()) });
});
after(() => {
  shard?.proc.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
});

/** The deviceName lines of `vulkaninfo --summary`, in order, with their types. */
function vulkanDevices(): { name: string; type: string }[] {
  const text = execFileSync('vulkaninfo', ['--summary'], { encoding: 'utf8' });
  const types = [...text.matchAll(/deviceType\s*=\s*(\S+)/g)].map((m) => m[1]);
  const names = [...text.matchAll(/deviceName\s*=\s*(.+?)\s*$/gm)].map((m) => m[1]);
  return names.map((name, i) => ({ name, type: types[i] }));
}

test('emu3 shard --device webgpu: Info reports webgpu, fp16 and the Vulkan adapter', { timeout: 180_000 }, async () => {
  shard = await spawnService(
    [
      'shard',
      '--model',
      modelDir,
      '--layers',
      '0-4',
      '--listen',
      '127.0.0.1:0',
      '--allow-reply-to',
      '127.0.0.1:1',
      '--device',
      'webgpu',
      '--max-slots',
      '2',
      '--slot-tokens',
      '64',
      '--cache-dir',
      join(work, 'cache'),
    ],
    'webgpu shard',
    150_000,
  );
  const client = createClient(SHARD_PROTO, SHARD_SERVICE, shard.address);
  try {
    const info = await unaryCall<object, ShardInfo>(client, 'Info', {}, { deadlineMs: 10_000 });
    assert.equal(info.device, 'webgpu');
    assert.equal(info.precision, 'fp16');
    // 4 layers × 2 (K, V) × 2 kv heads × 16 head dim × 2 bytes (half)
    assert.equal(info.kv_bytes_per_token, 4 * 2 * 2 * 16 * 2);
    const devices = vulkanDevices();
    const rank = (t: string) =>
      ['DISCRETE_GPU', 'INTEGRATED_GPU', 'VIRTUAL_GPU', 'CPU'].findIndex((k) => t.endsWith(k)) + 1 || 9;
    const want = [...devices].sort((a, b) => rank(a.type) - rank(b.type))[0]?.name;
    assert.ok(want, 'vulkaninfo lists no device');
    assert.equal(info.adapter, want);
    const ready = shard.logs.find((l) => l.msg === 'stage ready');
    assert.equal(ready?.adapter, want);
    assert.equal(ready?.kv, 'device');
  } finally {
    client.close();
  }
});
