import assert from 'node:assert/strict';
import { test } from 'node:test';
import { floatToBf16, floatToHalf, fromFloat32, halfToFloat, toFloat32 } from '../../lib/model/dtype.js';
import { Rng } from '../../lib/util/rng.js';

test('Rng: same seed same stream, different seeds differ, uniform and normal moments', () => {
  const a = new Rng(42);
  const b = new Rng(42);
  const c = new Rng(43);
  const sa = Array.from({ length: 8 }, () => a.nextU32());
  assert.deepEqual(
    sa,
    Array.from({ length: 8 }, () => b.nextU32()),
  );
  assert.notDeepEqual(
    sa,
    Array.from({ length: 8 }, () => c.nextU32()),
  );
  const r = new Rng(1);
  const n = 200_000;
  let su = 0;
  let sn = 0;
  let sn2 = 0;
  for (let i = 0; i < n; i++) {
    const u = r.uniform();
    assert.ok(u >= 0 && u < 1);
    su += u;
    const z = r.normal();
    sn += z;
    sn2 += z * z;
  }
  assert.ok(Math.abs(su / n - 0.5) < 0.005);
  assert.ok(Math.abs(sn / n) < 0.01);
  assert.ok(Math.abs(sn2 / n - 1) < 0.01);
});

test('half and bfloat16 conversions round to nearest even and round-trip exactly representable values', () => {
  assert.equal(floatToHalf(1), 0x3c00);
  assert.equal(floatToHalf(-2), 0xc000);
  assert.equal(floatToHalf(65504), 0x7bff);
  assert.equal(floatToHalf(1e6), 0x7c00);
  assert.equal(floatToHalf(2 ** -24), 0x0001);
  assert.equal(halfToFloat(0x0001), 2 ** -24);
  // 1 + 2^-11 is exactly halfway between 1 and 1 + 2^-10: ties to even (1).
  assert.equal(floatToHalf(1 + 2 ** -11), 0x3c00);
  assert.equal(floatToHalf(1 + 3 * 2 ** -11), 0x3c02);
  assert.equal(floatToBf16(1), 0x3f80);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even.
  assert.equal(floatToBf16(1 + 2 ** -8), 0x3f80);
  assert.equal(floatToBf16(1 + 3 * 2 ** -8), 0x3f82);
  for (const dtype of ['F16', 'BF16'] as const) {
    const exact = Float32Array.from([0, 1, -1.5, 0.25, 3, -1024]);
    assert.deepEqual(toFloat32(dtype, fromFloat32(dtype, exact)), exact);
  }
});
