// An ORT session on a device (cpu, webgpu, cuda), shared by the stage worker and the vq codec worker: the device is
// the session's execution provider, and a device that cannot be opened is an error saying what to install
// (docs/gpu.md).
import ort from 'onnxruntime-node';
import type { Device } from '../onnx/stage-graph.js';

/** ORT's session on `device`; the options' executionProviders are replaced by the device. */
export async function createDeviceSession(
  onnxPath: string,
  device: Device,
  options: ort.InferenceSession.SessionOptions,
): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(onnxPath, { ...options, executionProviders: [device] });
  } catch (err) {
    throw deviceOpenError(device, err as Error);
  }
}

/** The error for a session that failed to open: unchanged on the CPU, else naming what the device needs. */
export function deviceOpenError(device: Device, err: Error): Error {
  if (device === 'cpu') return err;
  if (device === 'cuda')
    return new Error(
      `device cuda: onnxruntime could not open it (${err.message}). onnxruntime-node's CUDA provider ` +
        'libraries are not part of the npm package (its install script downloads them, which this project skips ' +
        'so that installs work offline): install them as docs/gpu.md says, or use --device webgpu',
    );
  return new Error(
    `device ${device}: onnxruntime could not open it (${err.message}). The webgpu device needs a Vulkan ` +
      "driver: the GPU vendor's (NVIDIA: a driver with Vulkan, and in containers NVIDIA_DRIVER_CAPABILITIES with " +
      '"graphics"), or Mesa\'s software device (Debian: mesa-vulkan-drivers ≥ 24 from bookworm-backports, with ' +
      'libvulkan1); `vulkaninfo --summary` should list a device (docs/gpu.md)',
  );
}
