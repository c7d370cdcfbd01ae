//! Async replication of a consistency group between two sites over real nats-servers linked by a
//! leafnode: a full initial sync, then deltas; the target equals the source at every completed
//! generation, a delta ships only what changed, and residency is refused at both ends.

mod support;

use ferry_dataplane::control::ControlRequest;
use support::nats_sites::TwoSites;
use support::sites::{start_pair, start_request, sync, Site};

#[test]
fn group_replicates_full_then_deltas() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &["eu-de"]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    let adm = a.admin();
    adm.create("db", 32 << 20, 65536).unwrap();
    adm.create("logs", 8 << 20, 65536).unwrap();
    a.write("db", 0, 0xab, 1 << 20);
    a.write("db", 20 << 20, 0xcd, 4096);
    a.write("logs", 4096, 0x11, 8192);
    // A long interval: only explicit syncs ship, so what is shipped is predictable.
    start_pair(&a, &["db", "logs"], 3_600_000);
    let st = sync(&a, &["db", "logs"]).unwrap();
    assert_eq!(st["state"], "idle", "{st}");
    assert_eq!(b.content("db"), a.content("db"));
    assert_eq!(b.content("logs"), a.content("logs"));
    let full_raw = st["bytesRaw"].as_u64().unwrap();
    assert_eq!(
        full_raw,
        40 << 20,
        "the initial sync covers both volumes whole"
    );
    assert!(
        st["bytesWire"].as_u64().unwrap() < (4 << 20),
        "holes and repeats compress: {st}"
    );

    // A delta: two 4 KiB writes in different 64 KiB blocks ship two blocks, not the volume.
    a.write("db", 5 << 20, 0x77, 4096);
    a.write("logs", 7 << 20, 0x78, 4096);
    let st = sync(&a, &["db", "logs"]).unwrap();
    assert_eq!(
        st["bytesRaw"].as_u64().unwrap() - full_raw,
        2 * 65536,
        "{st}"
    );
    assert_eq!(b.content("db"), a.content("db"));
    assert_eq!(b.content("logs"), a.content("logs"));
    let replica = b.svc().registry().require("db").unwrap().replica().unwrap();
    assert_eq!(replica.source_site, "site-a");
    assert!(replica.last_complete_generation >= 2);

    // The replica is read-only to clients.
    let e = b.try_write("db", 0, &[1]).unwrap_err();
    assert_eq!(e.code(), "ERR_READ_ONLY");

    // Promote at B: writable at the last complete generation; A's pair is fenced off from then on.
    let promoted = b
        .admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: vec!["db".into(), "logs".into()],
            back: None,
        })
        .unwrap();
    assert_eq!(promoted.as_array().unwrap().len(), 2, "{promoted}");
    b.write("db", 0, 0x99, 4096);
    a.write("db", 1 << 20, 0x55, 4096);
    let e = sync(&a, &["db", "logs"]).unwrap_err();
    assert!(e.to_string().contains("not a replica"), "{e}");
    let e = b
        .admin()
        .replicate(ControlRequest::ReplicatePromote {
            volumes: vec!["db".into()],
            back: None,
        })
        .unwrap_err();
    assert!(e.to_string().contains("is not a replica"), "{e}");

    let status = adm.replicate(ControlRequest::ReplicateStatus).unwrap();
    assert_eq!(status[0]["target"], "site-b");
    assert_eq!(status[0]["volumes"], serde_json::json!(["db", "logs"]));
    adm.replicate(ControlRequest::ReplicateStop {
        volumes: vec!["db".into()],
        to: None,
    })
    .unwrap();
    assert_eq!(
        adm.replicate(ControlRequest::ReplicateStatus).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn residency_is_refused_at_the_source_and_the_target() {
    let sites = TwoSites::start();
    // A may only send to us-east; B is in eu-de.
    let a = Site::start("site-a", "eu-es", sites.a.url(), &["us-east"]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    a.admin().create("secret", 1 << 20, 65536).unwrap();
    a.write("secret", 0, 0x42, 4096);
    start_pair(&a, &["secret"], 3_600_000);
    let e = sync(&a, &["secret"]).unwrap_err();
    assert_eq!(e.code(), "ERR_RESIDENCY", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("secret")
            && msg.contains("site-b")
            && msg.contains("eu-de")
            && msg.contains("us-east"),
        "{msg}"
    );
    assert!(
        b.svc().registry().get("secret").is_none(),
        "nothing was created at the target"
    );
    let st = a
        .admin()
        .replicate(ControlRequest::ReplicateStatus)
        .unwrap();
    assert_eq!(st[0]["bytesRaw"], 0);
    assert_eq!(st[0]["state"], "error");
}

/// Continuous mode under a live write load: the writer stamps block i of `x`, then block i of `y`,
/// with an increasing counter. Every state the target exposes must be one instant of the group:
/// `y`'s stamp never ahead of `x`'s. When the writer stops, one more sync makes them equal.
#[test]
fn continuous_mode_exposes_only_consistent_group_cuts() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    const BLOCKS: u64 = 64;
    const BS: u64 = 65536;
    a.admin().create("x", BLOCKS * BS, BS).unwrap();
    a.admin().create("y", BLOCKS * BS, BS).unwrap();
    start_pair(&a, &["x", "y"], 200);
    let x = a.svc().registry().require("x").unwrap();
    let y = a.svc().registry().require("y").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut v: u64 = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = v % BLOCKS;
                let stamp = v.to_le_bytes().repeat(512);
                x.write_at(i * BS, &stamp, false).unwrap();
                y.write_at(i * BS, &stamp, false).unwrap();
                v += 1;
            }
            v
        })
    };
    let stamps = |vol: &str| -> Vec<u64> {
        let v = b.svc().registry().get(vol);
        let Some(v) = v else {
            return vec![0; BLOCKS as usize];
        };
        (0..BLOCKS)
            .map(|i| {
                let mut buf = [0u8; 8];
                v.read_at(i * BS, &mut buf).unwrap();
                u64::from_le_bytes(buf)
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut checks = 0;
    let mut seen_progress = false;
    while std::time::Instant::now() < deadline {
        // y first: a later state of x can only be further ahead.
        let ys = stamps("y");
        let xs = stamps("x");
        for i in 0..BLOCKS as usize {
            assert!(
                xs[i] >= ys[i],
                "block {i}: y at {} is ahead of x at {}: not one instant",
                ys[i],
                xs[i]
            );
        }
        seen_progress |= ys.iter().any(|s| *s > 0);
        checks += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(
        seen_progress,
        "the target showed no replicated write in 3 s ({checks} checks)"
    );
    sync(&a, &["x", "y"]).unwrap();
    assert_eq!(b.content("x"), a.content("x"));
    assert_eq!(b.content("y"), a.content("y"));
    let st = a
        .admin()
        .replicate(ControlRequest::ReplicateStatus)
        .unwrap();
    assert!(
        st[0]["generationsShipped"].as_u64().unwrap() >= 3,
        "{st} after {written} writes"
    );
}

#[test]
fn pair_settings_are_checked_when_the_pair_starts() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    a.admin().create("db", 1 << 20, 65536).unwrap();
    let mut req = start_request(&["db"], "site-b", "async", 1000);
    if let ControlRequest::ReplicateStart { max_message, .. } = &mut req {
        *max_message = Some(100);
    }
    let e = a.admin().replicate(req).unwrap_err();
    assert_eq!(e.code(), "ERR_INVALID_ARGUMENT", "{e}");
    let mut req = start_request(&["db"], "site-b", "async", 1000);
    if let ControlRequest::ReplicateStart { level, .. } = &mut req {
        *level = Some(25);
    }
    let e = a.admin().replicate(req).unwrap_err();
    assert!(e.to_string().contains("zstd level 25"), "{e}");
    let st = a
        .admin()
        .replicate(ControlRequest::ReplicateStatus)
        .unwrap();
    assert_eq!(st, serde_json::json!([]), "nothing was started");
}

/// A site with several volume services (nodes, `--node`): each pair ships to the node it names,
/// and only that node answers — the other node never sees the replica. Sync pairs too.
#[test]
fn pairs_reach_the_node_they_name_in_a_site_of_several() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b1 = Site::start_node("site-b", "b1", "eu-de", sites.b.url());
    let b2 = Site::start_node("site-b", "b2", "eu-de", sites.b.url());
    let adm = a.admin();
    adm.create("db", 4 << 20, 65536).unwrap();
    adm.create("logs", 4 << 20, 65536).unwrap();
    a.write("db", 0, 0xab, 1 << 20);
    a.write("logs", 4096, 0x11, 8192);
    let to_node = |vols: &[&str], mode: &str, node: &str| {
        let mut req = start_request(vols, "site-b", mode, 3_600_000);
        if let ControlRequest::ReplicateStart { to_node, .. } = &mut req {
            *to_node = Some(node.into());
        }
        adm.replicate(req)
    };
    let st = to_node(&["db"], "async", "b2").unwrap();
    assert_eq!(st["targetNode"], "b2", "{st}");
    to_node(&["logs"], "sync", "b1").unwrap();
    sync(&a, &["db"]).unwrap();
    sync(&a, &["logs"]).unwrap();
    // A synchronous write is at the node's replica when it is acknowledged.
    a.write("logs", 1 << 20, 0x22, 4096);
    assert_eq!(b2.content("db"), a.content("db"));
    assert_eq!(b1.content("logs"), a.content("logs"));
    assert!(
        b1.svc().registry().get("db").is_none(),
        "node b1 holds no replica of db"
    );
    assert!(
        b2.svc().registry().get("logs").is_none(),
        "node b2 holds no replica of logs"
    );

    // Bad node names are refused before anything starts, with what to use instead.
    let e = to_node(&["db"], "async", "b.2").unwrap_err();
    assert!(e.to_string().contains("not a valid node name"), "{e}");
    // The pair of db ships to b2; asking for it at b1 is refused until it is stopped.
    let e = to_node(&["db"], "async", "b1").unwrap_err();
    assert_eq!(e.code(), "ERR_VOLUME_BUSY", "{e}");
    assert!(e.to_string().contains("node b2"), "{e}");
}

/// One volume replicated to two sites, each pair on its own schedule: each target gets exactly the
/// source's content at its own cuts, and a target that syncs seldom still receives only what
/// changed since its last generation, however many cuts the other pair took meanwhile.
#[test]
fn a_volume_replicates_to_two_sites_each_from_its_own_cuts() {
    let sites = TwoSites::start();
    let a = Site::start("site-a", "eu-es", sites.a.url(), &[]);
    let b = Site::start("site-b", "eu-de", sites.b.url(), &[]);
    // A third site; its service shares site B's server (the subjects are per site).
    let c = Site::start("site-c", "eu-fr", sites.b.url(), &[]);
    let adm = a.admin();
    adm.create("db", 16 << 20, 65536).unwrap();
    a.write("db", 0, 0x11, 1 << 20);
    let start = |to: &str, mode: &str| adm.replicate(start_request(&["db"], to, mode, 3_600_000));
    start("site-b", "async").unwrap();
    start("site-c", "async").unwrap();
    let sync_to = |to: &str| {
        adm.replicate(ControlRequest::ReplicateSync {
            volumes: vec!["db".into()],
            to: Some(to.into()),
        })
    };
    sync_to("site-b").unwrap();
    let c_full = sync_to("site-c").unwrap()["bytesRaw"].as_u64().unwrap();
    assert_eq!(b.content("db"), a.content("db"));
    assert_eq!(c.content("db"), a.content("db"));

    // Many cuts for B, one block changed before each; C syncs once after all of them and ships
    // just those blocks — its base's bitmaps were kept past the usual count.
    let at_c = c.content("db");
    for i in 0..12u64 {
        a.write("db", (2 + i) << 20, 0x20 + i as u8, 4096);
        sync_to("site-b").unwrap();
        assert_eq!(b.content("db"), a.content("db"));
    }
    assert_eq!(
        c.content("db"),
        at_c,
        "C still holds its own last generation"
    );
    let st = sync_to("site-c").unwrap();
    assert_eq!(
        st["bytesRaw"].as_u64().unwrap() - c_full,
        12 * 65536,
        "only the 12 changed blocks go to C: {st}"
    );
    assert_eq!(c.content("db"), a.content("db"));

    // Which pair is meant must be said once there are two.
    let e = adm
        .replicate(ControlRequest::ReplicateSync {
            volumes: vec!["db".into()],
            to: None,
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("replicate to several sites (site-b, site-c): name one with --to"),
        "{e}"
    );
    let status = adm.replicate(ControlRequest::ReplicateStatus).unwrap();
    assert_eq!(status.as_array().unwrap().len(), 2, "{status}");
    // One pair per target site, and one synchronous target per volume.
    adm.create("logs", 1 << 20, 65536).unwrap();
    let e = adm
        .replicate(start_request(&["db", "logs"], "site-b", "async", 3_600_000))
        .unwrap_err();
    assert!(
        e.to_string().contains("already replicated to site site-b"),
        "{e}"
    );
    adm.replicate(ControlRequest::ReplicateStop {
        volumes: vec!["db".into()],
        to: Some("site-c".into()),
    })
    .unwrap();
    start("site-c", "sync").unwrap();
    adm.replicate(ControlRequest::ReplicateStop {
        volumes: vec!["db".into()],
        to: Some("site-b".into()),
    })
    .unwrap();
    let e = start("site-b", "sync").unwrap_err();
    assert!(e.to_string().contains("one synchronous target"), "{e}");
    // Stopping one pair leaves the other shipping.
    a.write("db", 0, 0x77, 4096);
    sync_to("site-c").unwrap();
    assert_eq!(c.content("db"), a.content("db"));
}
