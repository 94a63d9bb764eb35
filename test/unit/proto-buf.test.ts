// The whole proto/ tree compiles as one buf module and passes `buf lint` with the repository's buf.yaml (the rules and
// their justified exceptions live there). One module means every message name is unique per package, which
// proto-loader alone only notices when the colliding files happen to be loaded together.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const repoRoot = join(fileURLToPath(import.meta.url), '../../../..');
const bufCli = join(createRequire(import.meta.url).resolve('@bufbuild/buf/package.json'), '../bin/buf');

async function buf(...args: string[]): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [bufCli, ...args], {
      cwd: repoRoot,
      timeout: 60_000,
    });
    return { code: 0, output: stdout + stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string; message: string };
    return { code: typeof e.code === 'number' ? e.code : -1, output: `${e.stdout ?? ''}${e.stderr ?? ''}${e.message}` };
  }
}

describe('proto tree (buf)', { timeout: 120_000 }, () => {
  it('builds as one module', async () => {
    const r = await buf('build');
    assert.equal(r.code, 0, r.output);
  });

  it('passes buf lint', async () => {
    const r = await buf('lint');
    assert.equal(r.code, 0, r.output);
  });
});
