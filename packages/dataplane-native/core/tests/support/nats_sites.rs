//! Two Ferry sites' NATS servers for integration tests — the topology of `infra/nats/README.md`:
//! site A accepts the leafnode link, site B dials it, each is its own JetStream domain. Renders the
//! templates from `infra/nats/` into a temp dir, starts `nats-server -c … -P …` on free loopback
//! ports, and waits (bounded) on the monitoring port: `/healthz` for each server, `/leafz` for the
//! link. Servers are ended by their own PID (SIGTERM, then SIGKILL) on `Drop`; it never signals any
//! other process. The TypeScript twin is `startTwoSites` in packages/testkit.
//!
//! Needs `nats-server` (Debian package, 2.9) on PATH.
#![allow(dead_code)] // Each test file uses a different part of it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::link_proxy::LinkProxy;

/// Bound on each wait: a server becoming healthy, the link forming or going.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// Starts of a site pair before a port taken by someone else is a failure.
const PORT_ATTEMPTS: u32 = 3;

fn template_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../infra/nats")
}

#[derive(Clone, Debug)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// One site's nats-server. Stopped on `Drop`.
pub struct Site {
    /// Site name, also its JetStream domain; the server is named `ferry-<name>`.
    pub name: String,
    pub region: String,
    pub client_port: u16,
    /// HTTP monitoring port (`/varz`, `/healthz`, `/leafz`, …).
    pub monitor_port: u16,
    /// The port this site accepts leafnode links on (site A only).
    pub leaf_port: Option<u16>,
    pub dir: PathBuf,
    pub store_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The site's ferryd user (everything in account FERRY).
    pub ferryd: Credentials,
    /// The CLI user (requests and JetStream API only; see infra/nats/site.conf.tmpl).
    pub cli: Credentials,
    /// Another site's data plane on its direct route here (replication requests only).
    pub peer: Credentials,
    template: &'static str,
    values: HashMap<&'static str, String>,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Site {
    /// `127.0.0.1:<client_port>`.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `nats://ferryd:<password>@127.0.0.1:<client_port>`, for configs and tools. Not for
    /// async-nats 0.46, which ignores credentials in a URL (nats.rs issue #1623): use
    /// `connect_options()` with `server()`.
    pub fn url(&self) -> String {
        format!(
            "nats://{}:{}@{}",
            self.ferryd.user,
            self.ferryd.password,
            self.server()
        )
    }

    /// Options that log in as this site's ferryd user; `.connect(site.server())` them.
    pub fn connect_options(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .user_and_password(self.ferryd.user.clone(), self.ferryd.password.clone())
    }

    /// A client of this server (as ferryd) subscribed to `subject`, flushed so that nothing
    /// published after it returns is missed. Keep the client: dropping it ends the subscription.
    pub fn subscribe(
        &self,
        rt: &tokio::runtime::Runtime,
        subject: &str,
    ) -> (async_nats::Client, async_nats::Subscriber) {
        rt.block_on(async {
            let c = self.connect_options().connect(self.server()).await.unwrap();
            let sub = c.subscribe(subject.to_string()).await.unwrap();
            c.flush().await.unwrap();
            (c, sub)
        })
    }

    /// `nats://peer:<password>@127.0.0.1:<client_port>`: another site's `--peer-nats` to this one.
    pub fn peer_url(&self) -> String {
        format!(
            "nats://{}:{}@{}",
            self.peer.user,
            self.peer.password,
            self.server()
        )
    }

    pub fn cli_url(&self) -> String {
        format!(
            "nats://{}:{}@{}",
            self.cli.user,
            self.cli.password,
            self.server()
        )
    }

    /// PID of the running server; it changes on `restart()`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Render the config and start the server; returns once `/healthz` says ok. Panics (with the
    /// server's log) if it exits or is not healthy within `DEADLINE`.
    pub fn start(&mut self) {
        if let Err(why) = self.try_start() {
            panic!("{why}");
        }
    }

