//! Recovery points at the target: each applied generation's undo journal is kept, so the replica
//! can be promoted at an earlier complete generation — every volume of the group at the same
//! instant — and the count kept is bounded.

mod support;

use ferry_dataplane::control::ControlRequest;
use support::nats_sites::TwoSites;
use support::sites::{start_pair, sync, Site};

const MIB: u64 = 1 << 20;

fn points(b: &Site, vols: &[&str]) -> serde_json::Value {
    b.admin()
        .replicate(ControlRequest::ReplicaPoints {
            volumes: vols.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
}

#[test]
fn a_group_can_be_promoted_at_an_earlier_recovery_point() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("db", 8 * MIB, 65536).unwrap();
    a.admin().create("wal", 4 * MIB, 65536).unwrap();
    start_pair(&a, &["db", "wal"], 3_600_000);
    // Five generations, each changing a different part (and some of the same blocks).
    let mut states = Vec::new();
    for i in 0..5u8 {
        a.write("db", i as u64 * MIB, 0x10 + i, (MIB / 2) as usize);
        a.write("db", 7 * MIB, 0x20 + i, 4096);
        a.write("wal", i as u64 * 65536, 0x30 + i, 65536);
        sync(&a, &["db", "wal"]).unwrap();
        states.push((a.content("db"), a.content("wal")));
    }
    // The default keeps three: the last complete generation and two before it.
    let p = points(&b, &["db", "wal"]);
    let db = p[0]["points"].as_array().unwrap();
    assert_eq!(db.len(), 3, "{p}");
    assert_eq!(db[0]["back"], 0);
    assert!(
        db[0]["generation"].as_u64() > db[1]["generation"].as_u64(),
        "{p}"
    );
    let kept = std::fs::read_dir(b.dir.path().join("volumes/db/points"))
        .unwrap()
        .count();
    assert_eq!(kept, 2, "one undo journal per point before the last");

    // Too far back is refused, and nothing changes.
    let e = b
        .admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: vec!["db".into(), "wal".into()],
            back: Some(3),
        })
        .unwrap_err();
    assert!(e.to_string().contains("keeps 2 recovery point(s)"), "{e}");
    assert!(b.content("db") == states[4].0);

    // Two back: both volumes as they were after the third sync, and writable.
    a.admin()
        .replicate(ControlRequest::ReplicateStop {
            volumes: vec!["db".into()],
        })
        .unwrap();
    let r = b
        .admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: vec!["db".into(), "wal".into()],
            back: Some(2),
        })
        .unwrap();
    assert_eq!(r[0]["generation"], db[2]["generation"], "{r}");
    assert!(b.content("db") == states[2].0, "db is at the third sync");
    assert!(
        b.content("wal") == states[2].1,
        "wal is at the same instant"
    );
    b.write("db", 0, 0x99, 4096);
    assert!(!b
        .dir
        .path()
        .join("volumes/db/points")
        .read_dir()
        .unwrap()
        .any(|_| true));
}
