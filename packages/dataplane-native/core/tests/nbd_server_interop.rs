//! The NBD server against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and against a
//! raw-socket client that sends what real clients never would. Every misbehaving-client test
//! ends by checking that another client is still served.
//!
//! Needs `qemu-utils`, `libnbd-bin` and `fio` on PATH.

use ferry_dataplane::data_dir::DataDir;
use ferry_dataplane::nbd::proto::*;
use ferry_dataplane::nbd::server::NbdServer;
use ferry_dataplane::registry::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const MIB: u64 = 1024 * 1024;
const VOL_SIZE: u64 = 16 * MIB;

/// A data directory with volumes, served on a loopback TCP port and a unix socket.
struct Server {
    dir: tempfile::TempDir,
    registry: Arc<Registry>,
    addr: SocketAddr,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl Server {
    /// Volumes `vol` (read-write) and `ro` (read-only), both `VOL_SIZE`.
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let dd = DataDir::open(dir.path()).unwrap();
        dd.create_volume("vol", VOL_SIZE, 64 * 1024).unwrap();
        dd.create_volume("ro", VOL_SIZE, 64 * 1024).unwrap();
        // A read-only volume is one whose metadata says so (e.g. a replication target).
        let meta_path = dd.volume_dir("ro").join("meta.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        meta["readOnly"] = serde_json::Value::Bool(true);
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

        let registry = Registry::open(dd).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = rt
            .block_on(NbdServer::bind(
                registry.clone(),
                Some("127.0.0.1:0".parse().unwrap()),
                Some(socket.clone()),
            ))
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = Some(rt.spawn(server.run(stopped)));
        Server {
            dir,
            registry,
            addr,
            socket,
            stop,
            task,
            rt,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stop the server and wait for `run` to return.
    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
                .unwrap()
                .unwrap();
        }
    }

    /// The check every misbehaving-client test ends with: a fresh client reads and writes.
    fn assert_serves_another_client(&self) {
        let mut c = Raw::connect(self.addr);
        c.go("vol", &[]);
        c.request(0, CMD_WRITE, 1, 8192, 4096, &[0x5a; 4096]);
        assert_eq!(c.simple_reply(0), (0, 1, vec![]));
        c.request(0, CMD_READ, 2, 8192, 4096, &[]);
        assert_eq!(c.simple_reply(4096), (0, 2, vec![0x5a; 4096]));
        c.disconnect();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} ({e}); install qemu-utils, libnbd-bin and fio")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A deterministic image: data, a hole, more data, a hole at the end.
fn write_source_image(path: &Path) -> Vec<u8> {
    let mut img = vec![0u8; VOL_SIZE as usize];
    let mut x: u32 = 12345;
    for (i, b) in img.iter_mut().enumerate() {
        let in_data = (i as u64) < 3 * MIB || ((6 * MIB..9 * MIB).contains(&(i as u64)));
        if in_data {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

// ---------------------------------------------------------------------------------------------
// Real clients.

#[test]
fn qemu_io_writes_and_reads_back_over_tcp_and_unix() {
    let s = Server::start();
    for uri in [s.uri("vol"), s.unix_uri("vol")] {
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
        ]));
        assert!(out.contains("wrote 1048576/1048576"), "{out}");
        assert!(out.contains("read 1048576/1048576"), "{out}");
        assert!(!out.contains("verification failed"), "{out}");
    }
    // The bytes really are in the volume.
    let v = s.registry.get("vol").unwrap();
    let mut buf = vec![0u8; 4096];
    v.read_at(MIB - 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0xab; 4096]);
}

#[test]
fn nbdinfo_sees_exports_size_map_dirty_bitmap_and_multi_conn() {
    let s = Server::start();
    let list = run(Command::new("nbdinfo").args(["--list", &s.uri("")]));
    assert!(
        list.contains("export=\"vol\"") && list.contains("export=\"ro\""),
        "{list}"
    );
    assert!(
        list.contains("base:allocation") && list.contains("qemu:dirty-bitmap:open"),
        "{list}"
    );

    let size = run(Command::new("nbdinfo").args(["--size", &s.uri("vol")]));
    assert_eq!(size.trim(), VOL_SIZE.to_string());

    run(Command::new("qemu-io").args(["-f", "raw", &s.uri("vol"), "-c", "write -P 1 1M 128k"]));
    let map = run(Command::new("nbdinfo").args(["--map", &s.uri("vol")]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "131072", "0"], "{map}");
    assert_eq!(
        rows[2][..2],
        ["1179648", &(VOL_SIZE - 1179648).to_string()],
        "{map}"
    );

    let dirty = run(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:open", &s.uri("vol")]));
    let rows: Vec<Vec<&str>> = dirty
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "0"], "{dirty}");
    assert_eq!(rows[1][..3], ["1048576", "131072", "1"], "{dirty}");

