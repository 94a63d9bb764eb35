// Safetensors files, read one tensor at a time (a file is never read whole) and written tensor by tensor.
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
// "__metadata__": {string: string}}, then the data; offsets are relative to the end of the header.
import { closeSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { bytesPerElement, type FloatDtype, fromFloat32, isFloatDtype, toFloat32 } from './dtype.js';
import { CheckpointError } from './errors.js';

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute byte offsets in the file. */
  begin: number;
  end: number;
  file: string;
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export class SafetensorsFile {
  /** Bytes per read() call: one call is limited to 2 GiB, an fp32 embedding is 3 GB. (Settable for tests.) */
  static readChunkBytes = 1 << 30;
  private fd: number | null;

  private constructor(
    readonly path: string,
    fd: number,
    readonly fileSize: number,
    readonly headerBytes: Buffer,
    readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Record<string, string>,
  ) {
    this.fd = fd;
  }

  /** Opens a file and validates its header: JSON, dtypes, offsets inside the file, sizes equal dtype × shape. */
  static open(path: string): SafetensorsFile {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (e) {
      throw new CheckpointError(`${path}: cannot open (${(e as NodeJS.ErrnoException).code ?? e})`);
    }
    try {
      const size = fstatSync(fd).size;
      if (size < 8) throw new CheckpointError(`${path}: not a safetensors file (only ${size} bytes)`);
      const lenBuf = Buffer.alloc(8);
      readSync(fd, lenBuf, 0, 8, 0);
      const headerLen = Number(lenBuf.readBigUInt64LE(0));
      if (headerLen <= 0 || headerLen > MAX_HEADER_BYTES || 8 + headerLen > size) {
        throw new CheckpointError(
          `${path}: corrupt safetensors header (header length ${headerLen}, file ${size} bytes)`,
        );
      }
      const header = Buffer.alloc(headerLen);
      readSync(fd, header, 0, headerLen, 8);
      let json: Record<string, unknown>;
      try {
        json = JSON.parse(header.toString('utf8'));
      } catch (e) {
        throw new CheckpointError(`${path}: corrupt safetensors header (invalid JSON: ${(e as Error).message})`);
      }
      if (typeof json !== 'object' || json === null || Array.isArray(json)) {
        throw new CheckpointError(`${path}: corrupt safetensors header (not a JSON object)`);
      }
      const dataStart = 8 + headerLen;
      const tensors = new Map<string, TensorInfo>();
      let metadata: Record<string, string> = {};
      for (const [name, raw] of Object.entries(json)) {
        if (name === '__metadata__') {
          metadata = (raw ?? {}) as Record<string, string>;
          continue;
        }
        const t = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
        const where = `${path}: tensor ${name}`;
        if (typeof t?.dtype !== 'string' || !Object.hasOwn(bytesPerElement, t.dtype)) {
          throw new CheckpointError(`${where}: unknown dtype ${JSON.stringify(t?.dtype)}`);
        }
        if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0)) {
          throw new CheckpointError(`${where}: invalid shape ${JSON.stringify(t.shape)}`);
        }
        const off = t.data_offsets;
        if (
          !Array.isArray(off) ||
          off.length !== 2 ||
          !off.every((o) => Number.isInteger(o) && o >= 0) ||
          off[1] < off[0]
        ) {
          throw new CheckpointError(`${where}: invalid data_offsets ${JSON.stringify(off)}`);
        }
        const elements = (t.shape as number[]).reduce((a, b) => a * b, 1);
        const expected = elements * bytesPerElement[t.dtype];
        if (off[1] - off[0] !== expected) {
          throw new CheckpointError(
            `${where}: data_offsets span ${off[1] - off[0]} bytes but ${t.dtype} ${JSON.stringify(t.shape)} needs ${expected}`,
          );
        }
        const begin = dataStart + off[0];
        const end = dataStart + off[1];
        if (end > size) {
          throw new CheckpointError(
            `${where}: data ends at byte ${end} but the file has ${size} bytes (truncated file?)`,
          );
        }
        tensors.set(name, { name, dtype: t.dtype, shape: t.shape as number[], begin, end, file: path });
      }
      return new SafetensorsFile(path, fd, size, header, tensors, metadata);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new CheckpointError(`${this.path}: tensor ${name} is missing`);
    return t;
  }

  /** The tensor's raw little-endian bytes, read with positioned reads of its byte range only. */
  readRaw(name: string): Buffer {
    const t = this.info(name);
    const buf = Buffer.allocUnsafe(t.end - t.begin);
    this.readRange(name, t.begin, buf);
    return buf;
  }

  /** Fills `target` from absolute offset `begin`, in chunks of readChunkBytes. */
  private readRange(name: string, begin: number, target: Uint8Array): void {
    if (this.fd === null) throw new CheckpointError(`${this.path}: file already closed`);
    let done = 0;
    while (done < target.length) {
      const len = Math.min(target.length - done, SafetensorsFile.readChunkBytes);
      const n = readSync(this.fd, target, done, len, begin + done);
      if (n === 0) throw new CheckpointError(`${this.path}: tensor ${name}: unexpected end of file (truncated file?)`);
      done += n;
    }
  }

  /** Reads a float tensor (F32, BF16 or F16) as float32. */
  readF32(name: string): Float32Array {
    const t = this.info(name);
    if (!isFloatDtype(t.dtype)) {
      throw new CheckpointError(
        `${this.path}: tensor ${name} has dtype ${t.dtype}; only F32, BF16 and F16 are supported`,
      );
    }
    if (t.dtype === 'F32') {
      // Straight into the result's memory: no second copy of a multi-GB tensor.
      const out = new Float32Array((t.end - t.begin) / 4);
      this.readRange(name, t.begin, new Uint8Array(out.buffer));
      return out;
    }
    return toFloat32(t.dtype, this.readRaw(name));
  }

  /** Reads bytes [offset, offset+length) of the data section (for fingerprints). */
  readAt(offset: number, length: number): Buffer {
    if (this.fd === null) throw new CheckpointError(`${this.path}: file already closed`);
    const buf = Buffer.alloc(length);
    const n = readSync(this.fd, buf, 0, length, offset);
    return buf.subarray(0, n);
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}

export interface TensorToWrite {
  name: string;
  dtype: FloatDtype;
  shape: number[];
  data: Float32Array;
}

/**
 * Writes tensors in the given order (upstream files keep the writer's order; torch/HF sort names, we keep what we
 * are given). The data is converted to the dtype as it is written, so peak memory is one tensor.
 */
export function writeSafetensors(
  path: string,
  tensors: { name: string; dtype: FloatDtype | 'I64'; shape: number[]; produce: () => Float32Array }[],
  metadata: Record<string, string> = { format: 'pt' },
): void {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    const n = t.shape.reduce((a, b) => a * b, 1) * bytesPerElement[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + n] };
    offset += n;
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces to a multiple of 8 so the data section is aligned, as the reference writer does.
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += ' ';
  const fd = openSync(path, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    writeSync(fd, len);
    writeSync(fd, Buffer.from(json, 'utf8'));
    for (const t of tensors) {
      const data = t.produce();
      const expected = t.shape.reduce((a, b) => a * b, 1);
      if (data.length !== expected)
        throw new Error(`writeSafetensors: ${t.name} has ${data.length} values, shape needs ${expected}`);
      // I64 (e.g. BatchNorm's num_batches_tracked) is written from integer-valued floats.
      writeSync(
        fd,
        t.dtype === 'I64'
          ? new Uint8Array(BigInt64Array.from(data, (v) => BigInt(v)).buffer)
          : fromFloat32(t.dtype, data),
      );
    }
  } finally {
    closeSync(fd);
  }
}
