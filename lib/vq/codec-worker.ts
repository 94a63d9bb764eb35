// The worker thread behind VqCodec: owns the ORT sessions and the codebook, so session.run never blocks the
// caller's event loop. Messages: see codec.ts (WorkerRequest / WorkerReply).
import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import type { WorkerInit, WorkerReply, WorkerRequest } from './codec.js';
import { decoderGraphPath } from './decoder-graph.js';
import { encoderGraphPath } from './encoder-graph.js';
import { Codebook } from './quantize.js';
import { VqWeights } from './weights.js';

async function main(): Promise<void> {
  const port = parentPort;
  if (!port) throw new Error('codec-worker must run in a worker thread');
  const init = workerData as WorkerInit;
  const log = (msg: string) => port.postMessage({ type: 'log', msg } satisfies WorkerReply);
  let encoder: ort.InferenceSession;
  let decoder: ort.InferenceSession;
  let codebook: Codebook;
  try {
    const w = VqWeights.open(init.vqDir);
    let encPath: string;
    let decPath: string;
    try {
      encPath = encoderGraphPath(w, init.cacheDir, log);
      decPath = decoderGraphPath(w, init.cacheDir, log);
      codebook = new Codebook(w.codebook(), w.config.codebookSize, w.config.embedDim);
    } finally {
      w.close();
    }
    const opts = (level: 'all' | 'extended'): ort.InferenceSession.SessionOptions => ({
      graphOptimizationLevel: level,
      executionMode: 'sequential',
      ...(init.threads > 0 ? { intraOpNumThreads: init.threads } : {}),
    });
    encoder = await ort.InferenceSession.create(encPath, opts('all'));
    // Measured on the real-shaped decoder at 512×512: 'all' (NCHWc layouts) peaks at 8.3 GB, 'extended' at 4.9 GB
    // for about the same time; at 720×720 and beyond that difference decides whether it fits.
    decoder = await ort.InferenceSession.create(decPath, opts('extended'));
  } catch (e) {
    port.postMessage({ type: 'ready', error: (e as Error).message } satisfies WorkerReply);
    return;
  }
  port.postMessage({ type: 'ready' } satisfies WorkerReply);

  port.on('message', async (req: WorkerRequest) => {
    try {
      if (req.type === 'encode') {
        const input = new ort.Tensor('float32', req.pixels, [1, 3, req.height, req.width]);
        const out = await encoder.run({ pixels: input });
        const latents = out.latents.data as Float32Array;
        const codes = codebook.quantize(latents);
        port.postMessage({ type: 'encoded', id: req.id, codes } satisfies WorkerReply, [codes.buffer as ArrayBuffer]);
      } else {
        const quant = codebook.lookupChannelsFirst(req.codes);
        const out = await decoder.run({ quant: new ort.Tensor('float32', quant, [1, codebook.dim, req.h, req.w]) });
        const pixels = out.pixels.data as Float32Array;
        port.postMessage({ type: 'decoded', id: req.id, pixels } satisfies WorkerReply, [pixels.buffer as ArrayBuffer]);
      }
    } catch (e) {
      port.postMessage({ type: 'failed', id: req.id, error: (e as Error).message } satisfies WorkerReply);
    }
  });
}

void main();