    run(Command::new("nbdinfo").args(["--can", "multi-conn", &s.uri("vol")]));
    run(Command::new("nbdinfo").args(["--is", "read-only", &s.uri("ro")]));
    let rw = Command::new("nbdinfo")
        .args(["--is", "read-only", &s.uri("vol")])
        .status()
        .unwrap();
    assert_eq!(
        rw.code(),
        Some(2),
        "nbdinfo --is read-only on a writable export"
    );
}

#[test]
fn qemu_img_convert_in_and_out_compares_equal() {
    let s = Server::start();
    let src = s.path("src.raw");
    let img = write_source_image(&src);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(s.uri("vol")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri("vol")));

    let out = s.path("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &s.uri("vol")])
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == img,
        "converted-out image differs from the source"
    );
}

#[test]
fn nbdcopy_both_ways_with_multi_conn() {
    let s = Server::start();
    let src = s.path("src.raw");
    let img = write_source_image(&src);
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(s.unix_uri("vol")));
    let out = s.path("out.raw");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(VOL_SIZE)
        .unwrap();
    run(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(s.uri("vol"))
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == img,
        "image copied out differs from the one copied in"
    );
}

#[test]
fn fio_random_writes_at_qd32_verify() {
    let s = Server::start();
    let json = s.path("fio.json");
    // Run in the temp dir: fio drops state files into its working directory.
    run(Command::new("fio").current_dir(s.dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri("vol")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--output-format=json",
        &format!("--output={}", json.display()),
    ]));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 8 * MIB, "{job}");
    assert_eq!(
        job["read"]["io_bytes"],
        8 * MIB,
        "verify pass read everything back: {job}"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw client that speaks the wire format directly, to send what real clients never send.

struct Raw {
    s: TcpStream,
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Raw {
    /// Connect and finish the greeting with fixed newstyle + no zeroes.
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Raw { s };
        let g = c.read(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.write(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        c
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// True when the server closed the connection (EOF or reset) rather than answering.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b);
    }

    /// One option reply: (option, reply type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let data = self.read(len);
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        )
    }

    fn list(&mut self) -> Vec<String> {
        self.option(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let (opt, kind, data) = self.reply();
            assert_eq!(opt, OPT_LIST);
            match kind {
                REP_SERVER => names.push(String::from_utf8(data[4..].to_vec()).unwrap()),
                REP_ACK => return names,
                other => panic!("unexpected reply {other:#x} to LIST"),
            }
        }
    }

    fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_GO; returns (size, transmission flags, block sizes if sent).
    fn go(&mut self, name: &str, items: &[u16]) -> (u64, u16, Option<(u32, u32, u32)>) {
        self.option(OPT_GO, &Self::info_data(name, items));
        let (mut size, mut flags, mut sizes) = (0, 0, None);
        loop {
            let (opt, kind, d) = self.reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO => match u16::from_be_bytes([d[0], d[1]]) {
                    INFO_EXPORT => {
                        size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                    INFO_BLOCK_SIZE => {
                        let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                        sizes = Some((u(2), u(6), u(10)));
                    }
                    _ => {}
                },
                REP_ACK => return (size, flags, sizes),
                other => panic!(
                    "GO {name} failed with {other:#x}: {}",
                    String::from_utf8_lossy(&d)
                ),
            }
        }
    }

    fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply().1, REP_ACK);
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// LIST or SET meta context; returns (id, name) pairs, or the error reply type.
    fn meta(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, u32> {
        self.option(option, &Self::meta_data(export, queries));
        let mut out = Vec::new();
        loop {
            let (opt, kind, d) = self.reply();
            assert_eq!(opt, option);
            match kind {
                REP_META_CONTEXT => out.push((
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return Ok(out),
                err => return Err(err),
            }
        }
    }

    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(payload);
        self.write(&b);
    }

    /// A simple reply: (errno, cookie, data). `data_len` bytes follow only on success.
    fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let h = self.read(16);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "{h:?}"
        );
        let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let data = if errno == 0 {
            self.read(data_len)
        } else {
            vec![]
        };
        (errno, cookie, data)
    }

    /// Chunks of one structured reply, up to the one marked DONE.
    fn structured_reply(&mut self) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let h = self.read(20);
            assert_eq!(
                u32::from_be_bytes(h[0..4].try_into().unwrap()),
                STRUCTURED_REPLY_MAGIC,
                "{h:?}"
            );
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let c = Chunk {
                flags: u16::from_be_bytes([h[4], h[5]]),
                kind: u16::from_be_bytes([h[6], h[7]]),
                cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
                payload: self.read(len),
            };
            let done = c.flags & REPLY_FLAG_DONE != 0;
            chunks.push(c);
            if done {
                return chunks;
            }
        }
    }

    /// errno of a one-chunk structured error reply.
    fn structured_errno(&mut self) -> u32 {
        let chunks = self.structured_reply();
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(chunks[0].kind, REPLY_TYPE_ERROR, "{chunks:?}");
        u32::from_be_bytes(chunks[0].payload[0..4].try_into().unwrap())
    }

    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        assert!(self.closed(), "server must close after DISC");
    }
}

