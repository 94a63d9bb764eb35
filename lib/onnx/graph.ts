// Builds an ONNX model in JS and writes it as `<name>.onnx` + one external weight file `<name>.weights`, so that
// ORT loads it by path (docs/architecture.md, "Stage graphs and devices": in-memory external data is copied, embedded weights triple peak memory).
// Weights are appended to the weight file as they are added, so building never holds all of them at once.
import { closeSync, openSync, renameSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { ProtoWriter } from './protobuf.js';

export type ElemType = 'float' | 'uint8' | 'int8' | 'int32' | 'int64' | 'bool' | 'float16' | 'double' | 'bfloat16';

const elemTypeCode: Record<ElemType, number> = {
  float: 1,
  uint8: 2,
  int8: 3,
  int32: 6,
  int64: 7,
  bool: 9,
  float16: 10,
  double: 11,
  bfloat16: 16,
};

/** A dimension: a fixed size or a symbolic name. */
export type Dim = number | string;

export type AttrValue =
  | number
  | string
  | number[]
  | string[]
  | { floats: number[] }
  | { tensor: InlineTensor }
  | { float: number }
  | { graph: Subgraph };

/** A graph attribute (an If branch): nodes that may read any name of the enclosing graph, and its outputs. */
export interface Subgraph {
  name: string;
  nodes: NodeDef[];
  outputs: ValueInfo[];
}

interface InlineTensor {
  type: ElemType;
  dims: number[];
  raw: Uint8Array;
}

export interface NodeDef {
  opType: string;
  inputs: string[];
  outputs: string[];
  name: string;
  domain: string;
  attrs: Record<string, AttrValue>;
}

interface InitDef {
  name: string;
  type: ElemType;
  dims: number[];
  raw?: Uint8Array;
  external?: { offset: number; length: number };
}

export interface ValueInfo {
  name: string;
  type: ElemType;
  dims: Dim[];
}

/** Weights at least this large go to the external file; smaller constants are inlined in the graph. */
const EXTERNAL_MIN_BYTES = 1024;
const EXTERNAL_ALIGN = 4096;

export class GraphBuilder {
  private nodes: NodeDef[] = [];
  private inits: InitDef[] = [];
  private inputs: ValueInfo[] = [];
  private outputs: ValueInfo[] = [];
  private names = new Set<string>();
  private opsets = new Map<string, number>([['', 21]]);
  private weightsFd: number;
  private weightsOffset = 0;
  private readonly weightsTmp: string;
  /** Bytes written to the external weight file so far. */
  get weightBytes(): number {
    return this.weightsOffset;
  }

  constructor(
    readonly dir: string,
    readonly modelName: string,
    opts: { opset?: number; msOpset?: number } = {},
  ) {
    this.opsets.set('', opts.opset ?? 21);
    this.opsets.set('com.microsoft', opts.msOpset ?? 1);
    this.weightsTmp = join(dir, `${modelName}.weights.tmp`);
    this.weightsFd = openSync(this.weightsTmp, 'w');
  }

  /** Declares use of a domain at an opset version (e.g. onnx opset 23 for Attention). */
  useOpset(domain: string, version: number): void {
    this.opsets.set(domain, Math.max(this.opsets.get(domain) ?? 0, version));
  }

  /** A fresh unique tensor name starting with `base`. */
  uniq(base: string): string {
    let name = base;
    for (let i = 1; this.names.has(name); i++) name = `${base}_${i}`;
    this.names.add(name);
    return name;
  }

  input(name: string, type: ElemType, dims: Dim[]): string {
    this.names.add(name);
    this.inputs.push({ name, type, dims });
    return name;
  }

  output(name: string, type: ElemType, dims: Dim[]): string {
    this.outputs.push({ name, type, dims });
    return name;
  }

  /** An initializer; large ones are appended to the external weight file now (the data can be dropped after). */
  weight(name: string, type: ElemType, dims: number[], data: ArrayBufferView): string {
    const unique = this.uniq(name);
    const raw = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (raw.byteLength < EXTERNAL_MIN_BYTES) {
      this.inits.push({ name: unique, type, dims, raw: raw.slice() });
      return unique;
    }
    const pad = (EXTERNAL_ALIGN - (this.weightsOffset % EXTERNAL_ALIGN)) % EXTERNAL_ALIGN;
    if (pad) writeSync(this.weightsFd, new Uint8Array(pad));
    this.weightsOffset += pad;
    let done = 0;
    while (done < raw.byteLength) done += writeSync(this.weightsFd, raw, done, raw.byteLength - done);
    this.inits.push({ name: unique, type, dims, external: { offset: this.weightsOffset, length: raw.byteLength } });
    this.weightsOffset += raw.byteLength;
    return unique;
  }

  /** Small constants, inlined. */
  constInt64(name: string, values: number[], dims: number[] = [values.length]): string {
    return this.weight(name, 'int64', dims, BigInt64Array.from(values.map((v) => BigInt(v))));
  }

  constFloat(name: string, values: number[], dims: number[] = [values.length]): string {
    return this.weight(name, 'float', dims, Float32Array.from(values));
  }

  constInt32(name: string, values: number[], dims: number[] = [values.length]): string {
    return this.weight(name, 'int32', dims, Int32Array.from(values));
  }

  /**
   * Adds a node. `outputs` are names (made unique); returns the output names. Node names default to the first
   * output's name, so an ORT error message points at the part of the model that failed.
   */
  node(
    opType: string,
    inputs: string[],
    outputs: string[] | number = 1,
    attrs: Record<string, AttrValue> = {},
    opts: { domain?: string; name?: string } = {},
  ): string[] {
    const outs = typeof outputs === 'number' ? Array.from({ length: outputs }, (_, i) => `${opType}_${i}`) : outputs;
    const uniqueOuts = outs.map((o) => (o === '' ? '' : this.uniq(o)));
    this.nodes.push({
      opType,
      inputs,
      outputs: uniqueOuts,
      name: opts.name ?? uniqueOuts[0] ?? opType,
      domain: opts.domain ?? '',
      attrs,
    });
    return uniqueOuts;
  }

  /**
   * Adds the nodes `build` adds to `into` instead of this graph (the nodes of an If branch, see Subgraph); weights it
   * adds stay initializers of this graph, which a subgraph reads from the outer scope.
   */
  withNodes<T>(into: NodeDef[], build: () => T): T {
    const outer = this.nodes;
    this.nodes = into;
    try {
      return build();
    } finally {
      this.nodes = outer;
    }
  }

  /** Shorthand for a single-output node. */
  op(opType: string, inputs: string[], outName: string, attrs: Record<string, AttrValue> = {}, domain = ''): string {
    return this.node(opType, inputs, [outName], attrs, { domain })[0];
  }

  /** Writes `<modelName>.onnx` and `<modelName>.weights` into the directory; returns the .onnx path. */
  save(): string {
    closeSync(this.weightsFd);
    const weightsFile = `${this.modelName}.weights`;
    renameSync(this.weightsTmp, join(this.dir, weightsFile));
    const model = new ProtoWriter().int(1, 10).string(2, 'emu3-serve').string(3, '0.1.0');
    for (const [domain, version] of this.opsets) model.message(8, new ProtoWriter().string(1, domain).int(2, version));
    model.message(7, this.encodeGraph(weightsFile));
    const onnxPath = join(this.dir, `${this.modelName}.onnx`);
    const tmp = `${onnxPath}.tmp`;
    writeFileSync(tmp, model.finish());
    renameSync(tmp, onnxPath);
    return onnxPath;
  }

  private encodeGraph(weightsFile: string): ProtoWriter {
    const g = new ProtoWriter();
    for (const n of this.nodes) g.message(1, encodeNode(n));
    g.string(2, basename(this.modelName));
    for (const t of this.inits) g.message(5, encodeInit(t, weightsFile));
    for (const v of this.inputs) g.message(11, encodeValueInfo(v));
    for (const v of this.outputs) g.message(12, encodeValueInfo(v));
    return g;
  }
}

function encodeNode(n: NodeDef): ProtoWriter {
  const w = new ProtoWriter();
  for (const i of n.inputs) w.string(1, i);
  for (const o of n.outputs) w.string(2, o);
  w.string(3, n.name);
  w.string(4, n.opType);
  for (const [name, v] of Object.entries(n.attrs)) w.message(5, encodeAttr(name, v));
  if (n.domain) w.string(7, n.domain);
  return w;
}

function encodeAttr(name: string, v: AttrValue): ProtoWriter {
  const a = new ProtoWriter().string(1, name);
  if (typeof v === 'number') {
    if (!Number.isInteger(v)) throw new Error(`attribute ${name}: use { float: x } for float attributes`);
    return a.int(3, v).int(20, 2);
  }
  if (typeof v === 'string') return a.string(4, v).int(20, 3);
  if (Array.isArray(v)) {
    if (v.length > 0 && typeof v[0] === 'string') {
      for (const s of v as string[]) a.string(9, s);
      return a.int(20, 8);
    }
    return a.packedInts(8, v as number[]).int(20, 7);
  }
  if ('float' in v) return a.float(2, v.float).int(20, 1);
  if ('floats' in v) return a.packedFloats(7, v.floats).int(20, 6);
  if ('graph' in v) {
    const g = new ProtoWriter();
    for (const n of v.graph.nodes) g.message(1, encodeNode(n));
    g.string(2, v.graph.name);
    for (const o of v.graph.outputs) g.message(12, encodeValueInfo(o));
    return a.message(6, g).int(20, 5);
  }
  const t = new ProtoWriter().packedInts(1, v.tensor.dims).int(2, elemTypeCode[v.tensor.type]).bytes(9, v.tensor.raw);
  return a.message(5, t).int(20, 4);
}

function encodeInit(t: InitDef, weightsFile: string): ProtoWriter {
  const w = new ProtoWriter();
  if (t.dims.length > 0) w.packedInts(1, t.dims);
  w.int(2, elemTypeCode[t.type]);
  w.string(8, t.name);
  if (t.raw) {
    w.bytes(9, t.raw);
  } else if (t.external) {
    const entry = (k: string, val: string) => new ProtoWriter().string(1, k).string(2, val);
    w.message(13, entry('location', weightsFile));
    w.message(13, entry('offset', String(t.external.offset)));
    w.message(13, entry('length', String(t.external.length)));
    w.int(14, 1);
  }
  return w;
}

function encodeValueInfo(v: ValueInfo): ProtoWriter {
  const shape = new ProtoWriter();
  for (const d of v.dims)
    shape.message(1, typeof d === 'number' ? new ProtoWriter().int(1, d) : new ProtoWriter().string(2, d));
  const tensorType = new ProtoWriter().int(1, elemTypeCode[v.type]).message(2, shape);
  return new ProtoWriter().string(1, v.name).message(2, new ProtoWriter().message(1, tensorType));
}
