// Child process of vq-webgpu.test.ts: opens one VQ graph (shape-free form) on the webgpu device with ORT's verbose
// log on, so its node placement lines ("Node(s) placed on [EP]. Number of nodes: N") reach this process's output,
// where the parent reads them. ORT's log cannot be captured inside the process that writes it.
//   node vq-placement-child.js VQ_DIR CACHE_DIR encoder|decoder
import { createDeviceSession } from '../../lib/runtime/device-session.js';
import { decoderGraphPath } from '../../lib/vq/decoder-graph.js';
import { encoderGraphPath } from '../../lib/vq/encoder-graph.js';
import { graphFormFor } from '../../lib/vq/graph-blocks.js';
import { VqWeights } from '../../lib/vq/weights.js';

const [vqDir, cacheDir, which] = process.argv.slice(2);
const w = VqWeights.open(vqDir);
const form = graphFormFor('webgpu');
const path =
  which === 'encoder' ? encoderGraphPath(w, cacheDir, undefined, form) : decoderGraphPath(w, cacheDir, undefined, form);
w.close();
const session = await createDeviceSession(path, 'webgpu', {
  graphOptimizationLevel: which === 'encoder' ? 'all' : 'extended',
  logSeverityLevel: 0,
  logVerbosityLevel: 0,
});
await session.release();
