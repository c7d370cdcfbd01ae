//! The two-site NATS topology the data plane ships over, with the Rust client it will use:
//! request/reply across the leafnode link both ways, 1 MiB payloads, JetStream in the other site's
//! domain, and the link and the client coming back after site B's server restarts.
//!
//! Needs `nats-server` on PATH (infra/setup.sh installs it).

mod support;

use async_nats::jetstream;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use support::nats_sites::{Site, TwoSites, DEADLINE};

const MIB: usize = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The site's ferryd user, reconnecting quickly and forever, as the data plane will.
async fn connect(site: &Site) -> async_nats::Client {
    site.connect_options()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(site.server())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to site {}: {e}", site.name))
}

/// Answer every request on `subject` with `<site>:` followed by the request's payload.
async fn echo(client: &async_nats::Client, subject: &'static str, site: &'static str) {
    let mut requests = client.subscribe(subject).await.unwrap();
    client.flush().await.unwrap();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let mut reply = format!("{site}:").into_bytes();
            reply.extend_from_slice(&request.payload);
            if let Some(inbox) = request.reply {
                client.publish(inbox, reply.into()).await.unwrap();
            }
        }
    });
}

/// Interest crosses the leafnode asynchronously: right after a (re)connect the other site may not
/// know a responder yet, so retry (bounded) on "no responders" and time-outs.
async fn request_until_answered(
    client: &async_nats::Client,
    subject: &'static str,
    payload: Vec<u8>,
) -> async_nats::Message {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let request = async_nats::Request::new()
            .payload(payload.clone().into())
            .timeout(Some(Duration::from_secs(2)));
        match client.send_request(subject, request).await {
            Ok(reply) => return reply,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no answer on {subject} within {DEADLINE:?}: {e}"),
        }
    }
}

#[test]
fn requests_cross_the_leafnode_both_ways() {
    let sites = TwoSites::start();
    runtime().block_on(async {
        let (a, b) = (connect(&sites.a).await, connect(&sites.b).await);
        echo(&a, "ferry.test.echo.a", "site-a").await;
        echo(&b, "ferry.test.echo.b", "site-b").await;

        let reply = request_until_answered(&b, "ferry.test.echo.a", b"from b".to_vec()).await;
        assert_eq!(&reply.payload[..], b"site-a:from b");
        let reply = request_until_answered(&a, "ferry.test.echo.b", b"from a".to_vec()).await;
        assert_eq!(&reply.payload[..], b"site-b:from a");

        // The CLI user may ask ferryd (`ferry.api.>`) across the link too; it may not serve, nor
        // publish anywhere else (site.conf.tmpl).
        echo(&a, "ferry.api.site-a.echo", "site-a").await;
        let cli = async_nats::ConnectOptions::new()
            .user_and_password(sites.b.cli.user.clone(), sites.b.cli.password.clone())
            .connect(sites.b.server())
            .await
            .unwrap();
        let reply =
            request_until_answered(&cli, "ferry.api.site-a.echo", b"from the cli".to_vec()).await;
        assert_eq!(&reply.payload[..], b"site-a:from the cli");
    });
}

#[test]
fn one_mib_payloads_cross_the_leafnode_intact() {
    let sites = TwoSites::start();
    runtime().block_on(async {
        let (a, b) = (connect(&sites.a).await, connect(&sites.b).await);
        assert!(b.server_info().max_payload >= 8 * MIB);
        echo(&a, "ferry.test.big", "site-a").await;

        // A 1 MiB request from B, echoed back by A: 2 MiB across the link.
        let payload: Vec<u8> = (0..MIB).map(|_| rand::random::<u8>()).collect();
        let reply = request_until_answered(&b, "ferry.test.big", payload.clone()).await;
        assert_eq!(reply.payload.len(), MIB + "site-a:".len());
        assert_eq!(&reply.payload[.."site-a:".len()], b"site-a:");
        assert!(
            reply.payload["site-a:".len()..] == payload[..],
            "payload changed in transit"
        );
    });
}

#[test]
fn jetstream_in_site_a_is_reachable_from_b_through_its_domain() {
    let sites = TwoSites::start();
    runtime().block_on(async {
        let (a, b) = (connect(&sites.a).await, connect(&sites.b).await);
        let a_from_b = jetstream::with_domain(b.clone(), &sites.a.name);
        a_from_b
            .create_stream(jetstream::stream::Config {
                name: "FERRY_TEST".into(),
                subjects: vec!["ferry.test.js.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let ack = a_from_b
            .publish("ferry.test.js.one", "hello".into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.domain, "site-a");
        assert_eq!(ack.sequence, 1);

        // Seen from A, it is a local stream holding that message.
        let mut stream = jetstream::new(a).get_stream("FERRY_TEST").await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 1);
        // B's own domain has no such stream.
        assert!(jetstream::new(b).get_stream("FERRY_TEST").await.is_err());
    });
}

#[test]
fn the_link_and_clients_come_back_after_b_restarts() {
    let mut sites = TwoSites::start();
    let rt = runtime();
    let (a, b) = rt.block_on(async {
        let (a, b) = (connect(&sites.a).await, connect(&sites.b).await);
        echo(&a, "ferry.test.restart.a", "site-a").await;
        echo(&b, "ferry.test.restart.b", "site-b").await;
        request_until_answered(&b, "ferry.test.restart.a", b"before".to_vec()).await;
        (a, b)
    });
    let pid_before = sites.b.pid();

    sites.b.stop();
    sites.wait_for_no_link();
    let restarted = Instant::now();
    sites.b.start();
    sites.wait_for_link();
    assert_ne!(sites.b.pid(), pid_before);

    rt.block_on(async {
        // `b` reconnects on its own and resubscribes; A must learn of that over the new link.
        let reply = request_until_answered(&b, "ferry.test.restart.a", b"after".to_vec()).await;
        assert_eq!(&reply.payload[..], b"site-a:after");
        let reply = request_until_answered(&a, "ferry.test.restart.b", b"after".to_vec()).await;
        assert_eq!(&reply.payload[..], b"site-b:after");
    });
    eprintln!(
        "site B back, link up and requests answered both ways {:?} after its restart",
        restarted.elapsed()
    );
}
