//! Client behaviour against a scripted fake server, for what real servers cannot be made to do:
//! malformed and hostile replies, out-of-order pipelining, missing protocol features. Interop
//! with real servers is in `tests/nbd_client_interop.rs`.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::nbd::proto::*;

struct Fake {
    size: u64,
    flags: u16,
    fixed_newstyle: bool,
    structured: bool,
    go: bool,
    block: Option<(u32, u32, u32)>,
    contexts: Vec<(u32, &'static str)>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            fixed_newstyle: true,
            structured: true,
            go: true,
            block: Some((512, 4096, 64 * 1024)),
            contexts: vec![(7, META_BASE_ALLOCATION), (9, "qemu:dirty-bitmap:b")],
        }
    }
}

async fn opt_reply(s: &mut DuplexStream, opt: u32, kind: u32, data: &[u8]) {
    s.write_all(&option_reply_header(opt, kind, data.len() as u32))
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
}

/// Serve the handshake; returns the options the client sent, in order.
async fn fake_handshake(s: &mut DuplexStream, f: &Fake) -> Vec<u32> {
    let hflags = if f.fixed_newstyle {
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    } else {
        0
    };
    s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    s.write_all(&hflags.to_be_bytes()).await.unwrap();
    let mut seen = Vec::new();
    if !f.fixed_newstyle {
        return seen;
    }
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(cflags),
        CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES
    );
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).await.is_err() {
            return seen;
        }
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), IHAVEOPT);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data).await.unwrap();
        seen.push(opt);
        match opt {
            OPT_STRUCTURED_REPLY if f.structured => opt_reply(s, opt, REP_ACK, &[]).await,
            OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ERR_UNSUP, &[]).await,
            OPT_SET_META_CONTEXT => {
                for (id, name) in &f.contexts {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(s, opt, REP_META_CONTEXT, &d).await;
                }
                opt_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO if !f.go => opt_reply(s, opt, REP_ERR_UNSUP, &[]).await,
            OPT_GO => {
                let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                if &data[4..4 + name_len] == b"missing" {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"no export named missing").await;
                    continue;
                }
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&f.size.to_be_bytes());
                d.extend_from_slice(&f.flags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &d).await;
                if let Some((a, b, c)) = f.block {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [a, b, c] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(s, opt, REP_INFO, &d).await;
                }
                opt_reply(s, opt, REP_ACK, &[]).await;
                return seen;
            }
            OPT_EXPORT_NAME => {
                s.write_all(&f.size.to_be_bytes()).await.unwrap();
                s.write_all(&f.flags.to_be_bytes()).await.unwrap();
                return seen;
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[]).await;
                return seen;
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[]).await,
        }
    }
}

async fn pair(f: Fake) -> (NbdClient, DuplexStream) {
    let (c, mut s) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        fake_handshake(&mut s, &f).await;
        s
    });
    let client = NbdClient::connect_stream(c, "fake", "disk", &[META_BASE_ALLOCATION])
        .await
        .unwrap();
    (client, server.await.unwrap())
}

async fn request(s: &mut DuplexStream) -> Request {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    s.read_exact(&mut b).await.unwrap();
    let r = Request::parse(&b).expect("request magic");
    if r.kind == CMD_WRITE {
        let mut p = vec![0u8; r.length as usize];
        s.read_exact(&mut p).await.unwrap();
    }
    r
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    s.write_all(&structured_reply_header(
        flags,
        kind,
        cookie,
        payload.len() as u32,
    ))
    .await
    .unwrap();
    s.write_all(payload).await.unwrap();
}

async fn data_chunk(s: &mut DuplexStream, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(s, flags, REPLY_TYPE_OFFSET_DATA, cookie, &p).await;
}

fn error_payload(errno: u32, msg: &str) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

