//! Failover and failback with `reverse`: after B is promoted, replicating back B→A sends only
//! the union of what A changed after the last generation B got and what B changed since its
//! promotion — then back again A→B the same way — and each time the copies end up equal.

mod support;

use ferry_dataplane::control::ControlRequest;
use serde_json::Value;
use support::nats_sites::TwoSites;
use support::sites::{start_pair, start_request, sync, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;

fn vols() -> Vec<String> {
    vec!["db".into(), "wal".into()]
}

fn promote(site: &Site) -> Value {
    site.admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: vols(),
            back: None,
        })
        .unwrap()
}

fn stop(site: &Site) {
    site.admin()
        .replicate(ControlRequest::ReplicateStop {
            volumes: vols(),
            to: None,
        })
        .unwrap();
}

fn reverse(site: &Site, to: &str) -> ferry_dataplane::Result<Value> {
    let mut req = start_request(&["db", "wal"], to, "async", 3_600_000);
    if let ControlRequest::ReplicateStart { reverse, .. } = &mut req {
        *reverse = Some(true);
    }
    site.admin().replicate(req)
}

fn raw(site: &Site) -> u64 {
    site.pair_status()["bytesRaw"].as_u64().unwrap()
}

fn same(a: &Site, b: &Site) {
    for v in ["db", "wal"] {
        assert!(
            a.content(v) == b.content(v),
            "'{v}' differs between the sites"
        );
    }
}

/// Two sites and a group `db` + `wal` at A, replicated to B once (one complete generation).
fn replicated_group() -> (TwoSites, Site, Site) {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", 16 * MIB, BLOCK).unwrap();
    a.admin().create("wal", 4 * MIB, BLOCK).unwrap();
    a.write("db", 0, 0x11, (16 * MIB) as usize);
    a.write("wal", 0, 0x12, (4 * MIB) as usize);
    start_pair(&a, &["db", "wal"], 3_600_000);
    sync(&a, &["db", "wal"]).unwrap();
    same(&a, &b);
    (sites, a, b)
}

#[test]
fn failover_reverse_and_failback_send_only_what_changed() {
    let (_sites, mut a, b) = replicated_group();

    // A writes two blocks that never reach B, then site A goes down.
    a.write("db", 3 * BLOCK, 0xa1, 4096);
    a.write("wal", 5 * BLOCK, 0xa2, 4096);
    a.stop();

    // Failover: B takes over at its last complete generation and writes three blocks.
    let p = promote(&b);
    assert_eq!(p.as_array().unwrap().len(), 2, "{p}");
    b.write("db", 3 * BLOCK, 0xb1, 100); // the same block A changed
    b.write("db", 10 * BLOCK, 0xb2, 4096);
    b.write("wal", 0, 0xb3, 4096);

    // A comes back. Reverse is refused while A's own pair still ships these volumes.
    a.restart();
    let e = reverse(&b, "site-a").and_then(|_| sync(&b, &["db", "wal"]));
    let e = e.unwrap_err();
    assert!(e.to_string().contains("stop that pair"), "{e}");
    stop(&a);
    b.admin()
        .replicate(ControlRequest::ReplicateStop {
            volumes: vols(),
            to: None,
        })
        .unwrap();

    // Reverse: the union of A's 2 and B's 3 changed blocks (4 distinct), not 20 MiB.
    reverse(&b, "site-a").unwrap();
    sync(&b, &["db", "wal"]).unwrap();
    same(&a, &b);
    assert_eq!(raw(&b), 4 * BLOCK, "{}", b.pair_status());
    let e = a.try_write("db", 0, &[1]).unwrap_err();
    assert_eq!(e.code(), "ERR_READ_ONLY", "A is now B's replica");

    // Delta replication B→A goes on as usual.
    b.write("db", 12 * BLOCK, 0xb4, 4096);
    sync(&b, &["db", "wal"]).unwrap();
    same(&a, &b);
    assert_eq!(raw(&b), 5 * BLOCK);

    // Failback (planned): stop at B, promote A, A writes one block, reverse A→B.
    stop(&b);
    promote(&a);
    a.write("wal", 7 * BLOCK, 0xa3, 4096);
    reverse(&a, "site-b").unwrap();
    sync(&a, &["db", "wal"]).unwrap();
    same(&a, &b);
    assert_eq!(
        raw(&a),
        BLOCK,
        "only A's one change goes back: {}",
        a.pair_status()
    );
}

#[test]
fn reverse_needs_a_promoted_volume() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let _b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", MIB, BLOCK).unwrap();
    a.admin().create("wal", MIB, BLOCK).unwrap();
    let e = reverse(&a, "site-b").unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(
        e.to_string().contains("was not promoted from site site-b"),
        "{e}"
    );
}

/// When the former source's history no longer proves what both copies shared (here: more cuts
/// than it keeps generations), every block counts as diverged — and block hashes decide what is
/// actually sent: only what differs, never a trusted bitmap.
#[test]
fn reverse_without_provable_history_ships_only_blocks_whose_hashes_differ() {
    let (_sites, mut a, b) = replicated_group();
    a.write("db", 3 * BLOCK, 0xa1, 4096);
    a.write("wal", 5 * BLOCK, 0xa2, 4096);
    stop(&a);
    for _ in 0..12 {
        a.admin().cut(&vols()).unwrap();
    }
    a.stop();
    promote(&b);
    b.write("db", 9 * BLOCK, 0xb1, 4096);
    a.restart();

    reverse(&b, "site-a").unwrap();
    sync(&b, &["db", "wal"]).unwrap();
    same(&a, &b);
    assert_eq!(raw(&b), 3 * BLOCK, "{}", b.pair_status());
}