// ---------------------------------------------------------------------------------------------
// Option haggling.

#[test]
fn list_abort_and_unknown_options_keep_the_session_going() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    for option in [0x1234, OPT_STARTTLS, OPT_EXTENDED_HEADERS, OPT_PEEK_EXPORT] {
        c.option(option, b"ignored data");
        let (opt, kind, msg) = c.reply();
        assert_eq!(
            (opt, kind),
            (option, REP_ERR_UNSUP),
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }
    assert_eq!(c.list(), vec!["ro".to_string(), "vol".to_string()]);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());
    s.assert_serves_another_client();
}

#[test]
fn bad_option_magic_or_client_flags_close_only_that_connection() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.write(b"NOTMAGIC\0\0\0\x03\0\0\0\0");
    assert!(c.closed());

    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    c.write_all(&0x80u32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(c.read(&mut b), Ok(0) | Err(_)),
        "unknown client flags must close the connection"
    );
    s.assert_serves_another_client();
}

#[test]
fn oversized_option_is_refused_and_parsing_continues() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.option(OPT_GO, &vec![0u8; MAX_OPTION_LEN as usize + 1]);
    let (opt, kind, _) = c.reply();
    assert_eq!((opt, kind), (OPT_GO, REP_ERR_TOO_BIG));
    let long_name = "n".repeat(MAX_STRING_LEN as usize + 1);
    c.option(OPT_INFO, &Raw::info_data(&long_name, &[]));
    assert_eq!(c.reply().1, REP_ERR_TOO_BIG);
    let mut lying = Raw::info_data("vol", &[INFO_NAME]);
    lying[3] = 100; // name length beyond the option data
    c.option(OPT_INFO, &lying);
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    assert_eq!(c.list().len(), 2);

    // EXPORT_NAME cannot answer with an error: an oversized one ends the session.
    c.option(OPT_EXPORT_NAME, &vec![b'a'; MAX_OPTION_LEN as usize + 1]);
    assert!(c.closed());
    s.assert_serves_another_client();
}

#[test]
fn unknown_exports_are_refused() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.option(OPT_GO, &Raw::info_data("nope", &[]));
    let (_, kind, msg) = c.reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("'nope'") && msg.contains("vol"), "{msg}");
    c.option(OPT_INFO, &Raw::info_data("", &[]));
    assert_eq!(c.reply().1, REP_ERR_UNKNOWN);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    s.assert_serves_another_client();
}