    /// `start`, but a server that exits during startup is an `Err` with its log.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(
            self.child.is_none(),
            "site {} is already running",
            self.name
        );
        std::fs::create_dir_all(&self.store_dir).unwrap();
        render_config(&template_dir(), self.template, &self.dir, &self.values)
            .unwrap_or_else(|e| panic!("cannot render the config of site {}: {e}", self.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .arg("-P")
            .arg(&self.pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server (Debian package nats-server; infra/setup.sh installs it): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok((200, body)) = http_get(self.monitor_port, "healthz") {
                if body.contains(r#""status":"ok""#) {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "nats-server of site {} exited with {status} during startup:\n{}",
                    self.name,
                    self.log_text()
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "nats-server of site {} not healthy after {DEADLINE:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then SIGKILL if the server is still there after `STOP_GRACE`. Idempotent.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM, STOP_GRACE);
    }

    /// SIGKILL at once: a crash, for fault tests.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL, STOP_GRACE);
    }

    /// Stop if running, then start again on the same ports with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// GET a monitoring endpoint (e.g. `"leafz?subs=1"`) and parse its JSON.
    pub fn monitor(&self, endpoint: &str) -> std::io::Result<serde_json::Value> {
        let (status, body) = http_get(self.monitor_port, endpoint)?;
        if status != 200 {
            return Err(std::io::Error::other(format!(
                "GET /{endpoint} on site {}: HTTP {status} {body}",
                self.name
            )));
        }
        serde_json::from_str(&body).map_err(std::io::Error::other)
    }

    /// Leafnode connections this server reports (0 when it does not answer).
    pub fn leafnodes(&self) -> u64 {
        self.monitor("leafz")
            .ok()
            .and_then(|v| v["leafnodes"].as_u64())
            .unwrap_or(0)
    }

    /// Everything the server has logged so far (all of its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, signal: libc::c_int, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling the process this harness started, by its PID; it is not reaped yet, so
        // the PID cannot have been reused.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + grace;
        while child.try_wait().map(|s| s.is_none()).unwrap_or(false) {
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Site A (`site-a`, eu-es) and site B (`site-b`, eu-de), linked by a leafnode from B to A
/// (directly, or through a `LinkProxy`).
pub struct TwoSites {
    pub a: Site,
    pub b: Site,
    /// The proxy the link runs through, when started with `start_partitionable()`.
    pub link: Option<LinkProxy>,
    /// Removed on drop, after both servers have stopped (fields drop in declaration order).
    pub dir: tempfile::TempDir,
}

impl TwoSites {
    /// Start both servers and return once the leafnode link is up. Panics with the servers' logs if
    /// that takes longer than `DEADLINE`; whatever was started is stopped by `Drop` as the panic
    /// unwinds.
    pub fn start() -> TwoSites {
        TwoSites::start_with(false, 1)
    }

    /// Like `start`, with the link running through a `LinkProxy`, so that a test can cut it
    /// (`partition`) and restore it (`heal`) while both servers stay up.
    pub fn start_partitionable() -> TwoSites {
        TwoSites::start_with(true, 1)
    }

    fn start_with(proxied: bool, attempt: u32) -> TwoSites {
        let dir = tempfile::Builder::new()
            .prefix("ferry-nats-")
            .tempdir()
            .unwrap();
        let leaf_password = secret();
        let a_leaf_port = free_port();
        let link = proxied.then(|| LinkProxy::start(a_leaf_port));
        // B dials, and A advertises, the proxy when there is one: B adds what A advertises to its
        // reconnect list, and would otherwise go around the proxy (and any partition) on a redial.
        let dialled = link.as_ref().map_or(a_leaf_port, |l| l.port());
        let mut a = site(dir.path(), "site-a", "eu-es", "site-a.conf.tmpl");
        a.leaf_port = Some(a_leaf_port);
        a.values.insert("LEAF_PORT", a_leaf_port.to_string());
        a.values
            .insert("LEAF_ADVERTISE", format!("127.0.0.1:{dialled}"));
        a.values.insert("LEAF_PASSWORD", leaf_password.clone());
        let mut b = site(dir.path(), "site-b", "eu-de", "site-b.conf.tmpl");
        b.values
            .insert("LEAF_REMOTE", format!("127.0.0.1:{dialled}"));
        b.values.insert("LEAF_PASSWORD", leaf_password);
        // The ports were free a moment ago; another process may have taken one since.
        if let Err(why) = a.try_start().and_then(|()| b.try_start()) {
            a.stop();
            drop(link);
            if attempt < PORT_ATTEMPTS && why.contains("address already in use") {
                return TwoSites::start_with(proxied, attempt + 1);
            }
            panic!("{why}");
        }
        let sites = TwoSites { a, b, link, dir };
        sites.wait_for_link();
        sites
    }

    /// Wait until both servers report the leafnode connection.
    pub fn wait_for_link(&self) {
        self.wait_for_leafnodes(1, "up");
    }

    /// Wait until neither server reports a leafnode connection.
    pub fn wait_for_no_link(&self) {
        self.wait_for_leafnodes(0, "gone");
    }

    /// Cut the link (both servers stay up) and wait until both have seen it go. Needs
    /// `start_partitionable()`.
    pub fn partition(&self) {
        self.proxy().partition();
        self.wait_for_no_link();
    }

    /// Restore the link and wait until it is up again.
    pub fn heal(&self) {
        self.proxy().heal();
        self.wait_for_link();
    }

    fn proxy(&self) -> &LinkProxy {
        self.link
            .as_ref()
            .expect("the link has no proxy: start with TwoSites::start_partitionable()")
    }

    fn wait_for_leafnodes(&self, count: u64, what: &str) {
        let deadline = Instant::now() + DEADLINE;
        while self.a.leafnodes() != count || self.b.leafnodes() != count {
            assert!(
                Instant::now() < deadline,
                "leafnode link {} → {} not {what} after {DEADLINE:?}\n--- {} ---\n{}\n--- {} ---\n{}",
                self.b.name,
                self.a.name,
                self.a.name,
                self.a.log_text(),
                self.b.name,
                self.b.log_text()
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        // B first, so that A does not log a lost link for a site that is going away anyway.
        self.b.stop();
        self.a.stop();
    }
}

fn site(root: &Path, name: &str, region: &str, template: &'static str) -> Site {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let client_port = free_port();
    let monitor_port = free_port();
    let ferryd = Credentials {
        user: "ferryd".into(),
        password: secret(),
    };
    let cli = Credentials {
        user: "cli".into(),
        password: secret(),
    };
    let peer = Credentials {
        user: "peer".into(),
        password: secret(),
    };
    let store_dir = dir.join("store");
    let values = HashMap::from([
        ("SITE", name.to_string()),
        ("REGION", region.to_string()),
        ("PORT", client_port.to_string()),
        ("HTTP_PORT", monitor_port.to_string()),
        ("STORE", store_dir.display().to_string()),
        ("FERRYD_PASSWORD", ferryd.password.clone()),
        ("CLI_PASSWORD", cli.password.clone()),
        ("PEER_PASSWORD", peer.password.clone()),
        ("PING_INTERVAL", "10s".to_string()),
    ]);
    Site {
        name: name.into(),
        region: region.into(),
        client_port,
        monitor_port,
        leaf_port: None,
        config: dir.join(template.trim_end_matches(".tmpl")),
        log: dir.join("nats-server.log"),
        pid_file: dir.join("nats-server.pid"),
        store_dir,
        dir,
        ferryd,
        cli,
        peer,
        template,
        values,
        child: None,
    }
}

/// Render `template` (and every file it `include "x"`s, from `x.tmpl`) into `out`. Fails on a
/// placeholder without a value and on a value that could break out of a quoted string.
pub fn render_config(
    templates: &Path,
    template: &str,
    out: &Path,
    values: &HashMap<&'static str, String>,
) -> Result<(), String> {
    if let Some((name, _)) = values
        .iter()
        .find(|(_, v)| v.contains(['"', '\\', '\n', '\r']))
    {
        return Err(format!(
            "value of {{{{{name}}}}} has a quote, backslash or newline"
        ));
    }
    let path = templates.join(template);
    let source = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rendered = String::with_capacity(source.len());
    let mut rest = source.as_str();
    while let Some(start) = rest.find("{{") {
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("{}: unclosed {{{{", path.display()))?;
        let name = &rest[start + 2..start + end];
        let value = values
            .get(name)
            .ok_or_else(|| format!("{}: no value for {{{{{name}}}}}", path.display()))?;
        rendered.push_str(&rest[..start]);
        rendered.push_str(value);
        rest = &rest[start + end + 2..];
    }
    rendered.push_str(rest);
    std::fs::write(out.join(template.trim_end_matches(".tmpl")), &rendered)
        .map_err(|e| e.to_string())?;
    for line in rendered.lines() {
        if let Some(included) = line
            .trim_start()
            .strip_prefix("include ")
            .map(|s| s.trim().trim_matches('"'))
        {
            render_config(templates, &format!("{included}.tmpl"), out, values)?;
        }
    }
    Ok(())
}

/// GET `http://127.0.0.1:<port>/<path>` with HTTP/1.0 (the server closes after the response).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::other(format!("malformed HTTP response: {response:.200}"));
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = response
        .split_once("\r\n\r\n")
        .ok_or_else(bad)?
        .1
        .to_string();
    Ok((status, body))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (a small race remains).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn secret() -> String {
    rand::random::<[u8; 12]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
