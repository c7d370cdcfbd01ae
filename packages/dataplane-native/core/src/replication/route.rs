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
    let bad = |why: String| Err(Error::InvalidArgument(why));
    let mut out = BTreeMap::new();
    for p in peers {
        let Some((site, url)) = p.split_once('=') else {
            return bad(format!(
                "--peer-nats '{}' is not SITE=URL: give the other site's name and its server, e.g. --peer-nats site-b=nats://peer:PASSWORD@host:4222",
                masked(p)
            ));
        };
        if !super::protocol::valid_site_name(site) {
            return bad(format!(
                "--peer-nats '{}': the site name '{site}' must be 1-64 characters from [A-Za-z0-9_-]",
                masked(p)
            ));
        }
        if url::Url::parse(url)
            .map(|u| !matches!(u.scheme(), "nats" | "tls"))
            .unwrap_or(true)
        {
            return bad(format!(
                "--peer-nats {site}: '{}' is not a NATS URL; use nats://peer:PASSWORD@host:port",
                masked(url)
            ));
        }
        if site == me {
            return bad(format!(
                "--peer-nats names this site ({me}): give the other sites' servers"
            ));
        }
        if out.insert(site.to_string(), url.to_string()).is_some() {
            return bad(format!("--peer-nats gives site {site} twice"));
        }
    }
    Ok(out)
}

/// `value` (which may hold a URL with a password) fit for a message: the password masked, the
/// rest exactly as given.
fn masked(value: &str) -> String {
    let Some(scheme_end) = value.find("://") else {
        return value.to_string();
    };
    let rest = &value[scheme_end + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &value[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(peers: &[&str]) -> String {
        let peers: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
        parse_peers("site-a", &peers).unwrap_err().to_string()
    }

    #[test]
    fn peers_parse_by_site() {
        let peers = vec![
            "site-b=nats://peer:pw@127.0.0.1:4222".to_string(),
            "site-c=tls://h:1".to_string(),
        ];
        let got = parse_peers("site-a", &peers).unwrap();
        assert_eq!(got["site-b"], "nats://peer:pw@127.0.0.1:4222");
        assert_eq!(got["site-c"], "tls://h:1");
    }

    #[test]
    fn bad_peers_are_refused_naming_the_value_without_its_password() {
        let e = refused(&["site-b"]);
        assert!(e.contains("--peer-nats 'site-b' is not SITE=URL"), "{e}");
        let e = refused(&["site-b=http://peer:secret@h:1"]);
        assert!(
            e.contains("--peer-nats site-b: 'http://peer:***@h:1' is not a NATS URL"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        let e = refused(&["b c=nats://h:1"]);
        assert!(e.contains("the site name 'b c' must be"), "{e}");
        let e = refused(&["site-a=nats://h:1"]);
        assert!(e.contains("--peer-nats names this site (site-a)"), "{e}");
        let e = refused(&["site-b=nats://h:1", "site-b=nats://h:2"]);
        assert!(e.contains("--peer-nats gives site site-b twice"), "{e}");
    }

    #[test]
    fn only_a_password_is_masked() {
        assert_eq!(masked("nats://peer:pw@h:1/x"), "nats://peer:***@h:1/x");
        assert_eq!(masked("nats://h:1"), "nats://h:1");
        assert_eq!(masked("nats://peer@h:1"), "nats://peer@h:1");
        assert_eq!(masked("site-b"), "site-b");
    }
}
