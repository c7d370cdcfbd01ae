/**
 * The floor under a synchronous write: one NATS request from site A answered at site B, the path a
 * sync pair's every change takes (client → A's nats-server → leafnode → B's nats-server → responder,
 * and back; on the direct route client → B's nats-server → responder), timed at QD 1 with a payload of one write. The responder is a nats.js subscription in
 * this process, not Ferry's data plane, so what Ferry adds on top of this path — the NBD request,
 * the local write, framing, the apply at B — is the rest of the added latency.
 */

import { waitFor } from "@ferry/nats-sites";
import { connect } from "@nats-io/transport-node";

const SUBJECT = "ferry.bench.echo";

async function client(site) {
  const { user, password } = site.users.ferryd;
  return connect({ servers: site.server, user, pass: password, name: `bench-${site.name}` });
}

/**
 * Request round trips A → B → A of `bytes` each, one at a time, for `seconds`; their times in µs.
 * `route` `direct`: the requester is connected to B's server, as Ferry's direct route is
 * (`--peer-nats`), so one server relays; `leafnode`: to A's, so both servers and the link do.
 */
export async function natsRoundTrips(sites, seconds, bytes = 4096, route = "leafnode") {
  const [a, b] = await Promise.all([client(route === "direct" ? sites.b : sites.a), client(sites.b)]);
  try {
    b.subscribe(SUBJECT, {
      callback: (error, msg) => {
        if (!error) msg.respond(new Uint8Array(8));
      },
    });
    await b.flush();
    const payload = new Uint8Array(bytes).fill(0xa5);
    // Interest crosses the leafnode asynchronously: wait until A can reach the responder.
    await waitFor("the echo responder at site B to be reachable from site A", () =>
      a.request(SUBJECT, payload, { timeout: 1_000 }).then(() => true),
    );
    const times = [];
    const end = process.hrtime.bigint() + BigInt(Math.round(seconds * 1e9));
    for (let t = process.hrtime.bigint(); t < end; t = process.hrtime.bigint()) {
      await a.request(SUBJECT, payload, { timeout: 5_000 });
      times.push(Number(process.hrtime.bigint() - t) / 1e3);
    }
    return times;
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
}
