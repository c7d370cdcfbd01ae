/** Public face of @ferry/nats-sites. */
export { type EndOptions, endProcess, hasExited, isAlive } from "./end-process.js";
export { NatsServerFailed, NatsServerMissing, ProcessSurvived, SiteError, WaitTimedOut } from "./errors.js";
export { onExit } from "./exit-guard.js";
export { freePort } from "./free-port.js";
export type { NatsCredentials, Site, SiteUsers } from "./nats-site.js";
export { type LinkFront, type SiteOptions, type SitePair, type SitePairOptions, startSitePair } from "./site-pair.js";
export { type WaitOptions, waitFor } from "./wait-for.js";
