//! Synchronous replication between two sites over real nats-servers: a write is acknowledged
//! only once the target applied it; when the target goes away, `suspend` goes on locally, says
//! so on the site's event subject and resyncs only what changed, `block` fails writes with EIO
//! after its timeout and keeps them here until the resync.

mod support;

use ferry_dataplane::control::ControlRequest;
use futures_util::StreamExt;
use rand::Rng;
use support::nats_sites::TwoSites;
use support::sites::{start_sync_pair, sync, wait_until, Site};

const BLOCK: u64 = 65536;
const SIZE: u64 = 16 << 20;

fn sync_state(a: &Site) -> String {
    a.pair_status()["syncState"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn replica_range(b: &Site, vol: &str, offset: u64, len: usize) -> Vec<u8> {
    let v = b.svc().registry().require(vol).unwrap();
    let mut buf = vec![0u8; len];
    v.read_at(offset, &mut buf).unwrap();
    buf
}

fn random_writes(a: &Site, vol: &str, n: usize, b: Option<&Site>) {
    let v = a.svc().registry().require(vol).unwrap();
    let mut rng = rand::rng();
    for i in 0..n {
        let offset = rng.random_range(0..SIZE / 4096) * 4096;
        let data = vec![(i % 251) as u8 + 1; 4096];
        v.write_at(offset, &data, i % 10 == 0).unwrap();
        if let Some(b) = b {
            // Acknowledged means applied there: no sync, no waiting.
            assert_eq!(
                replica_range(b, vol, offset, 4096),
                data,
                "write {i} at {offset}"
            );
        }
    }
}

#[test]
fn a_sync_write_is_acknowledged_only_once_the_target_applied_it() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.admin().create("wal", SIZE, BLOCK).unwrap();
    a.write("db", 0, 0x42, 1 << 20);
    start_sync_pair(&a, &["db", "wal"], 3_600_000, "suspend");
    wait_until(30, "the pair to go synchronous", || {
        sync_state(&a) == "active"
    });
    assert_eq!(b.content("db"), a.content("db"));

    random_writes(&a, "db", 200, Some(&b));
    random_writes(&a, "wal", 50, Some(&b));
    let v = a.svc().registry().require("wal").unwrap();
    v.trim(BLOCK, BLOCK, true).unwrap();
    v.flush().unwrap();
    assert_eq!(b.content("wal"), a.content("wal"));
    assert_eq!(b.content("db"), a.content("db"));
    let st = a.pair_status();
    assert!(st["syncWrites"].as_u64().unwrap() >= 251, "{st}");

    // Through the NBD export: 32 concurrent writes from qemu-io, then a flush.
    let addr = a.svc().tcp_addr().unwrap();
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", &format!("nbd://{addr}/db")]);
    for i in 0..32u64 {
        cmd.args([
            "-c",
            &format!("aio_write -P {} {} 65536", 0x10 + i, (64 + 2 * i) * BLOCK),
        ]);
    }
    cmd.args(["-c", "aio_flush"]);
    let out = cmd.output().expect("qemu-io runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.content("db"), a.content("db"));
    assert_eq!(replica_range(&b, "db", 64 * BLOCK, 4), vec![0x10; 4]);

    // `replicate sync` in sync mode marks a generation complete at the target without data.
    let raw = st["bytesRaw"].as_u64().unwrap();
    let st = sync(&a, &["db", "wal"]).unwrap();
    assert_eq!(st["bytesRaw"].as_u64().unwrap(), raw, "{st}");
    let gen = st["lastCompleteGeneration"].as_u64().unwrap();
    let rep = b.svc().registry().require("db").unwrap().replica().unwrap();
    assert_eq!(rep.last_complete_generation, gen);

    // Stopping a synchronous pair records what the target holds as a complete generation: the
    // write after the last mark is in it, and the target says so.
    a.write("db", 3 * BLOCK, 0x77, 4096);
    let stopped = a
        .admin()
        .replicate(ControlRequest::ReplicateStop {
            volumes: vec!["db".into()],
            to: None,
        })
        .unwrap();
    let last = a
        .svc()
        .registry()
        .require("db")
        .unwrap()
        .meta()
        .open_generation;
    let rep = b.svc().registry().require("db").unwrap().replica().unwrap();
    assert_eq!(rep.last_complete_generation, last - 1, "{stopped}");
    assert_eq!(stopped["lastCompleteGeneration"].as_u64(), Some(last - 1));
    assert_eq!(b.content("db"), a.content("db"));
}

#[test]
fn suspend_goes_on_locally_then_resyncs_only_what_changed() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let mut b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write("db", 0, 0x42, SIZE as usize);
    start_sync_pair(&a, &["db"], 3_600_000, "suspend");
    wait_until(30, "the pair to go synchronous", || {
        sync_state(&a) == "active"
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut events = sites.a.subscribe(&rt, "ferry.events.site-a.>");

    b.stop();
    let t = std::time::Instant::now();
    a.write("db", 3 * BLOCK, 0x77, 4096);
    a.write("db", 9 * BLOCK, 0x78, 4096);
    assert!(
        t.elapsed().as_secs() < 10,
        "writes went on without the target"
    );
    wait_until(10, "the pair to say it is suspended", || {
        sync_state(&a) == "suspended"
    });
    let event = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), events.1.next())
            .await
            .expect("an event within 5 s")
            .unwrap()
    });
    assert_eq!(
        event.subject.as_str(),
        "ferry.events.site-a.replication.suspended"
    );
    let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(body["data"]["target"], "site-b", "{body}");
    let raw = a.pair_status()["bytesRaw"].as_u64().unwrap();

    b.restart();
    wait_until(30, "the pair to be synchronous again", || {
        sync_state(&a) == "active"
    });
    assert_eq!(b.content("db"), a.content("db"));
    let st = a.pair_status();
    let resent = st["bytesRaw"].as_u64().unwrap() - raw;
    assert!(
        resent <= 4 * BLOCK,
        "the resync sent {resent} bytes for two changed blocks: {st}"
    );
    assert_eq!(st["suspensions"], 1, "{st}");
    random_writes(&a, "db", 20, Some(&b));
    // The subscription unsubscribes on drop, which needs its runtime.
    rt.block_on(async move { drop(events) });
}

