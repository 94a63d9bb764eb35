// The worker thread behind VqCodec: owns the ORT sessions and the codebook, so session.run never blocks the
// caller's event loop. Messages: see codec.ts (WorkerRequest / WorkerReply).
import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import { createDeviceSession } from '../runtime/device-session.js';
import type { WorkerInit, WorkerReply, WorkerRequest } from './codec.js';
import { decoderGraphPath } from './decoder-graph.js';
import { encoderGraphPath } from './encoder-graph.js';
import { graphFormFor } from './graph-blocks.js';
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
      const form = graphFormFor(init.device);
      encPath = encoderGraphPath(w, init.cacheDir, log, form);
      decPath = decoderGraphPath(w, init.cacheDir, log, form);
      codebook = new Codebook(w.codebook(), w.config.codebookSize, w.config.embedDim);
    } finally {
      w.close();
    }
    // Both graphs take a new H×W per image and hold GB-sized intermediates. Measured on 2 cores (tiny VQ 720×720
    // encode + decode; real-shaped decoder 512×512):
    // - enableCpuMemArena false: ORT's arena keeps every freed intermediate reserved (tiny: 2.2 GB held after one
    //   encode + decode, 4.0 GB after two; real-shaped decoder: 4.9 GB held) and its rounding raises the peak.
    //   Without it each run returns its memory: tiny 165 MB held, flat over runs, peak 1.3 GB; real-shaped decoder
    //   0.8 GB held, peak 4.1 GB; latency unchanged (tiny 1.7 s encode, 3.4 s decode).
    // - enableMemPattern kept on (ORT's default): its per-shape plan makes one block per run, which without the
    //   arena is freed after the run; turning it off too was slower (2.6–3.2 s / 5.6–6.4 s) with a higher peak
    //   (1.6 GB tiny, 4.3 GB real-shaped).
    // - executionMode 'sequential': 'parallel' was about 2× slower and held 1.1 GB more (tiny).
    // - graphOptimizationLevel: 'all' for the encoder; 'extended' for the decoder, whose NCHWc layouts under 'all'
    //   peak at 7.8 GB instead of 4.1 GB (real-shaped, 512×512) for no gain in time.
    // On webgpu the same options apply to what ORT keeps on the CPU side; the graphs are built shape-free there
    // (graph-blocks.ts VqGraphForm), so every node runs on the device.
    const opts = (level: 'all' | 'extended'): ort.InferenceSession.SessionOptions => ({
      graphOptimizationLevel: level,
      executionMode: 'sequential',
      enableCpuMemArena: false,
      ...(init.threads > 0 ? { intraOpNumThreads: init.threads } : {}),
    });
    encoder = await createDeviceSession(encPath, init.device, opts('all'));
    decoder = await createDeviceSession(decPath, init.device, opts('extended'));
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
