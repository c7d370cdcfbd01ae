/**
 * Leadership of a site's ferryds: a lease in the site's KV (`ferry-leader`, key `leader`). The
 * holder renews it every third of its term with a compare-and-set on the entry's revision; another
 * ferryd takes it over only once the holder has not renewed for a whole term. A holder that fails
 * to renew (someone else's revision is newer) learns it lost the lease and steps down. Terms are
 * wall-clock times written by the holder, so the hosts of one site need synchronized clocks (as
 * for any lease); a term is several seconds, far above ordinary NTP skew.
 */
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";

export const LEASE_BUCKET = "ferry-leader";
const KEY = "leader";

export interface LeaseHolder {
  holder: string;
  renewedAtMs: number;
  termMs: number;
}

export class Lease {
  private revision: number | null = null;

  private constructor(
    private readonly kv: KV,
    readonly holder: string,
    readonly termMs: number,
  ) {}

  static async open(nc: NatsConnection, holder: string, termMs: number): Promise<Lease> {
    const kv = await new Kvm(nc).create(LEASE_BUCKET, { history: 1 });
    return new Lease(kv, holder, termMs);
  }

  get held(): boolean {
    return this.revision !== null;
  }

  /** Take the lease when it is free or expired, renew it when held; true while this holder leads. */
  async tryAcquire(nowMs = Date.now()): Promise<boolean> {
    const value = JSON.stringify({
      holder: this.holder,
      renewedAtMs: nowMs,
      termMs: this.termMs,
    } satisfies LeaseHolder);
    try {
      if (this.revision !== null) {
        this.revision = await this.kv.update(KEY, value, this.revision);
        return true;
      }
      const entry = await this.kv.get(KEY);
      if (entry === null || entry.operation !== "PUT") {
        this.revision = await this.kv.create(KEY, value);
        return true;
      }
      const current = entry.json<LeaseHolder>();
      if (current.holder === this.holder || nowMs - current.renewedAtMs > current.termMs) {
        this.revision = await this.kv.update(KEY, value, entry.revision);
        return true;
      }
      return false;
    } catch {
      // Someone else wrote first (or the server is away): not the leader until proven again.
      this.revision = null;
      return false;
    }
  }

  /** Who holds the lease now, as the bucket says. */
  async current(): Promise<LeaseHolder | null> {
    const entry = await this.kv.get(KEY);
    return entry === null || entry.operation !== "PUT" ? null : entry.json<LeaseHolder>();
  }

  /** Give the lease up (clean shutdown), so another ferryd need not wait out the term. */
  async release(): Promise<void> {
    if (this.revision === null) return;
    const revision = this.revision;
    this.revision = null;
    await this.kv.delete(KEY, { previousSeq: revision }).catch(() => {});
  }
}