#[test]
fn block_fails_writes_with_eio_after_its_timeout_and_loses_none() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let mut b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    start_sync_pair(&a, &["db"], 3_600_000, "block");
    wait_until(30, "the pair to go synchronous", || {
        sync_state(&a) == "active"
    });

    b.stop();
    let vol = a.svc().registry().require("db").unwrap();
    let t = std::time::Instant::now();
    let e = vol.write_at(5 * BLOCK, &[0x66; 4096], false).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(e.code(), "ERR_IO", "{e}");
    assert_eq!(e.nbd_errno(), 5, "the NBD client sees EIO");
    assert!(e.to_string().contains("site-b"), "{e}");
    assert!(
        waited.as_millis() >= 2500,
        "the write waited only {waited:?}"
    );
    // Later writes fail at once until sync is back.
    let e = vol.write_at(6 * BLOCK, &[0x67; 4096], false).unwrap_err();
    assert_eq!(e.code(), "ERR_IO", "{e}");

    b.restart();
    wait_until(30, "the pair to be synchronous again", || {
        sync_state(&a) == "active"
    });
    // The failed writes were kept at A and tracked: the resync brought them over.
    assert_eq!(b.content("db"), a.content("db"));
    assert_eq!(replica_range(&b, "db", 5 * BLOCK, 4096), vec![0x66; 4096]);
    random_writes(&a, "db", 20, Some(&b));
}

/// `--peer-nats`: site A's service connects to B's server as user `peer` and sends its
/// replication traffic there. With the leafnode link cut, only that route is left, so a full sync
/// and acknowledged sync writes prove it carries frames, control messages and sync changes.
#[test]
fn a_direct_route_to_the_target_sites_server_carries_the_pair_without_the_leafnode_link() {
    let sites = TwoSites::start_partitionable();
    let peers = [format!("site-b={}", sites.b.peer_url())];
    let a = Site::start_with_peers("site-a", "eu-es", sites.a.url(), &[], &peers);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write("db", 0, 0x42, 2 << 20);
    sites.partition();
    start_sync_pair(&a, &["db"], 3_600_000, "block");
    wait_until(
        30,
        "the pair to go synchronous over the direct route",
        || sync_state(&a) == "active",
    );
    assert_eq!(a.pair_status()["route"], "direct");
    assert_eq!(b.content("db"), a.content("db"));
    random_writes(&a, "db", 100, Some(&b));
    assert_eq!(b.content("db"), a.content("db"));
    sites.heal();
}

/// A peer nothing answers for: the service starts all the same, and the pair takes the leafnode
/// route (and says so) while the direct connection is down.
#[test]
fn a_peer_that_cannot_be_reached_leaves_the_pair_on_the_leafnode_route() {
    let sites = TwoSites::start();
    let port = support::nats_sites::free_port();
    let peers = [format!("site-b=nats://peer:nothing@127.0.0.1:{port}")];
    let a = Site::start_with_peers("site-a", "eu-es", sites.a.url(), &[], &peers);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    start_sync_pair(&a, &["db"], 3_600_000, "block");
    wait_until(30, "the pair to go synchronous", || {
        sync_state(&a) == "active"
    });
    assert_eq!(a.pair_status()["route"], "leafnode");
    random_writes(&a, "db", 20, Some(&b));
}

#[test]
fn peers_that_are_not_site_equals_nats_url_are_refused_before_anything_starts() {
    let sites = TwoSites::start();
    let dir = tempfile::tempdir().unwrap();
    for (peer, says) in [
        ("site-b", "is not SITE=URL"),
        ("site b=nats://127.0.0.1:1", "must be 1-64 characters"),
        ("site-b=http://127.0.0.1:1", "is not a NATS URL"),
        ("site-a=nats://127.0.0.1:1", "names this site (site-a)"),
    ] {
        let e = ferry_dataplane::service::VolumeService::start(
            ferry_dataplane::service::ServeOptions {
                data_dir: dir.path().to_path_buf(),
                listen: Some("127.0.0.1:0".into()),
                site: Some("site-a".into()),
                region: Some("eu-es".into()),
                nats: Some(sites.a.url()),
                peers: vec![peer.into()],
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("peer '{peer}' was accepted"));
        assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{peer}: {e}");
        assert!(e.to_string().contains(says), "{peer}: {e}");
    }
}
