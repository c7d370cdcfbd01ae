//! One site's volume service in-process, joined to its NATS site, with its data directory; the
//! service can be stopped and started again on the same directory (a restart).

use ferry_dataplane::admin::Admin;
use ferry_dataplane::control::ControlRequest;
use ferry_dataplane::service::{ServeOptions, VolumeService};
use serde_json::Value;

pub struct Site {
    pub dir: tempfile::TempDir,
    svc: Option<VolumeService>,
    name: String,
    region: String,
    /// The service's node in the site (`--node`), when the site has several.
    node: Option<String>,
    url: String,
    allow: Vec<String>,
    /// `SITE=URL` of the peers this service connects to directly (`--peer-nats`).
    peers: Vec<String>,
}

impl Site {
    pub fn start(name: &str, region: &str, url: String, allow: &[&str]) -> Site {
        Site::start_with_peers(name, region, url, allow, &[])
    }

    /// A site whose service also connects straight to the peer sites given as `SITE=URL`.
    pub fn start_with_peers(
        name: &str,
        region: &str,
        url: String,
        allow: &[&str],
        peers: &[String],
    ) -> Site {
        let mut site = Site {
            dir: tempfile::tempdir().unwrap(),
            svc: None,
            name: name.into(),
            region: region.into(),
            node: None,
            url,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            peers: peers.to_vec(),
        };
        site.restart();
        site
    }

    /// One node's service of a site that has several (`--node`).
    pub fn start_node(name: &str, node: &str, region: &str, url: String) -> Site {
        let mut site = Site::start_with_peers(name, region, url, &[], &[]);
        site.stop();
        site.node = Some(node.into());
        site.restart();
        site
    }

    /// Start the service again (after `stop`), on the same data directory.
    pub fn restart(&mut self) {
        assert!(self.svc.is_none(), "the service of {} runs", self.name);
        self.svc = Some(
            VolumeService::start(ServeOptions {
                data_dir: self.dir.path().to_path_buf(),
                listen: Some("127.0.0.1:0".into()),
                socket: None,
                untracked: false,
                site: Some(self.name.clone()),
                region: Some(self.region.clone()),
                node: self.node.clone(),
                nats: Some(self.url.clone()),
                allow_regions: self.allow.clone(),
                peers: self.peers.clone(),
            })
            .unwrap(),
        );
    }

    /// A clean stop of the service; the data directory stays.
    pub fn stop(&mut self) {
        self.svc.take().expect("service runs").stop().unwrap();
    }

    pub fn admin(&self) -> Admin {
        Admin::open(self.dir.path()).unwrap()
    }

    pub fn svc(&self) -> &VolumeService {
        self.svc.as_ref().unwrap()
    }

    pub fn write(&self, vol: &str, offset: u64, byte: u8, len: usize) {
        self.write_bytes(vol, offset, &vec![byte; len]);
    }

    pub fn write_bytes(&self, vol: &str, offset: u64, data: &[u8]) {
        self.try_write(vol, offset, data).unwrap();
    }

    /// A client's write to `vol`, which may be refused (a replica is read-only).
    pub fn try_write(&self, vol: &str, offset: u64, data: &[u8]) -> ferry_dataplane::Result<()> {
        self.svc()
            .registry()
            .require(vol)
            .unwrap()
            .write_at(offset, data, false)
    }

    pub fn content(&self, vol: &str) -> Vec<u8> {
        let v = self.svc().registry().require(vol).unwrap();
        let mut buf = vec![0u8; v.size() as usize];
        v.read_at(0, &mut buf).unwrap();
        buf
    }

    /// The first replication pair's status.
    pub fn pair_status(&self) -> Value {
        self.admin()
            .replicate(ControlRequest::ReplicateStatus)
            .unwrap()[0]
            .clone()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(s) = self.svc.take() {
            let _ = s.stop();
        }
    }
}

pub fn start_pair(a: &Site, vols: &[&str], interval_ms: u64) -> Value {
    start_pair_limited(a, vols, interval_ms, None)
}

/// A pair to `site-b` with a bandwidth limit (bytes per second on the wire).
pub fn start_pair_limited(a: &Site, vols: &[&str], interval_ms: u64, rate: Option<u64>) -> Value {
    start_pair_with(a, vols, "async", interval_ms, rate, None)
}

/// A synchronous pair to `site-b`, with what to do when the target is lost.
pub fn start_sync_pair(a: &Site, vols: &[&str], interval_ms: u64, on_loss: &str) -> Value {
    start_pair_with(a, vols, "sync", interval_ms, None, Some(on_loss))
}

fn start_pair_with(
    a: &Site,
    vols: &[&str],
    mode: &str,
    interval_ms: u64,
    rate: Option<u64>,
    on_loss: Option<&str>,
) -> Value {
    let mut req = start_request(vols, "site-b", mode, interval_ms);
    if let ControlRequest::ReplicateStart {
        rate: r,
        on_loss: o,
        block_timeout_ms,
        ..
    } = &mut req
    {
        *r = rate;
        *o = on_loss.map(String::from);
        *block_timeout_ms = Some(3000);
    }
    a.admin().replicate(req).unwrap()
}

/// A `replicate start` request with the defaults; tests change the fields they care about.
pub fn start_request(vols: &[&str], to: &str, mode: &str, interval_ms: u64) -> ControlRequest {
    ControlRequest::ReplicateStart {
        volumes: vols.iter().map(|s| s.to_string()).collect(),
        to: to.into(),
        to_node: None,
        mode: mode.into(),
        interval_ms,
        rate: None,
        level: None,
        on_loss: None,
        block_timeout_ms: None,
        recovery_points: None,
        reverse: None,
        max_message: None,
        points_max_age_ms: None,
        scheduled: None,
    }
}

pub fn sync(a: &Site, vols: &[&str]) -> ferry_dataplane::Result<Value> {
    a.admin().replicate(ControlRequest::ReplicateSync {
        volumes: vols.iter().map(|s| s.to_string()).collect(),
        to: None,
    })
}

/// Poll `f` every 50 ms until it is true; panic with `what` after `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
