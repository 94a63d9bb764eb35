// The upstream state_dict of an Emu3-VisionTokenizer for a given config: names and shapes in the module order of
// modeling_emu3visionvq.py (for the default config these are the 495 keys of test/fixtures/vq-param-names.txt).
import { levelChannels, temporalStages, type VqConfig } from './config.js';

export interface ParamSpec {
  name: string;
  shape: number[];
  kind:
    | 'conv'
    | 'bias'
    | 'norm_weight'
    | 'norm_bias'
    | 'running_mean'
    | 'running_var'
    | 'num_batches_tracked'
    | 'codebook';
}

export function vqParamSpecs(cfg: VqConfig): ParamSpec[] {
  const out: ParamSpec[] = [];
  const conv = (p: string, o: number, i: number, ...k: number[]) => {
    out.push(
      { name: `${p}.weight`, shape: [o, i, ...k], kind: 'conv' },
      { name: `${p}.bias`, shape: [o], kind: 'bias' },
    );
  };
  const groupNorm = (p: string, c: number) => {
    out.push(
      { name: `${p}.weight`, shape: [c], kind: 'norm_weight' },
      { name: `${p}.bias`, shape: [c], kind: 'norm_bias' },
    );
  };
  const spatialNorm = (p: string, c: number) => {
    groupNorm(`${p}.norm_layer`, c);
    conv(`${p}.conv_y`, c, cfg.embedDim, 1, 1);
    conv(`${p}.conv_b`, c, cfg.embedDim, 1, 1);
  };
  const resnet = (p: string, cin: number, cout: number, norm: (p: string, c: number) => void) => {
    norm(`${p}.norm1`, cin);
    norm(`${p}.norm2`, cout);
    conv(`${p}.conv1`, cout, cin, 3, 3);
    conv(`${p}.conv2`, cout, cout, 3, 3);
    if (cin !== cout) conv(`${p}.nin_shortcut`, cout, cin, 1, 1);
  };
  const attn = (p: string, c: number, norm: (p: string, c: number) => void) => {
    norm(`${p}.norm`, c);
    for (const x of ['q', 'k', 'v', 'proj_out']) conv(`${p}.${x}`, c, c, 1, 1);
  };
  const batchNorm = (p: string, c: number) => {
    groupNorm(p, c);
    out.push(
      { name: `${p}.running_mean`, shape: [c], kind: 'running_mean' },
      { name: `${p}.running_var`, shape: [c], kind: 'running_var' },
      { name: `${p}.num_batches_tracked`, shape: [], kind: 'num_batches_tracked' },
    );
  };
  const timeResStack = (p: string) => {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      batchNorm(`${p}.${i}.norm1`, cfg.zChannels);
      conv(`${p}.${i}.conv1.conv`, cfg.zChannels, cfg.zChannels, 3, 3, 3);
      batchNorm(`${p}.${i}.norm2`, cfg.zChannels);
      conv(`${p}.${i}.conv2.conv`, cfg.zChannels, cfg.zChannels, 3, 3, 3);
    }
  };
  const chans = levelChannels(cfg);
  const last = chans.length - 1;

  conv('encoder.conv_in', cfg.ch, cfg.inChannels, 3, 3);
  let cin = cfg.ch;
  for (let level = 0; level <= last; level++) {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      resnet(`encoder.down.${level}.block.${i}`, cin, chans[level], groupNorm);
      cin = chans[level];
      if (cfg.attnResolutions.includes(level)) attn(`encoder.down.${level}.attn.${i}`, cin, groupNorm);
    }
    if (level !== last) conv(`encoder.down.${level}.downsample.conv`, cin, cin, 3, 3);
  }
  resnet('encoder.mid.block_1', cin, cin, groupNorm);
  attn('encoder.mid.attn_1', cin, groupNorm);
  resnet('encoder.mid.block_2', cin, cin, groupNorm);
  groupNorm('encoder.norm_out', cin);
  conv('encoder.conv_out', cfg.zChannels, cin, 3, 3);
  for (let s = 0; s < temporalStages(cfg); s++)
    conv(`encoder.time_conv.${s}.conv.conv`, cfg.zChannels, cfg.zChannels, 4, 3, 3);
  timeResStack('encoder.time_res_stack');

  timeResStack('decoder.time_res_stack');
  for (let s = 0; s < temporalStages(cfg); s++)
    conv(`decoder.time_conv.${s}.conv.conv`, cfg.zChannels, cfg.zChannels, 3, 3, 3);
  cin = chans[last];
  conv('decoder.conv_in', cin, cfg.zChannels, 3, 3);
  resnet('decoder.mid.block_1', cin, cin, spatialNorm);
  attn('decoder.mid.attn_1', cin, spatialNorm);
  resnet('decoder.mid.block_2', cin, cin, spatialNorm);
  for (let level = last; level >= 0; level--) {
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      resnet(`decoder.up.${level}.block.${i}`, cin, chans[level], spatialNorm);
      cin = chans[level];
      if (cfg.attnResolutions.includes(level)) attn(`decoder.up.${level}.attn.${i}`, cin, spatialNorm);
    }
    if (level !== 0) conv(`decoder.up.${level}.upsample.conv`, cin, cin, 3, 3);
  }
  spatialNorm('decoder.norm_out', cin);
  conv('decoder.conv_out', cfg.outChannels, cin, 3, 3);

  out.push({ name: 'quantize.embedding.weight', shape: [cfg.codebookSize, cfg.embedDim], kind: 'codebook' });
  conv('quant_conv.conv', cfg.embedDim, cfg.zChannels, 3, 1, 1);
  conv('post_quant_conv.conv', cfg.zChannels, cfg.embedDim, 3, 1, 1);
  return out;
}
