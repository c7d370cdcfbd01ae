//! Resuming: an interrupted transfer goes on from the target's progress map after the source or
//! the target restarts, instead of starting over — and what the target exposes meanwhile is
//! still its last complete generation. Shipping is rate-limited so the tests can stop a side
//! mid-transfer.

mod support;

use rand::RngCore;
use support::nats_sites::TwoSites;
use support::sites::{start_pair_limited, sync, wait_until, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;
/// Bytes per second on the wire: incompressible data of `SIZE` takes about four seconds.
const RATE: u64 = 16 * MIB;

fn random(len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rand::rng().fill_bytes(&mut v);
    v
}

fn raw(site: &Site) -> u64 {
    site.pair_status()["bytesRaw"].as_u64().unwrap()
}

#[test]
fn an_interrupted_initial_sync_resumes_after_the_source_restarts() {
    const SIZE: u64 = 64 * MIB;
    let sites = TwoSites::start();
    let mut a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write_bytes("db", 0, &random(SIZE));
    start_pair_limited(&a, &["db"], 3_600_000, Some(RATE));
    wait_until(60, "half the volume shipped", || raw(&a) >= SIZE / 2);
    // Block 1 went out already; changing it now means the target's copy is stale.
    a.write("db", BLOCK, 0x11, 4096);
    a.stop();

    let replica = b.svc().registry().require("db").unwrap();
    let held = replica
        .applying()
        .expect("the target keeps the interrupted generation")
        .progress()
        .applied
        .dirty_bytes();
    assert!(held >= SIZE / 4, "the target holds only {held} bytes");
    let mut head = vec![1u8; 4096];
    replica.read_at(0, &mut head).unwrap();
    assert!(
        head.iter().all(|b| *b == 0),
        "an incomplete first generation reads as zeroes"
    );

    a.restart();
    let st = sync(&a, &["db"]).unwrap();
    assert_eq!(
        b.content("db"),
        a.content("db"),
        "the replica equals the source"
    );
    let shipped = st["bytesRaw"].as_u64().unwrap();
    assert!(
        shipped <= SIZE - held + 4 * BLOCK,
        "after the restart {shipped} bytes were shipped; the target already held {held} of {SIZE}"
    );
    assert!(replica.applying().is_none());
}

#[test]
fn an_interrupted_delta_resumes_after_the_target_restarts() {
    const SIZE: u64 = 32 * MIB;
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let mut b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write_bytes("db", 0, &random(SIZE));
    start_pair_limited(&a, &["db"], 3_600_000, Some(RATE));
    sync(&a, &["db"]).unwrap();
    let first = a.content("db");
    assert_eq!(b.content("db"), first);
    let before = raw(&a);

    // A delta of the whole volume, interrupted by the target's restart half-way.
    a.write_bytes("db", 0, &random(SIZE));
    let second = a.content("db");
    let waiter = {
        let dir = a.dir.path().to_path_buf();
        std::thread::spawn(move || {
            // Runs the delta; fails when the target goes away.
            let _ = ferry_dataplane::admin::Admin::open(&dir)
                .unwrap()
                .replicate(ferry_dataplane::control::ControlRequest::ReplicateSync {
                    volumes: vec!["db".into()],
                    to: None,
                });
        })
    };
    wait_until(60, "half the delta shipped", || {
        raw(&a) >= before + SIZE / 2
    });
    b.stop();
    waiter.join().unwrap();
    b.restart();

    // The restarted target took the transaction up again, and still shows generation one.
    let replica = b.svc().registry().require("db").unwrap();
    let held = replica
        .applying()
        .expect("the interrupted delta is kept across the restart")
        .progress()
        .applied
        .dirty_bytes();
    assert!(held >= SIZE / 4, "the target kept only {held} bytes");
    assert!(
        b.content("db") == first,
        "the replica shows its last complete generation"
    );

    sync(&a, &["db"]).unwrap();
    assert!(b.content("db") == second, "the replica equals the source");
    let delta = raw(&a) - before;
    assert!(
        delta <= SIZE + 4 * MIB,
        "the delta of {SIZE} bytes took {delta} bytes: it restarted instead of resuming"
    );
}