fn protocol_why(e: Error) -> String {
    match e {
        Error::Protocol { why, .. } => why,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn negotiates_contexts_block_sizes_and_flags() {
    let (c, _s) = pair(Fake::default()).await;
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.block_size(), (512, 4096, 64 * 1024));
    assert_eq!(c.max_request(), 64 * 1024);
    assert!(c.structured_replies() && c.can_flush() && !c.can_multi_conn());
    assert_eq!(c.meta_context_id(META_BASE_ALLOCATION), Some(7));
    assert_eq!(c.meta_contexts().len(), 2);
}

#[tokio::test]
async fn pipelined_replies_may_arrive_in_any_order() {
    let (c, mut s) = pair(Fake::default()).await;
    // 192 KiB at max 64 KiB per request: three requests in flight, answered last-first, the middle
    // one as data + hole + data chunks.
    let server = async {
        let reqs = [
            request(&mut s).await,
            request(&mut s).await,
            request(&mut s).await,
        ];
        for r in reqs.iter().rev() {
            assert_eq!((r.kind, r.length), (CMD_READ, 64 * 1024));
            let fill = (r.offset / 65536) as u8 + 1;
            if fill == 2 {
                data_chunk(&mut s, 0, r.cookie, r.offset, &[fill; 4096]).await;
                let mut hole = (r.offset + 4096).to_be_bytes().to_vec();
                hole.extend_from_slice(&4096u32.to_be_bytes());
                chunk(&mut s, 0, REPLY_TYPE_OFFSET_HOLE, r.cookie, &hole).await;
                data_chunk(
                    &mut s,
                    REPLY_FLAG_DONE,
                    r.cookie,
                    r.offset + 8192,
                    &[fill; 65536 - 8192],
                )
                .await;
            } else {
                data_chunk(&mut s, REPLY_FLAG_DONE, r.cookie, r.offset, &[fill; 65536]).await;
            }
        }
    };
    let (got, ()) = tokio::join!(c.read(0, 3 * 65536), server);
    let got = got.unwrap();
    assert!(got[..65536].iter().all(|&b| b == 1));
    assert!(got[65536..65536 + 4096].iter().all(|&b| b == 2));
    assert!(got[65536 + 4096..65536 + 8192].iter().all(|&b| b == 0));
    assert!(got[65536 + 8192..131072].iter().all(|&b| b == 2));
    assert!(got[131072..].iter().all(|&b| b == 3));
}

#[tokio::test]
async fn unaligned_reads_are_widened_and_trimmed() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        assert_eq!((r.offset, r.length), (512, 1024));
        let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        data_chunk(&mut s, REPLY_FLAG_DONE, r.cookie, 512, &data).await;
    };
    let (got, ()) = tokio::join!(c.read(700, 600), server);
    let want: Vec<u8> = (188..788u32).map(|i| i as u8).collect();
    assert_eq!(got.unwrap(), want);
}

/// Run one 4 KiB read against a scripted answer and return the client's error.
async fn read_fails_with(
    script: impl FnOnce(u64) -> Vec<(u16, u16, Vec<u8>)>,
) -> (NbdClient, Error) {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        for (flags, kind, payload) in script(r.cookie) {
            chunk(&mut s, flags, kind, r.cookie, &payload).await;
        }
        s
    };
    let (got, _s) = tokio::join!(c.read(4096, 4096), server);
    (c, got.unwrap_err())
}

fn data_payload(offset: u64, len: usize) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.resize(8 + len, 0xaa);
    p
}

#[tokio::test]
async fn content_outside_the_request_is_refused() {
    let (_, e) = read_fails_with(|_| {
        vec![(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            data_payload(8192, 4096),
        )]
    })
    .await;
    assert!(protocol_why(e).contains("outside the READ"));
}

#[tokio::test]
async fn overlapping_content_is_refused() {
    let (_, e) = read_fails_with(|_| {
        vec![
            (0, REPLY_TYPE_OFFSET_DATA, data_payload(4096, 2048)),
            (
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                data_payload(5120, 3072),
            ),
        ]
    })
    .await;
    assert!(protocol_why(e).contains("overlaps"));
}

#[tokio::test]
async fn success_without_all_data_is_refused() {
    let (_, e) = read_fails_with(|_| {
        vec![
            (0, REPLY_TYPE_OFFSET_DATA, data_payload(4096, 2048)),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![]),
        ]
    })
    .await;
    assert!(protocol_why(e).contains("2048 of 4096"));
}

#[tokio::test]
async fn huge_chunk_length_is_refused_before_reading_it() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        // Announces ~4 GiB of payload and sends none: the client must not wait for or allocate it.
        s.write_all(&structured_reply_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            r.cookie,
            u32::MAX - 1,
        ))
        .await
        .unwrap();
        s
    };
    let (got, _s) = tokio::join!(c.read(0, 4096), server);
    assert!(protocol_why(got.unwrap_err()).contains("OFFSET_DATA chunk of 4294967294 bytes"));
}

#[tokio::test]
async fn unknown_cookie_breaks_the_connection_for_everyone() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        s.write_all(&simple_reply_header(0, r.cookie + 1000))
            .await
            .unwrap();
        s
    };
    let (got, _s) = tokio::join!(c.flush(), server);
    assert!(protocol_why(got.unwrap_err()).contains("cookie"));
    // Later requests fail at once with the same reason instead of hanging.
    assert!(protocol_why(c.read(0, 512).await.unwrap_err()).contains("cookie"));
}

