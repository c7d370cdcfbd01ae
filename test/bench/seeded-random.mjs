/**
 * `SeededRandom`: the bench's deterministic randomness, so that every run (and every server in a
 * run) gets the same disk image and the same changed blocks. Not for anything secret.
 */
import { createCipheriv, createHash } from "node:crypto";

export class SeededRandom {
  #state;
  #stream;

  constructor(seed) {
    const key = createHash("sha256").update(`ferry-bench:${seed}`).digest();
    this.#state = key.readUInt32LE(0) || 1;
    // AES-CTR over zeroes is a fast, seeded stream of incompressible bytes.
    this.#stream = createCipheriv("aes-128-ctr", key.subarray(0, 16), key.subarray(16, 32));
  }

  /** The next 32-bit unsigned integer (xorshift32). */
  next() {
    let x = this.#state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#state = x >>> 0;
    return this.#state;
  }

  /** A whole number in [0, n), n ≤ 2^32; the modulo bias is far below what a bench notices. */
  below(n) {
    return this.next() % n;
  }

  /** `n` incompressible bytes from this seed's stream. */
  bytes(n) {
    return this.#stream.update(Buffer.alloc(n));
  }
}
