//! Recovery points at the target: each applied generation's undo journal is kept, so the replica
//! can be promoted at an earlier complete generation — every volume of the group at the same
//! instant — and the count kept is bounded.

mod support;

use ferry_dataplane::control::ControlRequest;
use support::nats_sites::TwoSites;
use support::sites::{start_pair, start_request, sync, wait_until, Site};

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
            to: None,
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

/// The replica's last complete generation (0: none, or no replica yet).
fn last_complete(b: &Site, vol: &str) -> u64 {
    b.admin()
        .replicate(ControlRequest::ReplicaPoints {
            volumes: vec![vol.to_string()],
        })
        .map_or(0, |p| p[0]["points"][0]["generation"].as_u64().unwrap_or(0))
}

/// An unscheduled pair cuts only when asked (the orchestrator's quiesce/capture cycle): the cut
/// is answered at once with each volume's generation, which then ships; points older than the
/// pair's age limit are dropped at the target.
#[test]
fn unscheduled_pairs_cut_on_request_and_points_age_out() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("app", 4 * MIB, 65536).unwrap();
    let mut req = start_request(&["app"], "site-b", "async", 200);
    if let ControlRequest::ReplicateStart {
        scheduled,
        recovery_points,
        points_max_age_ms,
        ..
    } = &mut req
    {
        *scheduled = Some(false);
        *recovery_points = Some(10);
        *points_max_age_ms = Some(2_000);
    }
    a.admin().replicate(req).unwrap();
    // The first full copy starts by itself.
    wait_until(20, "first full copy", || last_complete(&b, "app") > 0);
    let first = last_complete(&b, "app");

    // Nothing is cut without a request, however long the interval has passed.
    a.write("app", 0, 0x11, 65536);
    std::thread::sleep(std::time::Duration::from_millis(1_000));
    assert_eq!(last_complete(&b, "app"), first, "no cut was asked for");

    let cut = |a: &Site| {
        let r = a
            .admin()
            .replicate(ControlRequest::ReplicateCut {
                volumes: vec!["app".into()],
                to: None,
            })
            .unwrap();
        assert_eq!(r["volumes"][0]["name"], "app", "{r}");
        r["volumes"][0]["generation"].as_u64().unwrap()
    };
    let g = cut(&a);
    assert!(g > first, "a new generation: {g} after {first}");
    wait_until(20, "the cut ships", || last_complete(&b, "app") == g);
    assert!(b.content("app") == a.content("app"));

    // Three more points; then, past the age limit, one more cut drops all older ones.
    for i in 0..3u8 {
        a.write("app", MIB, 0x20 + i, 4096);
        let g = cut(&a);
        wait_until(20, "the cut ships", || last_complete(&b, "app") == g);
    }
    assert_eq!(
        points(&b, &["app"])[0]["points"].as_array().unwrap().len(),
        5
    );
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let g = cut(&a);
    wait_until(20, "the cut ships", || last_complete(&b, "app") == g);
    let p = points(&b, &["app"]);
    let kept: Vec<u64> = p[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["generation"].as_u64().unwrap())
        .collect();
    // The newest point, and the one before it (completed just now, when it became the base).
    assert!(
        kept.len() <= 2 && kept[0] == g,
        "older points aged out: {p}"
    );

    // Asking a pair that does not exist says which volumes and what to do.
    let e = a
        .admin()
        .replicate(ControlRequest::ReplicateCut {
            volumes: vec!["nope".into()],
            to: None,
        })
        .unwrap_err();
    assert!(e.to_string().contains("no replication pair holds"), "{e}");
}
