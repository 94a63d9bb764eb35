// The name of the adapter a webgpu stage runs on, for start-up logs and Info/GetModelInfo. ONNX Runtime 1.30 does
// not report it (its WebGPU provider reads the adapter info but logs only the device id and backend type, even at
// verbose level, and the node binding exposes no device query), so this reads the Vulkan devices from
// `vulkaninfo --summary` and names the one Dawn's high-performance preference picks: a discrete GPU before an
// integrated one, then a virtual one, then a CPU device (lavapipe). A fallback: it names what Vulkan offers, not
// what ORT reports.
import { execFileSync } from 'node:child_process';

export interface VulkanDevice {
  name: string;
  /** e.g. PHYSICAL_DEVICE_TYPE_DISCRETE_GPU */
  type: string;
}

/** The devices of a `vulkaninfo --summary` output, in its order. */
export function parseVulkanSummary(text: string): VulkanDevice[] {
  const devices: VulkanDevice[] = [];
  let type = '';
  for (const line of text.split('\n')) {
    const m = /^\s*(deviceType|deviceName)\s*=\s*(.+?)\s*$/.exec(line);
    if (!m) continue;
    if (m[1] === 'deviceType') type = m[2];
    else devices.push({ name: m[2], type });
  }
  return devices;
}

const PREFERENCE = ['DISCRETE_GPU', 'INTEGRATED_GPU', 'VIRTUAL_GPU', 'CPU'];

/** The device Dawn's high-performance preference would take among these, or null when there is none. */
export function pickAdapter(devices: VulkanDevice[]): VulkanDevice | null {
  const rank = (d: VulkanDevice) => {
    const i = PREFERENCE.findIndex((p) => d.type.endsWith(p));
    return i < 0 ? PREFERENCE.length : i;
  };
  return devices.reduce<VulkanDevice | null>((best, d) => (best === null || rank(d) < rank(best) ? d : best), null);
}

/** The adapter's name for a device: '' on cpu; on webgpu the Vulkan device's name, or why it is unknown. */
export function adapterName(device: string): string {
  if (device !== 'webgpu') return '';
  let text: string;
  try {
    text = execFileSync('vulkaninfo', ['--summary'], { encoding: 'utf8', timeout: 20_000, stdio: 'pipe' });
  } catch {
    return 'unknown (vulkaninfo --summary failed)';
  }
  return pickAdapter(parseVulkanSummary(text))?.name ?? 'unknown (vulkaninfo lists no device)';
}
