//! The NBD client and the import reader against real servers, each started by the test on a
//! free port or a unix socket in a temporary directory and killed by PID when the test ends,
//! pass or fail: qemu-nbd (qcow2 with a persistent dirty bitmap), nbdkit (memory, sparse-random,
//! the error filter, handshake restrictions) and Debian's nbd-server.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_dataplane::import::{
    copy_from_client, copy_from_nbd, ImportChunk, ImportOptions, ImportProgress,
};
use ferry_dataplane::nbd::client::{connect, list_exports, Extent};
use ferry_dataplane::nbd::proto::{EIO, META_BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use ferry_dataplane::Error;
use rand::RngCore;
use tempfile::TempDir;

const START_DEADLINE: Duration = Duration::from_secs(20);

/// A server process, killed (SIGTERM, then SIGKILL) when dropped.
struct Server {
    name: &'static str,
    pid: i32,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, dir: &Path, cmd: &mut Command) -> Server {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server {
            name,
            pid: child.id() as i32,
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll until `ready` holds, failing early (with the server's output) if it exits.
    fn wait_until(&mut self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + START_DEADLINE;
        while !ready() {
            if let Some(c) = &mut self.child {
                if let Some(st) = c.try_wait().unwrap() {
                    panic!(
                        "{} exited with {st} before it was ready:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after {START_DEADLINE:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_unix(&mut self, sock: &Path) {
        self.wait_until(|| std::os::unix::net::UnixStream::connect(sock).is_ok());
    }

    fn wait_tcp(&mut self, port: u16) {
        self.wait_until(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let gone = match &mut self.child {
                Some(c) => c.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => !alive(self.pid),
            };
            if gone {
                return;
            }
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                if let Some(c) = &mut self.child {
                    let _ = c.wait();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unix_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// `nbdkit -f -U SOCK ARGS...`: foreground, dies with the test process.
fn nbdkit_unix(dir: &TempDir, args: &[&str]) -> (Server, String) {
    let sock = dir.path().join("nbdkit.sock");
    let mut s = Server::spawn(
        "nbdkit",
        dir.path(),
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&sock)
            .args(args),
    );
    s.wait_unix(&sock);
    (s, unix_uri("", &sock))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

fn ranges(extents: &[Extent], pick: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    extents
        .iter()
        .filter(|e| pick(e.flags))
        .map(|e| (e.offset, e.length))
        .collect()
}

fn assert_covers(extents: &[Extent], offset: u64, len: u64) {
    let mut at = offset;
    for e in extents {
        assert_eq!(e.offset, at, "extents not contiguous: {extents:?}");
        assert!(e.length > 0);
        at += e.length;
    }
    assert_eq!(at, offset + len, "extents do not cover the range");
}

#[tokio::test]
async fn qemu_nbd_dirty_bitmap_shows_exactly_the_written_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("bm0"));
    // Cluster- and bitmap-granularity (64 KiB) aligned, so dirty and allocated ranges are exact.
    let writes: [(u64, u64, u8); 3] = [
        (1 << 20, 64 << 10, 0xab),
        (10 << 20, 192 << 10, 0xcd),
        (40 << 20, 64 << 10, 0x11),
    ];
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for (off, len, pat) in writes {
        io.arg("-c").arg(format!("write -P {pat} {off} {len}"));
    }
    run(io.arg(&img));

    let sock = dir.path().join("qemu-nbd.sock");
    let mut srv = Server::spawn(
        "qemu-nbd",
        dir.path(),
        Command::new("qemu-nbd")
            .args([
                "-f", "qcow2", "-B", "bm0", "-t", "-e", "4", "-x", "disk", "-k",
            ])
            .arg(&sock)
            .arg(&img),
    );
    srv.wait_unix(&sock);

    let bitmap = "qemu:dirty-bitmap:bm0";
    let c = connect(&unix_uri("disk", &sock), &[META_BASE_ALLOCATION, bitmap])
        .await
        .unwrap();
    assert_eq!(c.size(), 64 << 20);
    let names: Vec<&str> = c.meta_contexts().iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&META_BASE_ALLOCATION) && names.contains(&bitmap),
        "granted {names:?}"
    );
    let (min, pref, max) = c.block_size();
    assert!(
        min.is_power_of_two() && pref >= min && max >= pref,
        "{min} {pref} {max}"
    );

    let expected: Vec<(u64, u64)> = writes.iter().map(|&(o, l, _)| (o, l)).collect();
    let dirty = c.block_status(0, c.size(), bitmap).await.unwrap();
    assert_covers(&dirty, 0, c.size());
    assert_eq!(ranges(&dirty, |f| f & STATE_DIRTY != 0), expected);
    let alloc = c
        .block_status(0, c.size(), META_BASE_ALLOCATION)
        .await
        .unwrap();
    assert_covers(&alloc, 0, c.size());
    assert_eq!(ranges(&alloc, |f| f & STATE_HOLE == 0), expected);
    // A sub-range query starts and ends where asked.
    let part = c
        .block_status((10 << 20) + 4096, 8192, bitmap)
        .await
        .unwrap();
    assert_eq!(
        part,
        vec![Extent {
            offset: (10 << 20) + 4096,
            length: 8192,
            flags: STATE_DIRTY
        }]
    );

    for (off, len, pat) in writes {
        let got = c.read(off, len as usize).await.unwrap();
        assert!(got.iter().all(|&b| b == pat), "data at {off}");
    }
    // Straddling written and unwritten ranges, unaligned.
    let got = c.read((1 << 20) - 100, 300).await.unwrap();
    assert!(got[..100].iter().all(|&b| b == 0) && got[100..].iter().all(|&b| b == 0xab));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn nbdkit_memory_round_trip_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut srv = Server::spawn(
        "nbdkit",
        dir.path(),
        Command::new("nbdkit").args([
            "-f",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "memory",
            "64M",
        ]),
    );
    srv.wait_tcp(port);
    let c = connect(&format!("nbd://127.0.0.1:{port}/"), &[META_BASE_ALLOCATION])
        .await
        .unwrap();
    assert_eq!(c.size(), 64 << 20);
    assert!(c.structured_replies());
    assert!(c.can_flush() && c.can_trim() && c.can_write_zeroes());

    // Bigger than the 32 MiB request cap: split into pipelined requests both ways.
    let big = random_bytes(40 << 20);
    c.write(4096, &big).await.unwrap();
    c.flush().await.unwrap();
    assert!(c.read(4096, big.len()).await.unwrap() == big);

    // Several callers at once on one connection.
    let (a, b, d) = tokio::join!(
        c.read(4096, 1 << 20),
        c.read(8 << 20, 4096),
        c.read((30 << 20) + 7, 12345)
    );
    assert!(a.unwrap() == big[..1 << 20]);
    assert!(b.unwrap() == big[(8 << 20) - 4096..8 << 20]);
    assert!(d.unwrap() == big[(30 << 20) + 7 - 4096..(30 << 20) + 7 - 4096 + 12345]);

    c.write_fua(1 << 20, &[0x5a; 4096]).await.unwrap();
    assert_eq!(c.read(1 << 20, 4096).await.unwrap(), vec![0x5a; 4096]);
    c.write_zeroes(1 << 20, 1 << 20, false).await.unwrap();
    assert!(c
        .read(1 << 20, 1 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    c.trim(0, 48 << 20).await.unwrap();
    let map = c
        .block_status(0, c.size(), META_BASE_ALLOCATION)
        .await
        .unwrap();
    assert_covers(&map, 0, c.size());
    assert!(
        map.iter().all(|e| e.flags & STATE_ZERO != 0),
        "after trim everything reads as zero: {map:?}"
    );
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn nbdkit_sparse_random_reports_holes_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(&dir, &["sparse-random", "256M", "seed=42"]);
    let c = connect(&uri, &[META_BASE_ALLOCATION]).await.unwrap();
    let map = c
        .block_status(0, c.size(), META_BASE_ALLOCATION)
        .await
        .unwrap();
    assert_covers(&map, 0, c.size());
    let holes = ranges(&map, |f| f & STATE_HOLE != 0);
    let data = ranges(&map, |f| f & STATE_HOLE == 0);
    assert!(!holes.is_empty() && !data.is_empty(), "{map:?}");
    let (off, len) = data[0];
    let got = c.read(off, len.min(1 << 20) as usize).await.unwrap();
    assert!(
        got.iter().any(|&b| b != 0),
        "data extent at {off} reads as zeroes"
    );
    let (off, len) = holes[0];
    assert!(c
        .read(off, len.min(1 << 20) as usize)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn nbdkit_error_filter_surfaces_eio_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(
        &dir,
        &[
            "--filter=error",
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=50%",
        ],
    );
    let c = connect(&uri, &[]).await.unwrap();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..200u64 {
        match c.read((i % 16) << 20, 64 << 10).await {
            Ok(d) => {
                assert!(d.iter().all(|&b| b == 0));
                ok += 1;
            }
            Err(Error::ServerError { errno, command, .. }) => {
                assert_eq!((errno, command), (EIO, "READ"));
                failed += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
    // Errors on reads leave writes working.
    c.write(0, &[1u8; 4096]).await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn nbdkit_without_structured_replies_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(&dir, &["--no-sr", "memory", "8M"]);
    let c = connect(&uri, &[META_BASE_ALLOCATION]).await.unwrap();
    assert!(!c.structured_replies() && c.meta_contexts().is_empty());
    let data = random_bytes(1 << 20);
    c.write(1 << 20, &data).await.unwrap();
    assert!(c.read(1 << 20, data.len()).await.unwrap() == data);
    let e = c
        .block_status(0, 4096, META_BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ERR_NOT_SUPPORTED");
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn nbdkit_without_fixed_newstyle_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(&dir, &["--mask-handshake=0", "memory", "8M"]);
    let e = connect(&uri, &[]).await.unwrap_err();
    assert_eq!(e.code(), "ERR_NBD_REFUSED", "{e}");
    assert!(e.to_string().contains("fixed newstyle"), "{e}");
}

#[tokio::test]
async fn nbdkit_oldstyle_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(&dir, &["-o", "memory", "8M"]);
    let e = connect(&uri, &[]).await.unwrap_err();
    assert!(e.to_string().contains("oldstyle"), "{e}");
}

#[tokio::test]
async fn debian_nbd_server_round_trip_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export.img");
    std::fs::File::create(&export)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let port = free_port();
    let conf = dir.path().join("nbd-server.conf");
    std::fs::write(
        &conf,
        format!(
            "[generic]\n    port = {port}\n    listenaddr = 127.0.0.1\n    allowlist = true\n\
             [disk]\n    exportname = {}\n",
            export.display()
        ),
    )
    .unwrap();
    let pidfile = dir.path().join("nbd-server.pid");
    // It daemonizes: the process we start exits, the pidfile names the daemon.
    run(Command::new("nbd-server")
        .arg("-C")
        .arg(&conf)
        .arg("-p")
        .arg(&pidfile));
    let deadline = Instant::now() + START_DEADLINE;
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "nbd-server wrote no pidfile");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut srv = Server {
        name: "nbd-server",
        pid,
        child: None,
        log: dir.path().join("none"),
    };
    srv.wait_tcp(port);

    let exports = list_exports(&format!("nbd://127.0.0.1:{port}"))
        .await
        .unwrap();
    assert!(exports.iter().any(|e| e.name == "disk"), "{exports:?}");

    let c = connect(
        &format!("nbd://127.0.0.1:{port}/disk"),
        &[META_BASE_ALLOCATION],
    )
    .await
    .unwrap();
    assert_eq!(c.size(), 16 << 20);
    let data = random_bytes(3 << 20);
    c.write(512 << 10, &data).await.unwrap();
    if c.can_flush() {
        c.flush().await.unwrap();
    }
    assert!(c.read(512 << 10, data.len()).await.unwrap() == data);
    c.disconnect().await.unwrap();
    let mut on_disk = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&export).unwrap(),
        &mut on_disk,
        512 << 10,
    )
    .unwrap();
    assert!(on_disk == data, "the export file holds what we wrote");

    let e = connect(&format!("nbd://127.0.0.1:{port}/nope"), &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    drop(srv);
}

/// Everything `copy_from_*` emitted, laid out as an image.
struct Collected {
    image: Vec<u8>,
    zero_ranges: Vec<(u64, u64)>,
    data_bytes: u64,
    last: ImportProgress,
}

fn collector(size: u64) -> Collected {
    Collected {
        image: vec![0u8; size as usize],
        zero_ranges: Vec::new(),
        data_bytes: 0,
        last: ImportProgress::default(),
    }
}

impl Collected {
    fn take(&mut self, c: ImportChunk) -> ferry_dataplane::Result<()> {
        match c {
            ImportChunk::Data { offset, bytes } => {
                assert!(
                    bytes.iter().any(|&b| b != 0),
                    "all-zero data chunk at {offset}"
                );
                self.data_bytes += bytes.len() as u64;
                self.image[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
            }
            ImportChunk::Zero { offset, length } => self.zero_ranges.push((offset, length)),
        }
        Ok(())
    }
}

fn nbdcopy_xxh3(uri: &str) -> u64 {
    let mut child = Command::new("nbdcopy")
        .args([uri, "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut all = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut all).unwrap();
    assert!(child.wait().unwrap().success());
    xxhash_rust::xxh3::xxh3_64(&all)
}

#[tokio::test]
async fn import_from_sparse_random_skips_holes_and_matches_nbdcopy() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, uri) = nbdkit_unix(&dir, &["sparse-random", "128M", "seed=7"]);
    let size = 128u64 << 20;
    let mut col = collector(size);
    let mut last = ImportProgress::default();
    let mut sink = |c| col.take(c);
    let mut progress = |p: ImportProgress| {
        assert!(p.done >= last.done);
        last = p;
    };
    let p = copy_from_nbd(&uri, &ImportOptions::default(), &mut sink, &mut progress)
        .await
        .unwrap();
    col.last = last;
    assert_eq!(p, col.last);
    assert_eq!(
        (p.done, p.total, p.data_bytes + p.zero_bytes),
        (size, size, size)
    );
    assert_eq!(p.data_bytes, col.data_bytes);

    // Every hole the server reports was handed over as zeroes, not read.
    let c = connect(&uri, &[META_BASE_ALLOCATION]).await.unwrap();
    let map = c.block_status(0, size, META_BASE_ALLOCATION).await.unwrap();
    c.disconnect().await.unwrap();
    let hole_bytes: u64 = ranges(&map, |f| f & STATE_ZERO != 0)
        .iter()
        .map(|r| r.1)
        .sum();
    assert!(
        hole_bytes > 0 && p.data_bytes <= size - hole_bytes,
        "data {} holes {hole_bytes}",
        p.data_bytes
    );
    let mut zero_bytes = 0;
    for (off, len) in ranges(&map, |f| f & STATE_ZERO != 0) {
        let inside: u64 = col
            .zero_ranges
            .iter()
            .map(|&(o, l)| (o + l).min(off + len).saturating_sub(o.max(off)))
            .sum();
        assert_eq!(inside, len, "hole at {off}+{len} not reported as zero");
        zero_bytes += len;
    }
    assert!(zero_bytes <= p.zero_bytes);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&col.image),
        nbdcopy_xxh3(&uri),
        "imported bytes differ from nbdcopy's"
    );
}

#[tokio::test]
async fn import_from_qemu_nbd_reads_only_the_written_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("32M"));
    // Two data clusters, and one allocated cluster full of zeroes that zero detection must catch.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 2M 128k",
            "-c",
            "write -P 0x43 20M 64k",
            "-c",
            "write -P 0 30M 64k",
        ])
        .arg(&img));
    let sock = dir.path().join("qemu-nbd.sock");
    let mut srv = Server::spawn(
        "qemu-nbd",
        dir.path(),
        Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t", "-e", "4", "-k"])
            .arg(&sock)
            .arg(&img),
    );
    srv.wait_unix(&sock);
    let uri = unix_uri("", &sock);

    let c = connect(&uri, &[META_BASE_ALLOCATION]).await.unwrap();
    let mut col = collector(c.size());
    let mut sink = |ch| col.take(ch);
    let mut progress = |_p: ImportProgress| {};
    // Small chunks and read-ahead so several reads are in flight at once.
    let opts = ImportOptions {
        chunk_size: 64 << 10,
        read_ahead: 3,
        ..Default::default()
    };
    let p = copy_from_client(&c, &opts, &mut sink, &mut progress)
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    assert_eq!(
        p.data_bytes,
        (128 + 64) << 10,
        "only the non-zero written clusters are data"
    );
    assert_eq!(p.zero_bytes, (32 << 20) - ((128 + 64) << 10));
    assert!(col.image[2 << 20..(2 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0x42));
    assert!(col.image[20 << 20..(20 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x43));
    assert_eq!(xxhash_rust::xxh3::xxh3_64(&col.image), nbdcopy_xxh3(&uri));
}