#[test]
fn info_reports_name_description_and_block_sizes() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.option(
        OPT_INFO,
        &Raw::info_data("vol", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    let mut seen = Vec::new();
    loop {
        let (_, kind, d) = c.reply();
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        let info = u16::from_be_bytes([d[0], d[1]]);
        match info {
            INFO_NAME => assert_eq!(&d[2..], b"vol"),
            INFO_DESCRIPTION => assert!(String::from_utf8_lossy(&d[2..]).contains("vol")),
            INFO_BLOCK_SIZE => {
                let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                assert_eq!((u(2), u(6), u(10)), (MIN_BLOCK, 64 * 1024, MAX_PAYLOAD));
            }
            INFO_EXPORT => {
                let flags = u16::from_be_bytes([d[10], d[11]]);
                assert_eq!(flags & TFLAG_SEND_DF, 0, "DF without structured replies");
                assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
            }
            _ => panic!("unexpected info {info}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    // INFO does not end haggling.
    assert_eq!(c.list().len(), 2);
}

#[test]
fn meta_contexts_need_structured_replies_and_match_queries() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    assert_eq!(
        c.meta(OPT_SET_META_CONTEXT, "vol", &["base:allocation"]),
        Err(REP_ERR_INVALID)
    );
    c.structured();
    let all = c.meta(OPT_LIST_META_CONTEXT, "vol", &[]).unwrap();
    assert_eq!(
        all,
        vec![
            (0, "base:allocation".into()),
            (0, "qemu:dirty-bitmap:open".into())
        ]
    );
    let bitmaps = c
        .meta(OPT_LIST_META_CONTEXT, "vol", &["qemu:dirty-bitmap:"])
        .unwrap();
    assert_eq!(bitmaps, vec![(0, "qemu:dirty-bitmap:open".into())]);
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "vol", &["x-other:thing"])
            .unwrap(),
        vec![]
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "vol", &["nocolon"]),
        Err(REP_ERR_INVALID)
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "nope", &[]),
        Err(REP_ERR_UNKNOWN)
    );
    let set = c
        .meta(
            OPT_SET_META_CONTEXT,
            "vol",
            &[
                "base:allocation",
                "qemu:dirty-bitmap:open",
                "qemu:dirty-bitmap:gen-9",
            ],
        )
        .unwrap();
    assert_eq!(set.len(), 2);
    assert!(set[0].0 != set[1].0, "context ids must be unique: {set:?}");
}

// ---------------------------------------------------------------------------------------------
// Transmission.

#[test]
fn request_errors_follow_the_spec_and_the_connection_survives_them() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    let (size, flags, _) = c.go("vol", &[]);
    assert_eq!(size, VOL_SIZE);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);

    // Past the end: EINVAL for reads and trims, ENOSPC for writes and zeroes.
    c.request(0, CMD_READ, 1, VOL_SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple_reply(8192).0, EINVAL);
    c.request(0, CMD_WRITE, 2, VOL_SIZE, 4096, &[1; 4096]);
    assert_eq!(c.simple_reply(0).0, ENOSPC);
    c.request(0, CMD_TRIM, 3, VOL_SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, CMD_WRITE_ZEROES, 4, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, ENOSPC);
    // Zero length, unknown command, flags that do not belong.
    c.request(0, CMD_READ, 5, 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, 99, 6, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(CMD_FLAG_DF, CMD_READ, 7, 0, 4096, &[]);
    assert_eq!(
        c.simple_reply(4096).0,
        EINVAL,
        "DF needs structured replies"
    );
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE, 8, 0, 4096, &[2; 4096]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 9, 0, 4096, &[]);
    assert_eq!(
        c.simple_reply(0).0,
        EINVAL,
        "BLOCK_STATUS needs structured replies"
    );
    // Oversized WRITE: refused, payload skipped, stream still in step.
    let big = MAX_PAYLOAD as usize + 4096;
    c.request(0, CMD_WRITE, 10, 0, big as u32, &vec![3; big]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, CMD_READ, 11, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    // None of the refused writes touched the volume.
    c.request(0, CMD_READ, 12, 0, 4096, &[]);
    assert_eq!(c.simple_reply(4096), (0, 12, vec![0; 4096]));
    // Unaligned requests are fine when the client never agreed to block sizes.
    c.request(0, CMD_WRITE, 13, 1, 3, b"abc");
    assert_eq!(c.simple_reply(0), (0, 13, vec![]));
    c.request(0, CMD_READ, 14, 0, 5, &[]);
    assert_eq!(c.simple_reply(5), (0, 14, b"\0abc\0".to_vec()));
    c.request(0, CMD_FLUSH, 15, 0, 0, &[]);
    assert_eq!(c.simple_reply(0), (0, 15, vec![]));
    c.request(0, CMD_CACHE, 16, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0), (0, 16, vec![]));
    c.disconnect();
    s.assert_serves_another_client();
}

#[test]
fn a_write_too_big_to_skip_closes_only_that_connection() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.go("vol", &[]);
    c.request(0, CMD_WRITE, 1, 0, u32::MAX, &[]);
    assert!(c.closed());
    s.assert_serves_another_client();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.go("vol", &[]);
    c.write(&[0xee; REQUEST_HEADER_LEN]);
    assert!(c.closed());
    s.assert_serves_another_client();
}

