//! Faults in the network between two sites, with both volume services running through them: the
//! target site's nats-server crashes and comes back, the leafnode link between the sites is cut
//! and restored. An async pair must get over each by itself, end with a replica equal to the
//! source, and resume its interrupted transfer from the target's progress map instead of starting
//! over; a synchronous `suspend` pair must never fail a write, go suspended, and come back to
//! synchronous once the target is reachable again.

mod support;

use futures_util::StreamExt;
use rand::{Rng, RngCore};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::nats_sites::TwoSites;
use support::sites::{start_pair_limited, start_sync_pair, sync, wait_until, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;
/// An initial sync of `SIZE` incompressible bytes at `RATE` takes about four seconds.
const SIZE: u64 = 32 * MIB;
const RATE: u64 = 8 * MIB;

fn random(len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rand::rng().fill_bytes(&mut v);
    v
}

fn raw(site: &Site) -> u64 {
    site.pair_status()["bytesRaw"].as_u64().unwrap()
}

fn state(st: &Value) -> String {
    st["state"].as_str().unwrap_or("").to_string()
}

/// Poll the pair every 20 ms until `done` holds of its status, and return that status. On
/// timeout, the panic lists every state the pair was seen in (with its error, if any).
fn watch_pair(a: &Site, secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let st = a.pair_status();
        let mut label = state(&st);
        if let Some(s) = st["syncState"].as_str() {
            label = format!("{label} ({s})");
        }
        if let Some(e) = st["lastError"].as_str() {
            label = format!("{label}: {e}");
        }
        if seen.last() != Some(&label) {
            seen.push(label);
        }
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}; states seen: {seen:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn complete(st: &Value) -> bool {
    st["lastCompleteGeneration"].as_u64().is_some() && state(st) == "idle"
}

/// A rate-limited initial sync of random data to site B, running; returns the two services once
/// half of it is shipped.
fn half_way_through_an_initial_sync(sites: &TwoSites) -> (Site, Site) {
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write_bytes("db", 0, &random(SIZE));
    // The interval is long: only the first cycle and its retries run, nothing hides a restart.
    start_pair_limited(&a, &["db"], 3_600_000, Some(RATE));
    wait_until(60, "half the volume shipped", || raw(&a) >= SIZE / 2);
    (a, b)
}

/// What the target holds of the generation it is applying, in bytes.
fn held(b: &Site) -> u64 {
    b.svc()
        .registry()
        .require("db")
        .unwrap()
        .applying()
        .expect("the target keeps the interrupted generation")
        .progress()
        .applied
        .dirty_bytes()
}

/// The pair finished by itself: one generation, equal at both sites, and — since the target kept
/// what it had applied — no more than one volume's worth of bytes shipped in all.
fn assert_resumed(a: &Site, b: &Site, st: &Value, shipped_before_fault: u64) {
    assert_eq!(st["generationsShipped"], 1, "{st}");
    assert!(st["lastError"].is_null(), "{st}");
    assert!(
        b.content("db") == a.content("db"),
        "the replica differs from the source"
    );
    assert!(b
        .svc()
        .registry()
        .require("db")
        .unwrap()
        .applying()
        .is_none());
    let total = st["bytesRaw"].as_u64().unwrap();
    // Starting over would have shipped `shipped_before_fault` (≥ half) plus the whole volume.
    // Resuming resends at most the blocks the interruption left applied in part.
    assert!(
        total <= SIZE + 4 * BLOCK,
        "{total} bytes shipped in all for a volume of {SIZE}, {shipped_before_fault} of them \
         before the fault: the transfer restarted instead of resuming"
    );
}

#[test]
fn an_initial_sync_gets_over_a_crash_of_the_target_sites_nats_server() {
    let mut sites = TwoSites::start();
    let (a, b) = half_way_through_an_initial_sync(&sites);
    let before = raw(&a);

    sites.b.kill();
    // Restarted only once the pair has felt it: a restart between two frames of the rate-limited
    // transfer could otherwise go unnoticed, and test nothing.
    let st = watch_pair(&a, 30, "the pair to notice the crash", |st| {
        state(st) == "error"
    });
    assert!(
        st["lastError"].as_str().unwrap_or("").contains("site-b"),
        "{st}"
    );
    sites.b.start();
    let st = watch_pair(&a, 40, "the pair to complete by itself", complete);
    assert_resumed(&a, &b, &st, before);
}

#[test]
fn an_initial_sync_gets_over_a_cut_of_the_link_between_the_sites() {
    let sites = TwoSites::start_partitionable();
    let (a, b) = half_way_through_an_initial_sync(&sites);
    let before = raw(&a);

    sites.partition();
    let st = watch_pair(&a, 30, "the pair to notice the cut", |st| {
        state(st) == "error"
    });
    assert!(
        st["lastError"].as_str().unwrap_or("").contains("site-b"),
        "{st}"
    );
    // Cut off, B keeps what it applied, and still shows none of it: the first generation is
    // not complete.
    assert!(held(&b) >= SIZE / 4, "site-b holds only {} bytes", held(&b));
    let replica = b.svc().registry().require("db").unwrap();
    let mut head = vec![1u8; 1 << 20];
    replica.read_at(0, &mut head).unwrap();
    assert!(
        head.iter().all(|b| *b == 0),
        "an incomplete first generation reads as zeroes"
    );

    sites.heal();
    let st = watch_pair(&a, 40, "the pair to complete by itself", complete);
    assert_resumed(&a, &b, &st, before);
}

fn sync_state(a: &Site) -> String {
    a.pair_status()["syncState"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn sync_writes(a: &Site) -> u64 {
    a.pair_status()["syncWrites"].as_u64().unwrap()
}

/// What the writer thread did.
#[derive(Default)]
struct Writes {
    count: u64,
    failures: Vec<String>,
    slowest: Duration,
}

/// Tells the writer to stop when the test ends, also when it fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn sync_writes_go_on_while_the_target_sites_nats_server_is_down_and_restarts() {
    const SIZE: u64 = 16 * MIB;
    let mut sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", SIZE, BLOCK).unwrap();
    a.write_bytes("db", 0, &random(4 * MIB));
    start_sync_pair(&a, &["db"], 3_600_000, "suspend");
    wait_until(30, "the pair to go synchronous", || {
        sync_state(&a) == "active"
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The subscription unsubscribes on drop, which needs its runtime: also when a failed
    // assertion drops it.
    let _in_runtime = rt.enter();
    let (_events_client, mut events) = sites.a.subscribe(&rt, "ferry.events.site-a.>");

    // A writer that never stops on its own: 4 KiB at random places, one in 16 with FUA.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let vol = a.svc().registry().require("db").unwrap();
        let (stop, progress) = (stop.0.clone(), progress.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut w = Writes::default();
            while !stop.load(Ordering::Relaxed) {
                let offset = rng.random_range(0..SIZE / 4096) * 4096;
                let data = vec![(w.count % 251) as u8 + 1; 4096];
                let t = Instant::now();
                if let Err(e) = vol.write_at(offset, &data, w.count % 16 == 0) {
                    w.failures
                        .push(format!("write {} at {offset}: {e}", w.count));
                }
                w.slowest = w.slowest.max(t.elapsed());
                w.count += 1;
                progress.store(w.count, Ordering::Relaxed);
                // Pacing, so that the local-only writes of a suspension do not take a core.
                std::thread::sleep(Duration::from_millis(1));
            }
            w
        })
    };
    let writes_before = sync_writes(&a);
    wait_until(10, "synchronous writes before the fault", || {
        sync_writes(&a) >= writes_before + 20
    });

    // Started again only once the pair has suspended: a restart quick enough to lose no message
    // is absorbed (the write in flight waits for its acknowledgement, which B's client sends once
    // it has reconnected), and would test nothing.
    sites.b.stop();
    let written = progress.load(Ordering::Relaxed);
    watch_pair(&a, 20, "the pair to suspend", |st| {
        st["suspensions"].as_u64().unwrap_or(0) >= 1
    });
    wait_until(10, "writes to go on while suspended", || {
        progress.load(Ordering::Relaxed) >= written + 100
    });
    sites.b.start();
    watch_pair(&a, 30, "the pair to be synchronous again", |st| {
        st["syncState"] == "active"
    });
    let writes_after = sync_writes(&a);
    wait_until(10, "synchronous writes after the fault", || {
        sync_writes(&a) >= writes_after + 20
    });
    stop.0.store(true, Ordering::Relaxed);
    let w = writer.join().unwrap();

    assert!(
        w.failures.is_empty(),
        "{} of {} writes failed: {:#?}",
        w.failures.len(),
        w.count,
        &w.failures[..w.failures.len().min(5)]
    );
    // A suspension waits at most one acknowledgement timeout (2 s); far longer is a hang.
    assert!(
        w.slowest < Duration::from_secs(10),
        "a write took {:?}",
        w.slowest
    );
    let st = sync(&a, &["db"]).unwrap();
    assert_eq!(st["suspensions"], 1, "{st}");
    assert_eq!(st["syncState"], "active", "{st}");
    assert!(
        b.content("db") == a.content("db"),
        "the replica differs from the source after {} writes",
        w.count
    );

    let kinds: Vec<String> = rt.block_on(async {
        let mut kinds = Vec::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), events.next()).await
        {
            kinds.push(m.subject.to_string());
        }
        kinds
    });
    assert_eq!(
        kinds,
        [
            "ferry.events.site-a.replication.suspended",
            "ferry.events.site-a.replication.resumed"
        ]
    );
}
