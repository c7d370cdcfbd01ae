//! Recovery operations of the orchestrator against two real sites: the fence of a planned
//! migration (no acknowledged write can be lost: a connected client's writes are refused, across
//! a restart, until `reverse` turns the volume into a replica) and replica clones for DR drills
//! (a clone holds exactly what the source held at a generation, while replication goes on).

mod support;

use ferry_dataplane::control::ControlRequest;
use ferry_dataplane::nbd::client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use support::nats_sites::TwoSites;
use support::sites::{start_pair, start_request, sync, wait_until, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn fence(site: &Site, vols: &[&str], fenced: bool) -> ferry_dataplane::Result<Value> {
    site.admin().replicate(ControlRequest::Fence {
        volumes: strings(vols),
        fenced,
    })
}

fn clone(
    site: &Site,
    vols: &[&str],
    back: usize,
    names: &[&str],
) -> ferry_dataplane::Result<Value> {
    site.admin().replicate(ControlRequest::ReplicaClone {
        volumes: strings(vols),
        back: Some(back),
        names: strings(names),
    })
}

fn info(site: &Site, vol: &str) -> Value {
    let list = serde_json::to_value(site.admin().list().unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vol)
        .cloned()
        .unwrap_or(Value::Null)
}

fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[test]
fn a_planned_migration_fences_the_source_until_reverse_demotes_it() {
    let sites = TwoSites::start();
    let mut a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", 4 * MIB, BLOCK).unwrap();
    start_pair(&a, &["db"], 3_600_000);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let uri = format!("nbd://{}/db", a.svc().tcp_addr().unwrap());
    let nbd = rt.block_on(client::connect(&uri, &[])).unwrap();
    rt.block_on(nbd.write(0, &[0x11; 4096])).unwrap();

    assert_eq!(
        fence(&a, &["db"], true).unwrap(),
        json!([{ "volume": "db", "fenced": true }])
    );
    assert_eq!(
        fence(&a, &["db"], true).unwrap()[0]["fenced"],
        true,
        "idempotent"
    );
    // The client connected before the fence: its next write, trim and zeroing are refused.
    for e in [
        rt.block_on(nbd.write(BLOCK, &[0x22; 4096])).unwrap_err(),
        rt.block_on(nbd.trim(0, 4096)).unwrap_err(),
        rt.block_on(nbd.write_zeroes(0, 4096, false)).unwrap_err(),
    ] {
        match &e {
            ferry_dataplane::Error::ServerError { errno, message, .. } => {
                assert_eq!(*errno, ferry_dataplane::nbd::proto::EPERM, "{e}");
                assert!(message.contains("fenced for a planned migration"), "{e}");
                assert!(
                    message.contains(r#""fenced":false"#),
                    "says how to lift it: {e}"
                );
            }
            other => panic!("expected EPERM from the server, got {other}"),
        }
    }
    assert_eq!(
        rt.block_on(nbd.read(0, 4096)).unwrap(),
        vec![0x11; 4096],
        "reads go on"
    );
    assert_eq!(info(&a, "db")["fenced"], true);
    // The last changes still ship: B gets everything acknowledged before the fence.
    sync(&a, &["db"]).unwrap();
    assert!(a.content("db") == b.content("db"));

    // A restart keeps the fence.
    drop(nbd);
    a.stop();
    a.restart();
    assert_eq!(info(&a, "db")["fenced"], true);
    let e = a.try_write("db", 0, &[1]).unwrap_err();
    assert_eq!(e.code(), "ERR_FENCED");

    // A replica cannot be fenced, and a refused call changes nothing.
    let e = fence(&b, &["db"], true).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT");
    assert!(e.to_string().contains("is a replica"), "{e}");
    let e = fence(&a, &["db", "nope"], false).unwrap_err();
    assert_eq!(e.code(), "ERR_UNKNOWN_VOLUME");
    assert_eq!(info(&a, "db")["fenced"], true, "nothing changed");

    // The move: B takes over, and `reverse` makes A's volume B's replica — no longer fenced.
    a.admin()
        .replicate(ControlRequest::ReplicateStop {
            volumes: strings(&["db"]),
            to: None,
        })
        .unwrap();
    b.admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: strings(&["db"]),
            back: None,
        })
        .unwrap();
    let mut req = start_request(&["db"], "site-a", "async", 3_600_000);
    if let ControlRequest::ReplicateStart { reverse, .. } = &mut req {
        *reverse = Some(true);
    }
    b.admin().replicate(req).unwrap();
    sync(&b, &["db"]).unwrap();
    let db = info(&a, "db");
    assert_eq!(
        (db["fenced"].clone(), db["readOnly"].clone()),
        (json!(false), json!(true)),
        "{db}"
    );
    assert_eq!(
        a.try_write("db", 0, &[1]).unwrap_err().code(),
        "ERR_READ_ONLY"
    );
}

