//! How a site's data plane reaches another site. Every replication message addressed to site B
//! (`ferry.dp.B.*`) is answered by B's volume service, subscribed at B's own nats-server, so any
//! connection to the same account reaches it: through this site's server and the leafnode link
//! (two servers relay each message, the default), or straight to B's server when the service was
//! given B's address as a peer (`--peer-nats B=URL`, one server hop: what a synchronous write waits
//! for twice per round trip). The direct connection is used while it is connected; when it is not,
//! messages take the leafnode route, so losing the direct path never stops a pair. Events and
//! everything addressed to this site stay on the site's own connection.

use crate::error::{Error, Result};
use async_nats::connection::State;
use std::collections::BTreeMap;

/// The connection a pair sends its target's messages on.
#[derive(Clone)]
pub struct Route {
    via_site: async_nats::Client,
    direct: Option<async_nats::Client>,
}

impl Route {
    pub fn new(via_site: async_nats::Client, direct: Option<async_nats::Client>) -> Route {
        Route { via_site, direct }
    }

    /// The direct connection while it is up, else this site's own.
    pub fn client(&self) -> &async_nats::Client {
        self.direct_up().unwrap_or(&self.via_site)
    }

    /// `direct` or `leafnode`: which way the next message goes (pair status shows it).
    pub fn kind(&self) -> &'static str {
        match self.direct_up() {
            Some(_) => "direct",
            None => "leafnode",
        }
    }

    fn direct_up(&self) -> Option<&async_nats::Client> {
        self.direct
            .as_ref()
            .filter(|d| d.connection_state() == State::Connected)
    }
}

/// Peer sites given as `SITE=URL` to the service of site `me`, checked before anything connects.
pub fn parse_peers(me: &str, peers: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in peers {
        let Some((site, url)) = p.split_once('=') else {
            return Err(Error::InvalidArgument(format!(
                "peer '{}' is not SITE=URL: give the other site's name and its NATS server, e.g. site-b=nats://user:password@host:4222",
                super::manager::redact(p)
            )));
        };
        if !super::protocol::valid_site_name(site) {
            return Err(Error::InvalidArgument(format!(
                "peer site '{site}' must be 1-64 characters from [A-Za-z0-9_-]"
            )));
        }
        if url::Url::parse(url)
            .map(|u| !matches!(u.scheme(), "nats" | "tls"))
            .unwrap_or(true)
        {
            return Err(Error::InvalidArgument(format!(
                "peer {site}: '{}' is not a NATS URL; use nats://user:password@host:port",
                super::manager::redact(url)
            )));
        }
        if site == me {
            return Err(Error::InvalidArgument(format!(
                "--peer-nats names this site ({me}): give the other sites' servers"
            )));
        }
        if out.insert(site.to_string(), url.to_string()).is_some() {
            return Err(Error::InvalidArgument(format!(
                "peer site '{site}' is given twice"
            )));
        }
    }
    Ok(out)
}
