// The webgpu adapter name from `vulkaninfo --summary` (lib/runtime/gpu-adapter.ts), on stated summaries.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseVulkanSummary, pickAdapter } from '../../lib/runtime/gpu-adapter.js';

const summary = (devices: [string, string][]) =>
  [
    'Devices:',
    '========',
    ...devices.flatMap(([type, name], i) => [
      `GPU${i}:`,
      '\tapiVersion         = 1.4.305',
      `\tdeviceType         = PHYSICAL_DEVICE_TYPE_${type}`,
      `\tdeviceName         = ${name}`,
      '\tdriverName         = x',
    ]),
  ].join('\n');

test('vulkaninfo --summary: every device with its type, in order', () => {
  const devices = parseVulkanSummary(
    summary([
      ['CPU', 'llvmpipe (LLVM 15.0.6, 256 bits)'],
      ['DISCRETE_GPU', 'NVIDIA H200'],
    ]),
  );
  assert.deepEqual(devices, [
    { name: 'llvmpipe (LLVM 15.0.6, 256 bits)', type: 'PHYSICAL_DEVICE_TYPE_CPU' },
    { name: 'NVIDIA H200', type: 'PHYSICAL_DEVICE_TYPE_DISCRETE_GPU' },
  ]);
});

test('the adapter is the discrete GPU before an integrated one before lavapipe; none without devices', () => {
  const pick = (devices: [string, string][]) => pickAdapter(parseVulkanSummary(summary(devices)))?.name ?? null;
  assert.equal(
    pick([
      ['CPU', 'llvmpipe'],
      ['INTEGRATED_GPU', 'Intel UHD'],
      ['DISCRETE_GPU', 'NVIDIA H200'],
    ]),
    'NVIDIA H200',
  );
  assert.equal(
    pick([
      ['CPU', 'llvmpipe'],
      ['INTEGRATED_GPU', 'Intel UHD'],
    ]),
    'Intel UHD',
  );
  assert.equal(pick([['CPU', 'llvmpipe (LLVM 15.0.6, 256 bits)']]), 'llvmpipe (LLVM 15.0.6, 256 bits)');
  assert.equal(pick([]), null);
});
