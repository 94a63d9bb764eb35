// A high-dynamic-range histogram of non-negative integers (here: microseconds) with a fixed relative precision: each
// power-of-two range is split into 2048 equal sub-buckets, so any recorded value is known within 1/1024 (~0.1%) of
// itself, from 1 µs to hours, in memory proportional to the ranges used. Percentiles follow HdrHistogram's
// convention: the value at percentile p is the highest value equivalent (same sub-bucket) to the recorded value at
// rank ceil(p/100 · count), capped at the largest value recorded.

const SUB_BUCKET_BITS = 11;
const SUB_BUCKETS = 1 << SUB_BUCKET_BITS;
const HALF = SUB_BUCKETS >> 1;

export class HdrHistogram {
  private readonly counts = new Map<number, number>();
  private total = 0;
  private sum = 0;
  private minValue = Number.POSITIVE_INFINITY;
  private maxValue = 0;

  get count(): number {
    return this.total;
  }

  get min(): number {
    return this.total === 0 ? 0 : this.minValue;
  }

  get max(): number {
    return this.maxValue;
  }

  get mean(): number {
    return this.total === 0 ? 0 : this.sum / this.total;
  }

  /** Records `value` (rounded to an integer, negative values are refused) `times` times. */
  record(value: number, times = 1): void {
    if (!(value >= 0) || !Number.isFinite(value)) throw new RangeError(`cannot record ${value}`);
    const v = Math.round(value);
    const key = HdrHistogram.keyOf(v);
    this.counts.set(key, (this.counts.get(key) ?? 0) + times);
    this.total += times;
    this.sum += v * times;
    if (v < this.minValue) this.minValue = v;
    if (v > this.maxValue) this.maxValue = v;
  }

  /** Bucket key: shift × 2048 + (v >> shift), where shift keeps v >> shift below 2048. */
  private static keyOf(v: number): number {
    let shift = 0;
    while (v >= SUB_BUCKETS * 2 ** shift) shift++;
    return shift * SUB_BUCKETS + Math.floor(v / 2 ** shift);
  }

  /** The highest value that falls in the same sub-bucket as values with this key. */
  private static highestOf(key: number): number {
    const shift = Math.floor(key / SUB_BUCKETS);
    const sub = key % SUB_BUCKETS;
    return (sub + 1) * 2 ** shift - 1;
  }

  /** The value at percentile p in [0, 100]; 0 when empty. */
  percentile(p: number): number {
    if (this.total === 0) return 0;
    const rank = Math.max(1, Math.ceil((Math.min(100, Math.max(0, p)) / 100) * this.total));
    const keys = [...this.counts.keys()].sort((a, b) => a - b);
    let seen = 0;
    for (const k of keys) {
      seen += this.counts.get(k)!;
      if (seen >= rank) return Math.min(this.maxValue, HdrHistogram.highestOf(k));
    }
    return this.maxValue;
  }

  /** Adds another histogram's counts to this one. */
  add(other: HdrHistogram): void {
    for (const [k, c] of other.counts) this.counts.set(k, (this.counts.get(k) ?? 0) + c);
    this.total += other.total;
    this.sum += other.sum;
    if (other.total > 0) {
      this.minValue = Math.min(this.minValue, other.minValue);
      this.maxValue = Math.max(this.maxValue, other.maxValue);
    }
  }
}

/** Sub-buckets per power of two (the relative precision is 1 / (this / 2)). */
export const HDR_SUB_BUCKETS = SUB_BUCKETS;
export const HDR_RELATIVE_PRECISION = 1 / HALF;