/// The source writes and ships generations without pause, remembering what each generation
/// held; meanwhile the target clones its replicas at the last complete generation and one
/// before it.
#[test]
fn clones_hold_a_past_generation_while_replication_goes_on() {
    let sites = TwoSites::start();
    let a = Arc::new(Site::start("site-a", "eu-es", sites.a.url(), &[]));
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", 16 * MIB, BLOCK).unwrap();
    a.admin().create("wal", 4 * MIB, BLOCK).unwrap();
    start_pair(&a, &["db", "wal"], 3_600_000);

    // generation -> checksums of (db, wal) as the source held them at that cut.
    let held: Arc<Mutex<BTreeMap<u64, (u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, held, stop) = (a.clone(), held.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let byte = (i % 250) as u8 + 1;
                a.write("db", (i * 3 % 15) * MIB, byte, MIB as usize);
                a.write("db", 15 * MIB + (i % 16) * BLOCK, byte, 4096);
                if i.is_multiple_of(3) {
                    // A trim: the replica punches holes the clone must not lose.
                    a.svc()
                        .registry()
                        .require("db")
                        .unwrap()
                        .trim(((i + 1) * 3 % 15) * MIB, MIB, false)
                        .unwrap();
                }
                a.write("wal", (i % 64) * BLOCK, byte, BLOCK as usize);
                let sums = (checksum(&a.content("db")), checksum(&a.content("wal")));
                sync(&a, &["db", "wal"]).unwrap();
                let g = *a
                    .svc()
                    .registry()
                    .require("db")
                    .unwrap()
                    .info()
                    .generations
                    .last()
                    .unwrap();
                held.lock().unwrap().insert(g, sums);
                i += 1;
            }
        })
    };
    wait_until(60, "three generations applied at B", || {
        held.lock().unwrap().len() >= 3
    });

    for (back, suffix) in [(0usize, "now"), (1, "before")] {
        let names = [format!("db-{suffix}"), format!("wal-{suffix}")];
        let r = clone(&b, &["db", "wal"], back, &[&names[0], &names[1]]).unwrap();
        let g = r[0]["generation"].as_u64().unwrap();
        assert_eq!(
            r[1]["generation"].as_u64(),
            Some(g),
            "one generation for the group: {r}"
        );
        assert_eq!(r[0]["volume"], "db");
        assert_eq!(r[0]["clone"], names[0].as_str());
        wait_until(60, "the source recorded that generation", || {
            held.lock().unwrap().contains_key(&g)
        });
        let sums = held.lock().unwrap()[&g];
        assert_eq!(
            checksum(&b.content(&names[0])),
            sums.0,
            "db clone at back {back} (gen {g})"
        );
        assert_eq!(
            checksum(&b.content(&names[1])),
            sums.1,
            "wal clone at back {back} (gen {g})"
        );
        let c = info(&b, &names[0]);
        assert_eq!(
            (c["readOnly"].clone(), c.get("replicaOf").cloned()),
            (json!(false), None),
            "{c}"
        );
    }
    // Replication went on meanwhile.
    let before = held.lock().unwrap().len();
    wait_until(60, "more generations after the clones", || {
        held.lock().unwrap().len() > before + 1
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    // A clone is an ordinary volume: writable, exported at once, deletable.
    b.write("db-now", 0, 0x77, 4096);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uri = format!("nbd://{}/db-before", b.svc().tcp_addr().unwrap());
    let nbd = rt.block_on(client::connect(&uri, &[])).unwrap();
    rt.block_on(nbd.write(0, &[0x78; 4096])).unwrap();
    drop(nbd);
    b.admin().delete("db-now").unwrap();
    assert_eq!(info(&b, "db-now"), Value::Null);
}

/// A refused clone request: at which site, of what, how far back, named how; code and text.
type Case<'a> = (
    &'a Site,
    &'a [&'a str],
    usize,
    &'a [&'a str],
    &'a str,
    &'a str,
);

#[test]
fn a_refused_clone_creates_nothing() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", 2 * MIB, BLOCK).unwrap();
    a.admin().create("taken", MIB, BLOCK).unwrap();
    b.admin().create("taken", MIB, BLOCK).unwrap();
    start_pair(&a, &["db"], 3_600_000);
    a.write("db", 0, 0x31, 4096);
    sync(&a, &["db"]).unwrap();
    let names = |s: &Site| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(s.dir.path().join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    let before = (names(&a), names(&b));
    let cases: Vec<Case<'_>> = vec![
        (
            &b,
            &["nope"],
            0,
            &["c"],
            "ERR_UNKNOWN_VOLUME",
            "unknown volume 'nope'",
        ),
        (
            &a,
            &["db"],
            0,
            &["c"],
            "ERR_INVALID_ARGUMENT",
            "volume 'db' is not a replica",
        ),
        (
            &b,
            &["db"],
            0,
            &["taken"],
            "ERR_VOLUME_EXISTS",
            "volume 'taken' already exists",
        ),
        (
            &b,
            &["db"],
            0,
            &["c", "d"],
            "ERR_INVALID_ARGUMENT",
            "1 volume(s) but 2 clone name(s)",
        ),
        (
            &b,
            &["db"],
            3,
            &["c"],
            "ERR_INVALID_ARGUMENT",
            "recovery point(s) before its last complete generation, not 3",
        ),
        (
            &b,
            &["db"],
            0,
            &[".c"],
            "ERR_BAD_NAME",
            "invalid volume name '.c'",
        ),
    ];
    for (site, vols, back, clones, code, text) in cases {
        let e = clone(site, vols, back, clones).unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        assert!(e.to_string().contains(text), "{e}");
    }
    assert_eq!(
        (names(&a), names(&b)),
        before,
        "nothing created, nothing left over"
    );
    // And the same request done right works.
    let r = clone(&b, &["db"], 0, &["c"]).unwrap();
    assert_eq!(
        r,
        json!([{ "volume": "db", "clone": "c", "generation": r[0]["generation"] }])
    );
    assert!(b.content("c") == a.content("db"));
}