#[tokio::test]
async fn bad_reply_magic_is_refused() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        request(&mut s).await;
        s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
            .await
            .unwrap();
        s
    };
    let (got, _s) = tokio::join!(c.flush(), server);
    assert!(protocol_why(got.unwrap_err()).contains("magic 0xdeadbeef"));
}

#[tokio::test]
async fn error_chunk_reports_errno_and_message() {
    let (c, e) = read_fails_with(|_| {
        vec![(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            error_payload(EIO, "disk on fire"),
        )]
    })
    .await;
    match &e {
        Error::ServerError {
            errno,
            message,
            command,
            offset,
            ..
        } => {
            assert_eq!(
                (*errno, message.as_str(), *command, *offset),
                (EIO, "disk on fire", "READ", 4096)
            );
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(e.code(), "ERR_NBD_SERVER");
    assert!(e.to_string().contains("EIO (errno 5): disk on fire"), "{e}");
    // A failed command does not break the connection.
    assert_eq!(c.size(), 1 << 20);
}

#[tokio::test]
async fn error_chunk_with_overlong_message_is_refused() {
    let (_, e) = read_fails_with(|_| {
        let mut p = error_payload(EIO, "short");
        p[4..6].copy_from_slice(&300u16.to_be_bytes());
        vec![(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p)]
    })
    .await;
    assert!(protocol_why(e).contains("300-byte message"));
}

#[tokio::test]
async fn unknown_chunk_type_is_refused() {
    let (_, e) = read_fails_with(|_| vec![(REPLY_FLAG_DONE, 77, vec![])]).await;
    assert!(protocol_why(e).contains("unknown reply chunk type 77"));
}

#[tokio::test]
async fn server_closing_mid_reply_is_an_io_error() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        s.write_all(&structured_reply_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            r.cookie,
            8 + 4096,
        ))
        .await
        .unwrap();
        s.write_all(&[0u8; 100]).await.unwrap();
        drop(s);
    };
    let (got, ()) = tokio::join!(c.read(0, 4096), server);
    let e = got.unwrap_err();
    assert_eq!(e.code(), "ERR_IO", "{e}");
    assert!(e.to_string().contains("closed the connection"), "{e}");
}

fn status_payload(id: u32, descs: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (l, f) in descs {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

#[tokio::test]
async fn block_status_asks_again_where_the_server_stopped() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        // First answer covers only 8 KiB of the 64 KiB asked; the second overshoots the end.
        let r = request(&mut s).await;
        assert_eq!((r.kind, r.offset, r.length), (CMD_BLOCK_STATUS, 0, 65536));
        chunk(
            &mut s,
            0,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            &status_payload(9, &[(512, 1)]),
        )
        .await;
        let p = status_payload(7, &[(4096, STATE_HOLE | STATE_ZERO), (4096, 0)]);
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            &p,
        )
        .await;
        let r = request(&mut s).await;
        assert_eq!((r.offset, r.length), (8192, 65536 - 8192));
        let p = status_payload(7, &[(8192, 0), (1 << 20, STATE_HOLE | STATE_ZERO)]);
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            &p,
        )
        .await;
    };
    let (got, ()) = tokio::join!(c.block_status(0, 65536, META_BASE_ALLOCATION), server);
    let e = |offset, length, flags| Extent {
        offset,
        length,
        flags,
    };
    assert_eq!(
        got.unwrap(),
        vec![e(0, 4096, 3), e(4096, 12288, 0), e(16384, 65536 - 16384, 3)]
    );
}

#[tokio::test]
async fn block_status_for_an_ungranted_context_id_is_refused() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            &status_payload(42, &[(512, 0)]),
        )
        .await;
        s
    };
    let (got, _s) = tokio::join!(c.block_status(0, 4096, META_BASE_ALLOCATION), server);
    assert!(protocol_why(got.unwrap_err()).contains("context id 42"));
}

#[tokio::test]
async fn block_status_needs_a_granted_context() {
    let (c, _s) = pair(Fake::default()).await;
    let e = c
        .block_status(0, 4096, "qemu:dirty-bitmap:nope")
        .await
        .unwrap_err();
    assert_eq!(e.code(), "ERR_NOT_SUPPORTED");
    assert!(
        e.to_string()
            .contains("'qemu:dirty-bitmap:nope' was not granted"),
        "{e}"
    );
}

