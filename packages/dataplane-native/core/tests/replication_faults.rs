//! Damaged frames: with the test hook `FERRY_TEST_CORRUPT_EVERY` (a flipped byte in one frame of
//! N, as a bad network would deliver it), the target refuses each damaged frame, the source resends
//! it, and the replica still equals the source. Its own test binary: the hook is process-wide.

mod support;

use ferry_dataplane::admin::Admin;
use ferry_dataplane::control::ControlRequest;
use ferry_dataplane::service::{ServeOptions, VolumeService};
use support::nats_sites::TwoSites;
use support::sites::start_request;

fn serve(name: &str, region: &str, url: String, dir: &std::path::Path) -> VolumeService {
    VolumeService::start(ServeOptions {
        data_dir: dir.to_path_buf(),
        listen: Some("127.0.0.1:0".into()),
        site: Some(name.into()),
        region: Some(region.into()),
        nats: Some(url),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn damaged_frames_are_refused_and_resent() {
    std::env::set_var("FERRY_TEST_CORRUPT_EVERY", "4");
    let sites = TwoSites::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve("site-a", "eu-es", sites.a.url(), da.path());
    let b = serve("site-b", "eu-de", sites.b.url(), db.path());
    let adm = Admin::open(da.path()).unwrap();
    adm.create("v", 16 << 20, 65536).unwrap();
    let vol = a.registry().require("v").unwrap();
    // Incompressible data, so frames go raw and a flipped byte hits the data.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..(16 << 20))
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    vol.write_at(0, &data, false).unwrap();
    adm.replicate(start_request(&["v"], "site-b", "async", 3_600_000))
        .unwrap();
    let st = adm
        .replicate(ControlRequest::ReplicateSync {
            volumes: vec!["v".into()],
            to: None,
        })
        .unwrap();
    assert_eq!(st["state"], "idle", "{st}");
    let sizer = ferry_dataplane::replication::frame::FrameSizer::new(
        ferry_dataplane::replication::frame::DEFAULT_MAX_MESSAGE,
    )
    .unwrap();
    let pieces = (16u64 << 20).div_ceil(sizer.max_piece() as u64);
    let sent = ferry_dataplane::replication::shipper::test_hooks::frames_seen();
    assert!(
        sent > pieces,
        "{pieces} frames and their resends should have been sent, saw {sent}"
    );
    let replica = b.registry().require("v").unwrap();
    let mut got = vec![0u8; 16 << 20];
    replica.read_at(0, &mut got).unwrap();
    assert!(got == data, "the replica differs from the source");

    // Then a delta of 40 scattered 64 KiB blocks: small frames travel as bundles of several, a
    // damaged one is refused whole and sent again.
    let mut data = data;
    let before = ferry_dataplane::replication::shipper::test_hooks::frames_seen();
    for i in 0..40u64 {
        let offset = (i * 6 + 1) * 65536;
        let block = &mut data[offset as usize..(offset + 65536) as usize];
        block
            .iter_mut()
            .for_each(|b| *b = b.wrapping_add(1 + i as u8));
        vol.write_at(offset, block, false).unwrap();
    }
    let st = adm
        .replicate(ControlRequest::ReplicateSync {
            volumes: vec!["v".into()],
            to: None,
        })
        .unwrap();
    assert_eq!(st["state"], "idle", "{st}");
    let messages = ferry_dataplane::replication::shipper::test_hooks::frames_seen() - before;
    assert!(
        messages < 40,
        "40 frames should have gone as a few bundles and their resends, saw {messages} messages"
    );
    replica.read_at(0, &mut got).unwrap();
    assert!(
        got == data,
        "the replica differs from the source after the delta"
    );
    a.stop().unwrap();
    b.stop().unwrap();
}