#[test]
fn block_size_agreement_enforces_alignment() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    let (_, _, sizes) = c.go("vol", &[INFO_BLOCK_SIZE]);
    assert_eq!(sizes, Some((MIN_BLOCK, 64 * 1024, MAX_PAYLOAD)));
    c.request(0, CMD_WRITE, 1, 512, 4096, &[1; 4096]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, CMD_READ, 2, 0, 1000, &[]);
    assert_eq!(c.simple_reply(1000).0, EINVAL);
    c.request(0, CMD_TRIM, 3, 4096, 100, &[]);
    assert_eq!(c.simple_reply(0).0, EINVAL);
    c.request(0, CMD_WRITE, 4, 4096, 4096, &[1; 4096]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.disconnect();
    s.assert_serves_another_client();
}

#[test]
fn read_only_export_refuses_modification_with_eperm() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    let (_, flags, _) = c.go("ro", &[]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    c.request(0, CMD_WRITE, 1, 0, 4096, &[1; 4096]);
    assert_eq!(c.simple_reply(0).0, EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, EPERM);
    c.request(0, CMD_READ, 4, 0, 4096, &[]);
    assert_eq!(c.simple_reply(4096), (0, 4, vec![0; 4096]));
    c.disconnect();
    s.assert_serves_another_client();
}

#[test]
fn client_vanishing_mid_payload_ends_only_that_connection() {
    let s = Server::start();
    let mut other = Raw::connect(s.addr);
    other.go("vol", &[]);
    let mut c = Raw::connect(s.addr);
    c.go("vol", &[]);
    c.request(0, CMD_WRITE, 1, 0, 65536, &[7; 1000]);
    drop(c);
    // The client that was already connected keeps working, and new ones are accepted.
    other.request(0, CMD_READ, 5, 0, 4096, &[]);
    assert_eq!(other.simple_reply(4096).0, 0);
    other.disconnect();
    s.assert_serves_another_client();
}

#[test]
fn structured_reads_send_holes_and_data_and_errors_as_chunks() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.structured();
    let (_, flags, _) = c.go("vol", &[]);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    c.request(0, CMD_WRITE, 1, 128 * 1024, 64 * 1024, &[9; 64 * 1024]);
    assert_eq!(c.simple_reply(0).0, 0);

    // [0,128K) hole, [128K,192K) data, [192K,256K) hole.
    c.request(0, CMD_READ, 2, 0, 256 * 1024, &[]);
    let chunks = c.structured_reply();
    let mut image = vec![0xffu8; 256 * 1024];
    let mut kinds = Vec::new();
    for ch in &chunks {
        assert_eq!(ch.cookie, 2);
        let off = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap()) as usize;
        match ch.kind {
            REPLY_TYPE_OFFSET_DATA => {
                image[off..off + ch.payload.len() - 8].copy_from_slice(&ch.payload[8..])
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let len = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                image[off..off + len].fill(0);
            }
            k => panic!("unexpected chunk type {k}"),
        }
        kinds.push(ch.kind);
    }
    assert_eq!(
        kinds,
        vec![
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    let mut want = vec![0u8; 256 * 1024];
    want[128 * 1024..192 * 1024].fill(9);
    assert!(image == want, "reassembled read differs");

    // All data: one chunk. DF: one data chunk even over holes.
    c.request(0, CMD_READ, 3, 128 * 1024, 8192, &[]);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        (chunks[0].kind, chunks[0].payload.len()),
        (REPLY_TYPE_OFFSET_DATA, 8 + 8192)
    );
    c.request(CMD_FLAG_DF, CMD_READ, 4, 64 * 1024, 128 * 1024, &[]);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, REPLY_TYPE_OFFSET_DATA);

    // Errors come as error chunks with a message.
    c.request(0, CMD_READ, 5, VOL_SIZE, 4096, &[]);
    assert_eq!(c.structured_errno(), EINVAL);
    c.request(CMD_FLAG_DF, CMD_READ, 6, 0, MAX_PAYLOAD + 4096, &[]);
    assert_eq!(c.structured_errno(), EOVERFLOW);
    c.request(0, CMD_WRITE, 7, VOL_SIZE, 4096, &[0; 4096]);
    assert_eq!(c.structured_errno(), ENOSPC);
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 4096, &[]);
    assert_eq!(c.structured_errno(), EINVAL, "no context was selected");
    c.disconnect();
}

