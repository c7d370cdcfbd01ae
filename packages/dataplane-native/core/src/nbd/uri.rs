//! NBD URIs (`doc/uri.md` in NetworkBlockDevice/nbd): `nbd://host[:port]/export` and
//! `nbd+unix:///export?socket=/path`.
//!
//! Owns turning the text a user typed into an address and an export name. It must never connect
//! anywhere, and it refuses what it cannot honour (TLS schemes, unknown parameters) instead of
//! silently ignoring it.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::nbd::proto;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `host` is a name or an IP address; IPv6 literals are kept without brackets.
    Tcp {
        host: String,
        port: u16,
    },
    Unix {
        socket: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub transport: Transport,
    /// The path without its leading `/`, percent-decoded; empty selects the default export.
    pub export: String,
}

impl std::str::FromStr for NbdUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<NbdUri> {
        NbdUri::parse(s)
    }
}

impl NbdUri {
    /// Parse `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
    pub fn parse(input: &str) -> Result<NbdUri> {
        let bad = |why: String| {
            Error::InvalidArgument(format!(
                "NBD URI '{input}': {why}; expected nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=PATH"
            ))
        };
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("missing scheme (nbd:// or nbd+unix://)".into()))?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => {
                return Err(Error::NotSupported(format!(
                    "NBD URI '{input}': scheme {scheme} requires TLS, which this client does not \
                     implement yet; use nbd:// or nbd+unix:// over a trusted network"
                )))
            }
            other => return Err(bad(format!("unknown scheme '{other}'"))),
        };
        if rest.contains('#') {
            return Err(bad("fragments (#...) are not allowed".into()));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let export = match path.strip_prefix('/') {
            Some(p) => percent_decode(p).map_err(|why| bad(format!("export name: {why}")))?,
            None => String::new(),
        };
        if export.len() > proto::MAX_STRING_LEN as usize {
            return Err(bad(format!(
                "export name is {} bytes; NBD allows at most {}",
                export.len(),
                proto::MAX_STRING_LEN
            )));
        }

        let mut socket = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key).map_err(|why| bad(format!("query: {why}")))?;
            let value = percent_decode(value).map_err(|why| bad(format!("query: {why}")))?;
            match key.as_str() {
                "socket" if unix => {
                    if socket.is_some() {
                        return Err(bad("'socket' given twice".into()));
                    }
                    if value.is_empty() {
                        return Err(bad("'socket' is empty".into()));
                    }
                    socket = Some(PathBuf::from(value));
                }
                "socket" => {
                    return Err(bad("'socket' is only valid with nbd+unix://".into()));
                }
                k if k.starts_with("tls-") => {
                    return Err(Error::NotSupported(format!(
                        "NBD URI '{input}': parameter '{k}' asks for TLS, which this client does \
                         not implement yet; remove it"
                    )))
                }
                // The URI spec reserves x- for experiments; other clients' extensions are not ours
                // to refuse.
                k if k.starts_with("x-") => {}
                k => return Err(bad(format!("unknown query parameter '{k}'"))),
            }
        }

        let transport = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "nbd+unix:// takes no host ('{authority}'); write nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let socket = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH".into()))?;
            Transport::Unix { socket }
        } else {
            let (host, port) = parse_authority(authority).map_err(bad)?;
            Transport::Tcp { host, port }
        };
        Ok(NbdUri { transport, export })
    }
}

/// `[userinfo@]host[:port]`; userinfo only matters for TLS, which we refuse elsewhere, so it is
/// refused here too rather than ignored.
fn parse_authority(authority: &str) -> std::result::Result<(String, u16), String> {
    if authority.is_empty() {
        return Err("missing host".into());
    }
    if authority.contains('@') {
        return Err(
            "user names are only used for TLS, which this client does not implement".into(),
        );
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("unterminated '[' in IPv6 address")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{host}' is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or(format!("unexpected '{p}' after ']'"))?,
            ),
        };
        (host.to_string(), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.contains(':') {
            return Err(format!(
                "IPv6 address '{host}' must be written in brackets: [{host}]"
            ));
        }
        let host = percent_decode(host)?;
        if host.is_empty() {
            return Err("missing host".into());
        }
        (host, port)
    };
    let port = match port {
        None | Some("") => proto::DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("port '{p}' is not a number from 1 to 65535")),
            Ok(n) => n,
        },
    };
    Ok((host, port))
}