#[tokio::test]
async fn requests_are_checked_before_they_are_sent() {
    let (c, _s) = pair(Fake::default()).await;
    let e = c.write(100, &[0u8; 512]).await.unwrap_err();
    assert!(e.to_string().contains("minimum block size 512"), "{e}");
    let e = c.read((1 << 20) - 512, 1024).await.unwrap_err();
    assert!(e.to_string().contains("runs past the end"), "{e}");
    let e = c.trim(0, 512).await.unwrap_err();
    assert_eq!(e.code(), "ERR_NOT_SUPPORTED");
}

#[tokio::test]
async fn server_without_fixed_newstyle_gets_a_clear_error() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let f = Fake {
        fixed_newstyle: false,
        ..Fake::default()
    };
    let (got, _) = tokio::join!(
        NbdClient::connect_stream(c, "old", "", &[]),
        fake_handshake(&mut s, &f)
    );
    let e = got.unwrap_err();
    assert_eq!(e.code(), "ERR_NBD_REFUSED");
    assert!(e.to_string().contains("NBD_FLAG_FIXED_NEWSTYLE"), "{e}");
}

#[tokio::test]
async fn oldstyle_server_gets_a_clear_error() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = async {
        s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
        s.write_all(&CLISERV_MAGIC.to_be_bytes()).await.unwrap();
        s.write_all(&[0u8; 8 + 4 + 124]).await.unwrap();
    };
    let (got, ()) = tokio::join!(NbdClient::connect_stream(c, "ancient", "", &[]), server);
    assert!(got.unwrap_err().to_string().contains("oldstyle"));
}

#[tokio::test]
async fn not_an_nbd_server_gets_a_clear_error() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = async { s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap() };
    let (got, ()) = tokio::join!(NbdClient::connect_stream(c, "ssh", "", &[]), server);
    assert!(protocol_why(got.unwrap_err()).contains("not an NBD server"));
}

#[tokio::test]
async fn unknown_export_is_refused_with_the_servers_message_and_a_soft_disconnect() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let f = Fake::default();
    let (got, opts) = tokio::join!(
        NbdClient::connect_stream(c, "fake", "missing", &[]),
        fake_handshake(&mut s, &f)
    );
    let e = got.unwrap_err();
    assert_eq!(e.code(), "ERR_NBD_REFUSED");
    assert!(e.to_string().contains("no export named missing"), "{e}");
    assert_eq!(opts, vec![OPT_STRUCTURED_REPLY, OPT_GO, OPT_ABORT]);
}

#[tokio::test]
async fn old_server_falls_back_to_export_name_and_simple_replies() {
    let (c, mut s) = tokio::io::duplex(1 << 20);
    let f = Fake {
        structured: false,
        go: false,
        block: None,
        ..Fake::default()
    };
    let (got, opts) = tokio::join!(
        NbdClient::connect_stream(c, "old", "disk", &[META_BASE_ALLOCATION]),
        fake_handshake(&mut s, &f)
    );
    let c = got.unwrap();
    assert_eq!(opts, vec![OPT_STRUCTURED_REPLY, OPT_GO, OPT_EXPORT_NAME]);
    assert!(!c.structured_replies() && c.meta_contexts().is_empty());
    assert_eq!(c.block_size(), (1, 4096, 32 << 20));
    let server = async {
        let r = request(&mut s).await;
        s.write_all(&simple_reply_header(0, r.cookie))
            .await
            .unwrap();
        s.write_all(&[5u8; 100]).await.unwrap();
        let r = request(&mut s).await;
        s.write_all(&simple_reply_header(ENOSPC, r.cookie))
            .await
            .unwrap();
    };
    let client = async { (c.read(3, 100).await, c.flush().await) };
    let ((read, flush), ()) = tokio::join!(client, server);
    assert_eq!(read.unwrap(), vec![5u8; 100]);
    let e = flush.unwrap_err();
    assert!(
        matches!(e, Error::ServerError { errno: ENOSPC, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn eshutdown_leads_to_a_soft_disconnect() {
    let (c, mut s) = pair(Fake::default()).await;
    let server = async {
        let r = request(&mut s).await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            r.cookie,
            &error_payload(ESHUTDOWN, "bye"),
        )
        .await;
        // The client must now send NBD_CMD_DISC on its own.
        let d = request(&mut s).await;
        assert_eq!(d.kind, CMD_DISC);
    };
    let (got, ()) = tokio::join!(c.flush(), server);
    assert!(matches!(
        got.unwrap_err(),
        Error::ServerError {
            errno: ESHUTDOWN,
            ..
        }
    ));
    assert!(c.flush().await.unwrap_err().to_string().contains("closed"));
}