#[test]
fn block_status_reports_allocation_and_dirty_bitmap() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.structured();
    let set = c
        .meta(
            OPT_SET_META_CONTEXT,
            "vol",
            &["base:allocation", "qemu:dirty-bitmap:open"],
        )
        .unwrap();
    c.go("vol", &[]);
    c.request(0, CMD_WRITE, 1, MIB, 64 * 1024, &[1; 64 * 1024]);
    assert_eq!(c.simple_reply(0).0, 0);

    let descriptors = |ch: &Chunk| -> (u32, Vec<(u32, u32)>) {
        let id = u32::from_be_bytes(ch.payload[0..4].try_into().unwrap());
        let d = ch.payload[4..]
            .chunks(8)
            .map(|p| {
                (
                    u32::from_be_bytes(p[0..4].try_into().unwrap()),
                    u32::from_be_bytes(p[4..8].try_into().unwrap()),
                )
            })
            .collect();
        (id, d)
    };
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 2 * MIB as u32, &[]);
    let chunks = c.structured_reply();
    assert_eq!(chunks.len(), 2, "one chunk per selected context");
    for ch in &chunks {
        assert_eq!(ch.kind, REPLY_TYPE_BLOCK_STATUS);
        let (id, d) = descriptors(ch);
        let name = &set.iter().find(|(i, _)| *i == id).unwrap().1;
        if name == "base:allocation" {
            assert_eq!(
                d,
                vec![(MIB as u32, 3), (65536, 0), (MIB as u32 - 65536, 3)]
            );
        } else {
            assert_eq!(
                d,
                vec![(MIB as u32, 0), (65536, 1), (MIB as u32 - 65536, 0)]
            );
        }
    }
    c.request(
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        3,
        0,
        2 * MIB as u32,
        &[],
    );
    for ch in c.structured_reply() {
        assert_eq!(descriptors(&ch).1.len(), 1);
    }
    c.request(0, CMD_BLOCK_STATUS, 4, VOL_SIZE - 4096, 8192, &[]);
    assert_eq!(c.structured_errno(), EINVAL);
    c.disconnect();
}

#[test]
fn pipelined_requests_beyond_the_in_flight_limit_all_get_replies() {
    let s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.go("vol", &[]);
    // 300 writes of 256 KiB (75 MiB, more than the byte budget) sent before reading a reply:
    // the server must throttle, not deadlock or drop anything.
    let writer = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut w = writer;
        for i in 0..300u64 {
            let mut b = Request {
                flags: 0,
                kind: CMD_WRITE,
                cookie: i,
                offset: (i % 60) * 256 * 1024,
                length: 256 * 1024,
            }
            .encode()
            .to_vec();
            b.extend_from_slice(&vec![i as u8; 256 * 1024]);
            w.write_all(&b).unwrap();
        }
    });
    let mut cookies: Vec<u64> = (0..300)
        .map(|_| c.simple_reply(0))
        .map(|(e, k, _)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    sender.join().unwrap();
    cookies.sort();
    assert_eq!(cookies, (0..300).collect::<Vec<_>>());
    c.disconnect();
}

#[test]
fn shutdown_finishes_in_flight_replies_and_removes_the_socket() {
    let mut s = Server::start();
    let mut c = Raw::connect(s.addr);
    c.go("vol", &[]);
    c.request(0, CMD_READ, 1, 0, 4096, &[]);
    assert_eq!(c.simple_reply(4096).0, 0);
    assert!(s.socket.exists());
    s.shutdown();
    assert!(c.closed(), "connections close on shutdown");
    assert!(!s.socket.exists(), "unix socket file removed");
    assert!(TcpStream::connect(s.addr).is_err(), "no longer accepting");
}

#[test]
fn bind_reports_busy_addresses_and_replaces_stale_sockets() {
    let s = Server::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(NbdServer::bind(s.registry.clone(), Some(s.addr), None))
        .err()
        .unwrap();
    assert_eq!(e.code(), "ERR_LISTEN");
    assert!(e.to_string().contains("address already in use"), "{e}");
    let e = rt
        .block_on(NbdServer::bind(
            s.registry.clone(),
            None,
            Some(s.socket.clone()),
        ))
        .err()
        .unwrap();
    assert!(e.to_string().contains("another server is listening"), "{e}");

    // A socket file nobody listens on is replaced.
    let stale = s.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = rt
        .block_on(NbdServer::bind(
            s.registry.clone(),
            None,
            Some(stale.clone()),
        ))
        .unwrap();
    assert_eq!(server.unix_path(), Some(stale.as_path()));
    drop(server);
    assert!(!stale.exists(), "socket file removed with the server");

    // A regular file is never clobbered.
    let file = s.path("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let e = rt
        .block_on(NbdServer::bind(
            s.registry.clone(),
            None,
            Some(file.clone()),
        ))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