/// RFC 3986 percent-decoding; the result must be UTF-8 without NUL (NBD strings).
fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} of '{s}'"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err(format!(
            "'{s}' decodes to a NUL byte, which NBD strings cannot hold"
        ));
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' does not decode to UTF-8"))
}

/// Escape everything outside RFC 3986's unreserved set and '/', so `parse(display(u)) == u`.
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, true);
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Transport::Tcp { host, port } => {
                write!(f, "nbd://{}:{port}/{export}", percent_encode(host, false))
            }
            Transport::Unix { socket } => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&socket.to_string_lossy(), true)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn examples_from_the_uri_spec() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/disk").unwrap(),
            tcp("example.com", 10809, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com/").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com//disk").unwrap(),
            tcp("example.com", 10809, "/disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com/hello%20world").unwrap(),
            tcp("example.com", 10809, "hello world")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=sock").unwrap(),
            NbdUri {
                transport: Transport::Unix {
                    socket: "sock".into()
                },
                export: "disk".into()
            }
        );
    }

    #[test]
    fn ports_and_ipv6() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10900/x").unwrap(),
            tcp("127.0.0.1", 10900, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:10900/x").unwrap(),
            tcp("::1", 10900, "x")
        );
        assert_eq!(NbdUri::parse("nbd://[::1]").unwrap(), tcp("::1", 10809, ""));
        assert_eq!(NbdUri::parse("NBD://h:1").unwrap(), tcp("h", 1, ""));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://example.com:10809/disk",
            "nbd://[::1]:1/a%20b",
            "nbd+unix:///e?socket=/tmp/x%20y/s.sock",
            "nbd://h:2/%2Fslash",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u, "{s}");
        }
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let msg = |s: &str| NbdUri::parse(s).unwrap_err().to_string();
        assert!(msg("http://x/y").contains("unknown scheme 'http'"));
        assert!(msg("example.com/disk").contains("missing scheme"));
        assert!(msg("nbd://h:0/x").contains("port '0'"));
        assert!(msg("nbd://h:99999/x").contains("port '99999'"));
        assert!(msg("nbd://h:abc/x").contains("port 'abc'"));
        assert!(msg("nbd:///x").contains("missing host"));
        assert!(msg("nbd://::1/x").contains("brackets"));
        assert!(msg("nbd+unix:///x").contains("needs ?socket=PATH"));
        assert!(msg("nbd+unix://host/x?socket=/s").contains("takes no host"));
        assert!(msg("nbd://h/x?socket=/s").contains("only valid with nbd+unix"));
        assert!(msg("nbd://h/x?foo=1").contains("unknown query parameter 'foo'"));
        assert!(msg("nbd://h/x%zz").contains("bad percent escape"));
        assert!(msg("nbd://h/x%00").contains("NUL"));
        assert!(msg("nbd://h/x#frag").contains("fragments"));
        assert_eq!(
            NbdUri::parse("nbds://h/x").unwrap_err().code(),
            "ERR_NOT_SUPPORTED"
        );
        assert_eq!(
            NbdUri::parse("nbd://h/x?tls-type=x509").unwrap_err().code(),
            "ERR_NOT_SUPPORTED"
        );
        assert_eq!(
            NbdUri::parse("nbd://h/x?foo=1").unwrap_err().code(),
            "ERR_INVALID_ARGUMENT"
        );
        assert!(NbdUri::parse("nbd://h/x?x-mine=1").is_ok());
    }
}
