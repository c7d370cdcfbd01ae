//! Fuzz the NBD server's parsers — greeting, option haggling, request headers and payloads — by
//! feeding arbitrary client bytes to `serve_connection` over an in-memory duplex stream.
//!
//! The first input byte is a mode. Its low two bits pick how far a well-behaved client gets
//! before the fuzzer takes over (nowhere, or into transmission with simple replies, structured
//! replies + meta contexts, or agreed block sizes), so request parsing is reached without the
//! fuzzer having to discover a whole handshake. Bit 2 frames the rest as requests (the fuzzer
//! chooses flags, command, offset, length and payload; the magic is filled in) and bit 3 keeps
//! offsets and lengths near the volume, so command semantics get exercised rather than only the
//! header check. Otherwise the rest is sent as raw bytes. A panic anywhere, or a connection that
//! never ends, is a finding.

#![no_main]

use ferry_dataplane::data_dir::DataDir;
use ferry_dataplane::nbd::proto::*;
use ferry_dataplane::nbd::server::serve_connection;
use ferry_dataplane::registry::Registry;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream};

const EXPORT: &str = "vol";
/// A small volume keeps every in-range request cheap.
const VOLUME_SIZE: u64 = 1 << 20;
/// No single input may keep a connection alive longer than this.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(20);

struct World {
    rt: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let dd = DataDir::open(dir.path()).expect("data dir");
        dd.create_volume(EXPORT, VOLUME_SIZE, 64 * 1024)
            .expect("volume");
        let registry = Registry::open(dd).expect("registry");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        World {
            rt,
            registry,
            _dir: dir,
        }
    })
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn go(out: &mut Vec<u8>, info_items: &[u16]) {
    let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(EXPORT.as_bytes());
    d.extend_from_slice(&(info_items.len() as u16).to_be_bytes());
    for i in info_items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    option(out, OPT_GO, &d);
}

/// The well-behaved start of a session selected by `mode`.
fn prelude(mode: u8) -> Vec<u8> {
    let mut out = Vec::new();
    match mode % 4 {
        0 => return out,
        1 => {}
        2 => {
            option(&mut out, OPT_STRUCTURED_REPLY, &[]);
            let queries = [
                META_BASE_ALLOCATION.to_string(),
                format!("{META_DIRTY_BITMAP_PREFIX}open"),
            ];
            let mut d = (EXPORT.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(EXPORT.as_bytes());
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in &queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            option(&mut out, OPT_SET_META_CONTEXT, &d);
        }
        _ => {}
    }
    let mut flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    flags.append(&mut out);
    let items: &[u16] = if mode % 4 == 3 {
        &[INFO_BLOCK_SIZE]
    } else {
        &[]
    };
    go(&mut flags, items);
    flags
}

async fn session(registry: Arc<Registry>, input: Vec<u8>) {
    let (client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
    let conn = tokio::spawn(serve_connection(server, registry, "fuzz".into()));
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let feed = async move {
        let _ = to_server.write_all(&input).await;
        // EOF tells the server the client is done.
        let _ = to_server.shutdown().await;
        to_server
    };
    // Keep reading so replies never back up; ends when the server closes its side.
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut from_server, &mut sink);
    let (_still_open, _) = tokio::join!(feed, drain);
    match conn.await {
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        _ => {}
    }
}

/// Encode `data` as requests: 16-byte records (flags, command, offset, length) each followed, for
/// WRITE, by up to `length` payload bytes taken from what remains.
fn framed_requests(mut data: &[u8], near_volume: bool, out: &mut Vec<u8>) {
    while data.len() >= 16 {
        let (record, rest) = data.split_at(16);
        data = rest;
        let mut request = Request {
            flags: u16::from_be_bytes(record[0..2].try_into().unwrap()),
            kind: u16::from_be_bytes(record[2..4].try_into().unwrap()) % 10,
            cookie: out.len() as u64,
            offset: u64::from_be_bytes(record[4..12].try_into().unwrap()),
            length: u32::from_be_bytes(record[12..16].try_into().unwrap()),
        };
        if near_volume {
            request.offset %= VOLUME_SIZE + 2 * MIN_BLOCK as u64;
            request.length %= 2 * VOLUME_SIZE as u32;
        }
        out.extend_from_slice(&request.encode());
        if request.kind == CMD_WRITE {
            let n = data.len().min(request.length as usize);
            out.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = prelude(mode);
    if mode & 4 != 0 {
        framed_requests(rest, mode & 8 != 0, &mut input);
    } else {
        input.extend_from_slice(rest);
    }
    let w = world();
    w.rt.block_on(async {
        tokio::time::timeout(CONNECTION_DEADLINE, session(w.registry.clone(), input))
            .await
            .expect("a connection outlived its input: the server hangs");
    });
});
