/**
 * For the orchestrator's tests against real nats-servers: two sites started before a test file's
 * tests, with a connection as user `ferryd` to each, and stopped after them (also when they fail).
 * Test support only: not built into dist.
 */
import { startTwoSites, type TwoSites } from "@ferry/testkit";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll } from "vitest";

export interface SitesUnderTest {
  sites: TwoSites;
  /** ferryd's connections to site A's and site B's server. */
  a: NatsConnection;
  b: NatsConnection;
}

/** Call at the top of a test file; the fields are set once its `beforeAll` has run. */
export function twoSitesForTests(): SitesUnderTest {
  const under = {} as SitesUnderTest;
  beforeAll(async () => {
    under.sites = await startTwoSites();
    const ferryd = (site: TwoSites["a"]) =>
      connect({ servers: site.server, user: "ferryd", pass: site.users.ferryd.password });
    under.a = await ferryd(under.sites.a);
    under.b = await ferryd(under.sites.b);
  });
  afterAll(async () => {
    await under.a?.close();
    await under.b?.close();
    await under.sites?.stop();
  });
  return under;
}
