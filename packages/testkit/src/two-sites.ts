/**
 * The two-site NATS topology (`startSitePair` of @ferry/nats-sites) for a test: site B dials site
 * A through a `TestLinkProxy`, so that a test can partition and heal the link. Everything lives in
 * one temp directory and is removed by `stop()`; the servers are ended by their PIDs, and, should
 * the test process exit without calling `stop()`, killed by an exit guard.
 *
 * In vitest:
 *
 *     let sites: TwoSites;
 *     beforeAll(async () => { sites = await startTwoSites(); });
 *     afterAll(() => sites?.stop());
 *
 * `startTwoSites()` cleans up whatever it had started before it rejects, so a failing `beforeAll`
 * leaves nothing behind either.
 */
import { type SitePair, type SitePairOptions, startSitePair } from "@ferry/nats-sites";
import { type PartitionMode, TestLinkProxy } from "./test-link-proxy.js";

export type { SiteOptions } from "@ferry/nats-sites";

/** `pingInterval`: a blackhole test wants `1s` so that the servers notice the dead link soon. */
export type TwoSitesOptions = Omit<SitePairOptions, "linkFront">;

export interface TwoSites extends SitePair {
  /** Test proxy between B's leafnode remote and A's leaf port. */
  readonly linkProxy: TestLinkProxy;
  /**
   * Cut the link. `reset` (default) resolves once both servers have seen it go; `blackhole`
   * resolves at once — the servers notice only through their pings (see `pingInterval`).
   */
  partition(mode?: PartitionMode): Promise<void>;
  /** Restore the link and resolve once it is up again. */
  heal(): Promise<void>;
}

export async function startTwoSites(options: TwoSitesOptions = {}): Promise<TwoSites> {
  let proxy: TestLinkProxy | undefined;
  const pair = await startSitePair({
    ...options,
    linkFront: async (aLeafPort) => {
      proxy = await TestLinkProxy.start({ port: aLeafPort });
      return proxy;
    },
  });
  if (proxy === undefined) {
    await pair.stop();
    throw new Error("startSitePair did not start the link proxy");
  }
  const linkProxy = proxy;
  return {
    ...pair,
    linkProxy,
    async partition(mode: PartitionMode = "reset") {
      linkProxy.partition(mode);
      if (mode === "reset") await pair.waitForNoLink();
    },
    async heal() {
      linkProxy.heal();
      await pair.waitForLink();
    },
  };
}
